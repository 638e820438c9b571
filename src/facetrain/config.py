"""Typed run config: schema defaults -> preset YAML (a name or a path) -> dotted ``a.b=value`` overrides.

The schema is a tree of pydantic v2 models with ``extra="forbid"``; every field's ``description`` is its help text (used
by ``facetrain config show --help-keys`` and to generate docs/config.md). Errors a user can make (unknown keys, wrong
types, out-of-range values, unknown presets) raise :class:`~facetrain.errors.ConfigError` with ONE line that names the
dotted key, the bad value, where it came from (preset file or override) and, for typos, the closest valid key.

Facts read from the data (number of classes, number of images) are never part of the config; the trainer computes them.

Example:
    >>> cfg = load_config("tiny_cpu", ["optim.lr=0.05", "train.max_steps=100"])
    >>> cfg.optim.lr
    0.05
"""

from __future__ import annotations

import logging
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from facetrain.errors import ConfigError, closest
from facetrain.fileio import atomic_write_text

__all__ = [
    "PRESET_DIR",
    "MARGINS",
    "MARGIN_DEFAULTS",
    "MARGIN_USES",
    "Config",
    "DataConfig",
    "SyntheticConfig",
    "ModelConfig",
    "LossConfig",
    "DistillConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "EvalConfig",
    "OutputConfig",
    "load_config",
    "save_config",
    "list_presets",
    "preset_path",
    "parse_overrides",
    "config_reference_markdown",
    "describe_keys",
]

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "configs"

#: Margin names the loss section accepts (see facetrain.heads.margins for the formulas).
MARGINS = ("arcface", "cosface", "combined", "sphereface", "curricularface", "adaface", "magface", "softmax")

#: m1 (multiplicative), m2 (angular, radians), m3 (additive) of each method when the config does not set them:
#: ArcFace (Deng et al. 2019) m2=0.5; CosFace (Wang et al. 2018) m3=0.4 as in arcface_torch's configs; InsightFace's
#: combined sample config (1, 0.3, 0.2); SphereFace m1=1.35 (arcface_torch-style additive form); CurricularFace m=0.5.
MARGIN_DEFAULTS: dict[str, dict[str, float]] = {
    "arcface": {"multiplicative_margin": 1.0, "angular_margin": 0.5, "additive_margin": 0.0},
    "cosface": {"multiplicative_margin": 1.0, "angular_margin": 0.0, "additive_margin": 0.4},
    "combined": {"multiplicative_margin": 1.0, "angular_margin": 0.3, "additive_margin": 0.2},
    "sphereface": {"multiplicative_margin": 1.35, "angular_margin": 0.0, "additive_margin": 0.0},
    "curricularface": {"multiplicative_margin": 1.0, "angular_margin": 0.5, "additive_margin": 0.0},
    "adaface": {"multiplicative_margin": 1.0, "angular_margin": 0.0, "additive_margin": 0.0},
    "magface": {"multiplicative_margin": 1.0, "angular_margin": 0.0, "additive_margin": 0.0},
    "softmax": {"multiplicative_margin": 1.0, "angular_margin": 0.0, "additive_margin": 0.0},
}
#: The margins each method reads (the others stay at their neutral value: m1 = 1, m2 = m3 = 0).
MARGIN_USES: dict[str, frozenset[str]] = {
    "arcface": frozenset({"angular_margin"}),
    "cosface": frozenset({"additive_margin"}),
    "combined": frozenset({"multiplicative_margin", "angular_margin", "additive_margin"}),
    "sphereface": frozenset({"multiplicative_margin"}),
    "curricularface": frozenset({"angular_margin"}),
    "adaface": frozenset(),
    "magface": frozenset(),
    "softmax": frozenset(),
}
_NEUTRAL_MARGINS = {"multiplicative_margin": 1.0, "angular_margin": 0.0, "additive_margin": 0.0}
_DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$"
_TABLE_HEAD = "| key | type | default | allowed | description |"
_MODEL_CONFIG = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, coerce_numbers_to_str=True)


# --------------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------------


class SyntheticConfig(BaseModel):
    """Synthetic identities used when ``data.path`` is null (tests, demos, smoke runs)."""

    model_config = _MODEL_CONFIG

    num_identities: int = Field(200, gt=0, description="Number of synthetic training identities.")
    images_per_identity: int = Field(16, gt=0, description="Images generated per training identity.")
    seed: int = Field(0, description="Seed of the synthetic generator (same seed, same images).")
    val_identities: int = Field(
        100, ge=0, description="Held-out identities used to build synthetic verification pairs (0 = no synthetic val)."
    )
    val_pairs: int = Field(600, ge=0, description="Number of synthetic verification pairs (half same, half different).")


class DataConfig(BaseModel):
    """Training data, verification sets and augmentation."""

    model_config = _MODEL_CONFIG

    path: str | None = Field(
        None,
        description="Training data: a RecordIO folder (train.rec/train.idx/property), a .rec file or an image folder "
        "(one sub-folder per identity); null = synthetic identities (see data.synthetic).",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Synthetic data settings.")
    val_bins: list[str] = Field(
        default_factory=list,
        description="Verification .bin files (lfw.bin, cfp_fp.bin, ...) evaluated during training.",
    )
    augment: Literal["none", "flip", "basic", "strong"] = Field(
        "flip", description="Training augmentation: none, flip (horizontal flip), basic or strong."
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (0 = load in the main process).")
    image_size: int = Field(112, gt=0, description="Side of the square aligned face in pixels.")
    skip_bad: bool = Field(False, description="Skip undecodable records (logged) instead of failing on the first one.")


class ModelConfig(BaseModel):
    """Backbone network."""

    model_config = _MODEL_CONFIG

    backbone: str = Field("r50", description="Backbone name from the model registry (r18..r200, mbf, vit_t, ...).")
    embedding_size: int = Field(512, gt=0, description="Embedding dimension D of the backbone output (B, D).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability before the embedding layer.")
    init_from: str | None = Field(
        None, description="Initial backbone weights: a facetrain checkpoint or an arcface_torch backbone.pth."
    )
    channels_last: bool = Field(False, description="Run the backbone in channels_last memory format (faster on GPUs).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed to the backbone builder."
    )


class DistillConfig(BaseModel):
    """Embedding distillation from precomputed teacher embeddings (``facetrain distill-dataset``)."""

    model_config = _MODEL_CONFIG

    weight: float = Field(0.0, ge=0.0, description="Weight of the distillation loss added to the margin loss; 0 = off.")
    embeddings: str | None = Field(
        None, description="Teacher embeddings FILE.npy, (N, D_t) in dataset index order (+ FILE.json sidecar)."
    )
    kind: Literal["cosine", "l2"] = Field(
        "cosine", description="cosine: mean(1 - cos); l2: MSE of unit vectors. A projection is learned if D != D_t."
    )


class LossConfig(BaseModel):
    """Margin-based softmax loss and the Partial FC classifier.

    The combined margin (InsightFace, Deng et al. 2019) is ``logit_y = s * (cos(m1 * theta_y + m2) - m3)``. The
    margins m1, m2, m3 not given explicitly take the chosen method's usual values (:data:`MARGIN_DEFAULTS`), so
    ``loss.margin=cosface`` alone means m3 = 0.4, not the ArcFace defaults. :func:`load_config` resets margins the
    method does not read (:data:`MARGIN_USES`) to their neutral value with a warning, so a saved config shows what
    the run used.
    """

    model_config = _MODEL_CONFIG

    margin: Literal[
        "arcface", "cosface", "combined", "sphereface", "curricularface", "adaface", "magface", "softmax"
    ] = Field("arcface", description="Margin method: " + ", ".join(MARGINS) + ".")
    scale: float = Field(64.0, gt=0.0, description="Logit scale s applied to the cosine logits.")
    multiplicative_margin: float = Field(
        1.0, gt=0.0, description="Multiplicative angular margin m1 (SphereFace); unset: 1.35 for sphereface, else 1."
    )
    angular_margin: float = Field(
        0.5,
        ge=0.0,
        description="Additive angular margin m2 in radians (ArcFace); unset: 0.5 for arcface/curricularface, "
        "0.3 for combined, else 0.",
    )
    additive_margin: float = Field(
        0.0,
        ge=0.0,
        description="Additive cosine margin m3 (CosFace); unset: 0.4 for cosface, 0.2 for combined, else 0.",
    )
    subcenter_k: int = Field(1, ge=1, description="Sub-centres per class (Sub-center ArcFace); 1 = plain centres.")
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Partial FC: fraction of negative class centres sampled per step (0, 1]."
    )
    interclass_filtering_threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="Zero negative logits with cosine above this threshold (0 = off)."
    )
    exact_gradient: bool = Field(
        False,
        description="Back-propagate through arccos/cos of the angular margin (true gradient) instead of "
        "arcface_torch's straight-through estimator.",
    )
    margin_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of the margin (e.g. AdaFace h, MagFace bounds)."
    )
    sharding: Literal["block", "mod"] = Field(
        "block", description="Partial FC: how classes are spread over ranks (block = contiguous, as arcface_torch)."
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Embedding distillation.")

    @model_validator(mode="before")
    @classmethod
    def _margin_defaults(cls, data: Any) -> Any:
        """Fill m1/m2/m3 that were not given with the chosen method's defaults."""
        if not isinstance(data, dict):
            return data
        margin = data.get("margin", "arcface")
        defaults = MARGIN_DEFAULTS.get(margin) if isinstance(margin, str) else None
        return {**defaults, **data} if defaults else data


class OptimConfig(BaseModel):
    """Optimizer (one parameter group for the backbone, one for the class centres)."""

    model_config = _MODEL_CONFIG

    name: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer: sgd (momentum) or adamw.")
    lr: float = Field(
        0.1, gt=0.0, description="Peak learning rate after warm-up (used as given, not rescaled by batch or GPU count)."
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (ignored by adamw).")
    weight_decay: float = Field(5e-4, ge=0.0, description="Weight decay (L2 for sgd, decoupled for adamw).")
    no_decay_norm_bias: bool = Field(False, description="Exclude normalization weights and biases from weight decay.")
    clip_grad_norm: float | None = Field(
        5.0, gt=0.0, description="Clip the backbone's gradient norm to this value (null = no clipping)."
    )


class _StageLoss(BaseModel):
    model_config = _MODEL_CONFIG

    scale: float | None = Field(None, gt=0.0)
    angular_margin: float | None = Field(None, ge=0.0)
    additive_margin: float | None = Field(None, ge=0.0)
    multiplicative_margin: float | None = Field(None, gt=0.0)


class _Stage(BaseModel):
    """One entry of ``schedule.stages`` (validated, then kept as a plain dict)."""

    model_config = _MODEL_CONFIG

    until_step: int = Field(gt=0)
    loss: _StageLoss = Field(default_factory=_StageLoss)
    lr_scale: float = Field(1.0, gt=0.0)
    freeze_backbone: bool = False


class ScheduleConfig(BaseModel):
    """Learning-rate schedule, stepped once per optimizer step."""

    model_config = _MODEL_CONFIG

    name: Literal["poly", "cosine", "step", "constant"] = Field(
        "poly", description="Schedule after warm-up: poly (lr*(1-t)^power), cosine, step (milestones) or constant."
    )
    epochs: int = Field(20, gt=0, description="Training epochs (ignored when train.max_steps is set).")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length in epochs (may be fractional).")
    power: float = Field(2.0, gt=0.0, description="Exponent of the poly schedule.")
    milestones: list[float] = Field(
        default_factory=list, description="Epochs at which the step schedule multiplies the lr by gamma."
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="Multiplicative lr factor at each step milestone.")
    stages: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Training stages, each {until_step, loss: {scale, angular_margin, additive_margin, "
        "multiplicative_margin}, lr_scale, freeze_backbone}, in force while step < until_step (increasing); after the "
        "last one the base config applies. E.g. [{until_step: 2000, loss: {scale: 16}}].",
    )

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Validate each stage's keys and values; keep only what was set."""
        checked = [_Stage.model_validate(stage).model_dump(exclude_none=True) for stage in stages]
        ends = [stage["until_step"] for stage in checked]
        if ends != sorted(set(ends)):
            raise ValueError(f"until_step must increase from stage to stage, got {ends}")
        return checked


class TrainConfig(BaseModel):
    """Training loop."""

    model_config = _MODEL_CONFIG

    batch_size: int = Field(128, gt=0, description="Images per rank per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward/backward passes accumulated per optimizer step.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides schedule.epochs; null = use epochs)."
    )
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(
        "auto",
        description="Mixed precision: auto (bf16 where supported, else fp16 on GPU, none on CPU), bf16, fp16, none.",
    )
    compile: bool = Field(False, description="torch.compile the backbone.")
    seed: int = Field(0, description="Random seed (data order, initialisation, augmentation).")
    deterministic: bool = Field(False, description="Use deterministic algorithms (slower; bitwise-repeatable runs).")
    device: str = Field(
        "auto",
        pattern=_DEVICE_PATTERN,
        description="Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps, xpu or xpu:N.",
    )
    log_every: int = Field(50, gt=0, description="Log loss, lr and throughput every this many optimizer steps.")
    stop_after_steps: int | None = Field(
        None,
        gt=0,
        description="End this process after this many steps (counted from its start or resume) with a checkpoint; "
        "--resume auto continues (the schedule still spans max_steps). null = run to the end.",
    )
    freeze_backbone_steps: int = Field(
        0, ge=0, description="Train only the class centres for the first N steps (fine-tuning on new identities)."
    )


class EvalConfig(BaseModel):
    """Verification during training."""

    model_config = _MODEL_CONFIG

    every_steps: int = Field(
        2000, ge=0, description="Evaluate the val sets every this many steps (0 = only at the end)."
    )
    n_folds: int = Field(10, ge=2, description="Cross-validation folds of the verification protocol (LFW uses 10).")
    batch_size: int = Field(256, gt=0, description="Images per batch when embedding the val sets.")
    target: str | None = Field(
        None, description="Val set whose accuracy selects the best checkpoint (e.g. lfw; null = the first val set)."
    )


class OutputConfig(BaseModel):
    """Where a run writes checkpoints, metrics and its resolved config."""

    model_config = _MODEL_CONFIG

    dir: str = Field("runs/facetrain", description="Output folder of the run.")
    save_every_steps: int = Field(0, ge=0, description="Checkpoint every this many steps (0 = only at the end).")


class Config(BaseModel):
    """A whole run: one section per concern. Build it with :func:`load_config`."""

    model_config = _MODEL_CONFIG

    description: str = Field("", description="One line saying what this config is for (shown by `config list`).")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data and augmentation.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone network.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Margin loss and Partial FC.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Verification during training.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Outputs of the run.")

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        """Cross-field checks; each names the offending dotted key in the error context."""
        sched = self.schedule
        if sched.warmup_epochs > sched.epochs:
            raise _cross_error(
                "schedule.warmup_epochs", sched.warmup_epochs, f"must be <= schedule.epochs ({sched.epochs})"
            )
        if sched.milestones != sorted(sched.milestones):
            raise _cross_error("schedule.milestones", sched.milestones, "must be in increasing order")
        if any(m <= 0 for m in sched.milestones):
            raise _cross_error("schedule.milestones", sched.milestones, "must all be > 0 (epochs)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of primitives (lists, dicts, str, int, float, bool, None)."""
        return self.model_dump(mode="python")

    def to_yaml(self) -> str:
        """Resolved config as YAML, in schema order; :func:`load_config` on it gives an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)


SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}


def _cross_error(key: str, value: Any, message: str) -> PydanticCustomError:
    return PydanticCustomError("cross_field", "{key}: {message}", {"key": key, "value": value, "message": message})


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def load_config(preset: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a run config: schema defaults, then the preset file, then dotted overrides; validate once.

    Args:
        preset: preset name (``"ms1mv3_r50"``, see :func:`list_presets`), a path to a YAML file, or None for the
            schema defaults.
        overrides: ``"section.key=value"`` strings; values are parsed with ``yaml.safe_load`` (``optim.lr=0.05``,
            ``data.val_bins=[a.bin,b.bin]``, ``model.init_from=null``).

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: one line naming the dotted key, the bad value, its source and the closest valid key.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset is not None:
        path = _resolve_preset(preset)
        data = _read_yaml(path)
        _check_keys(data, Config, prefix="", source=f"in {path}")
        _merge(merged, data, sources, source=f"in {path}", prefix="")
    for key, value, text in parse_overrides(overrides):
        source = f"from override '{text}'"
        section = _check_dotted_key(key, source)
        if section is not None and isinstance(value, Mapping):
            _check_keys(value, section, prefix=f"{key}.", source=source)
        _set_dotted(merged, key, value, merge=section is not None)
        if section is None or not isinstance(value, Mapping):
            for stale in [k for k in sources if k.startswith(f"{key}.")]:
                del sources[stale]  # the override replaced everything below key
        else:
            _merge({}, value, sources, source=source, prefix=f"{key}.")
        sources[key] = source
    _reset_unused_margins(merged, sources)
    return _validate(merged, sources)


def save_config(config: Config, path: str | os.PathLike[str]) -> Path:
    """Write ``config.to_yaml()`` to ``path`` atomically (temp file in the same folder, then rename).

    Returns:
        The path written.
    """
    return atomic_write_text(path, config.to_yaml())


def list_presets() -> dict[str, str]:
    """Preset names (sorted) mapped to their one-line description (``description:`` key or first comment line)."""
    return {p.stem: _preset_description(p) for p in sorted(PRESET_DIR.glob("*.yaml"))}


def preset_path(name: str) -> Path:
    """Path of the bundled preset ``name``.

    Raises:
        ConfigError: unknown preset, with the closest name and the list of available ones.
    """
    path = PRESET_DIR / f"{name}.yaml"
    if path.is_file():
        return path
    names = sorted(list_presets())
    hint = closest(name, names)
    did_you_mean = f"did you mean {hint}? " if hint else ""
    raise ConfigError(
        f"preset '{name}': unknown ({did_you_mean}available: {', '.join(names)}; or give a path to a .yaml file)"
    )


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    """Split ``"a.b=value"`` strings into ``(dotted_key, yaml_value, original_text)``.

    Raises:
        ConfigError: an override without ``=``, with an empty key, or whose value is not valid YAML.
    """
    parsed = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
            raise ConfigError(f"config error: override '{text}': expected KEY=VALUE, e.g. optim.lr=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(
                f"config error: {key}={raw}: not valid YAML ({problem}) (from override '{text}')"
            ) from exc
        parsed.append((key, value, text))
    return parsed


def config_reference_markdown() -> str:
    """Markdown tables (one per section) of every key: type, default, allowed range and description.

    docs/config.md embeds this output verbatim; a test keeps the two identical.
    """
    lines: list[str] = []
    for section, model in SECTIONS.items():
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines += [
            f"### `{section}`",
            "",
            doc,
            "",
            "| key | type | default | allowed | description |",
            "|---|---|---|---|---|",
        ]
        for key, field, _ in _iter_fields(model, section):
            default = field.get_default(call_default_factory=True)
            default_text = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
            default_text = default_text.removesuffix("\n...").removesuffix("...").strip()
            desc = (field.description or "").replace("|", "\\|")
            lines.append(
                f"| `{key}` | {_type_name(field.annotation)} | `{default_text}` | {_range_text(field)} | {desc} |"
            )
        lines.append("")
    top = Config.model_fields["description"]
    lines += [
        "### top level",
        "",
        _TABLE_HEAD,
        "|---|---|---|---|---|",
        f"| `description` | str | `''` |  | {top.description} |",
        "",
    ]
    return "\n".join(lines)


def describe_keys() -> list[tuple[str, str, str]]:
    """``(dotted_key, type, description)`` for every leaf key, in schema order (for ``--help-keys``)."""
    rows = [("description", "str", Config.model_fields["description"].description or "")]
    for section, model in SECTIONS.items():
        for key, field, _ in _iter_fields(model, section):
            text = field.description or ""
            allowed = _range_text(field)
            if allowed:
                text = f"{text} [{allowed}]"
            rows.append((key, _type_name(field.annotation), text))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Helpers: preset files, merging, key checks, error messages
# --------------------------------------------------------------------------------------------------------------------


def _resolve_preset(preset: str | os.PathLike[str]) -> Path:
    """A bundled preset name, a YAML path, or a run folder holding the ``config.yaml`` a run saved."""
    text = os.fspath(preset)
    looks_like_path = (
        isinstance(preset, os.PathLike) or "/" in text or os.sep in text or text.endswith((".yaml", ".yml"))
    )
    if looks_like_path:
        path = Path(text).expanduser()
        if path.is_dir() and (path / "config.yaml").is_file():
            return path / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"config error: preset file {path}: not found (give a preset name or a .yaml path)")
        return path
    return preset_path(text)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config error: {where}: not valid YAML ({problem}); fix the file") from exc
    except OSError as exc:
        raise ConfigError(f"config error: {path}: cannot read ({exc.strerror or exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def _merge(into: dict[str, Any], data: Mapping[str, Any], sources: dict[str, str], *, source: str, prefix: str) -> None:
    """Deep-merge ``data`` into ``into`` recording the source of every leaf."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, sources, source=source, prefix=f"{dotted}.")
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value, sources, source=source, prefix=f"{dotted}.")
            sources[dotted] = source
        else:
            into[key] = value
            sources[dotted] = source


def _set_dotted(into: dict[str, Any], key: str, value: Any, *, merge: bool) -> None:
    """Set ``into[a][b][c] = value`` for ``"a.b.c"``; with ``merge`` a mapping is deep-merged into the section."""
    parts = key.split(".")
    node = into
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    if merge and isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value, {}, source="", prefix="")
    else:
        node[parts[-1]] = value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation (``X``, ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_free_dict(annotation: Any) -> bool:
    """True for ``dict[...]`` fields, whose sub-keys are free-form (backbone_kwargs, margin_kwargs)."""
    if annotation is dict or get_origin(annotation) is dict:
        return True
    return any(_is_free_dict(a) for a in get_args(annotation) if get_origin(annotation) in (Union, types.UnionType))


def _check_keys(data: Mapping[str, Any], model: type[BaseModel], *, prefix: str, source: str) -> None:
    """Reject unknown keys (recursively) with the closest valid dotted key."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(str(key))
        if field is None:
            _raise_unknown(dotted, model, prefix, source)
        sub = _model_of(field.annotation)
        if sub is not None and isinstance(value, Mapping):
            _check_keys(value, sub, prefix=f"{dotted}.", source=source)


def _check_dotted_key(key: str, source: str) -> type[BaseModel] | None:
    """Reject an override key that is not in the schema; returns the section model the key names, if any."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + "." if i else ""
        field = model.model_fields.get(part)
        if field is None:
            _raise_unknown(prefix + part, model, prefix, source)
        if i == len(parts) - 1:
            return _model_of(field.annotation)
        if _is_free_dict(field.annotation):
            return None  # model.backbone_kwargs.foo=1: any sub-key
        sub = _model_of(field.annotation)
        if sub is None:
            raise ConfigError(
                f"config error: {key}: '{prefix + part}' is a value, not a section ({source}); "
                f"use {prefix + part}=VALUE"
            )
        model = sub


def _all_dotted_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _model_of(field.annotation)
        if sub is not None:
            keys += _all_dotted_keys(sub, f"{prefix}{name}.")
    return keys


def _raise_unknown(dotted: str, model: type[BaseModel], prefix: str, source: str) -> typing.NoReturn:
    # Prefer a sibling key (optim.lrr -> optim.lr); fall back to any key in the tree (lr -> optim.lr).
    siblings = [prefix + name for name in model.model_fields]
    hint = closest(dotted, siblings)
    if hint is None:
        leaf = dotted.rsplit(".", 1)[-1]
        every = _all_dotted_keys()
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in every}
        leaf_hint = closest(leaf, by_leaf)
        hint = by_leaf[leaf_hint] if leaf_hint else closest(dotted, every)
    did_you_mean = f" (did you mean {hint}?)" if hint else ""
    section = prefix.rstrip(".") or "top level"
    if hint is None:
        did_you_mean = f" (valid keys of {section}: {', '.join(model.model_fields)})"
    raise ConfigError(f"config error: {dotted}: unknown key{did_you_mean} ({source})")


def _reset_unused_margins(merged: dict[str, Any], sources: Mapping[str, str]) -> None:
    """Set the margins the chosen method ignores to their neutral value (with a warning), so the saved config says
    what the run used; e.g. a preset's m2 = 0.5 after ``loss.margin=cosface``."""
    loss = merged.get("loss")
    if not isinstance(loss, dict):
        return
    margin = loss.get("margin", "arcface")
    if not isinstance(margin, str) or margin not in MARGIN_USES:
        return
    for key, neutral in _NEUTRAL_MARGINS.items():
        value = loss.get(key)
        if key in MARGIN_USES[margin] or not isinstance(value, (int, float)) or value == neutral:
            continue
        source = _source_of(f"loss.{key}", sources) or "schema default"
        logger.warning("loss.%s=%s (%s) is not used by loss.margin=%s; set to %s", key, value, source, margin, neutral)
        loss[key] = neutral


def _validate(merged: dict[str, Any], sources: Mapping[str, str]) -> Config:
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc.errors()[0], merged, sources)) from None


def _format_error(error: Mapping[str, Any], merged: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """One line: ``config error: KEY=VALUE: problem (source)``."""
    ctx = error.get("ctx") or {}
    if error["type"] == "cross_field":
        key, value, problem = ctx["key"], ctx["value"], ctx["message"]
    else:
        key = ""
        for part in error["loc"]:
            if isinstance(part, int):
                key += f"[{part}]"  # list item: data.val_bins[1]
            elif not _is_union_tag(part):
                key += f".{part}" if key else str(part)
        value = error.get("input")
        problem = _problem_text(error, key)
    source = _source_of(key, sources) or "schema default"
    return f"config error: {key}={_show(value)}: {problem} ({source})"


def _is_union_tag(part: str) -> bool:
    # pydantic adds the tried union member to loc, e.g. ('optim', 'clip_grad_norm', 'float').
    return part in {"float", "int", "str", "bool", "none", "list[str]", "list[float]", "dict[str,any]"} or "[" in part


def _problem_text(error: Mapping[str, Any], key: str) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le")))
        return f"must be {bounds[kind]} {limit:g}" if isinstance(limit, float) else f"must be {bounds[kind]} {limit}"
    if kind == "literal_error":
        allowed = _literal_choices(key)
        value = error.get("input")
        hint = closest(str(value), allowed) if allowed else None
        did_you_mean = f"did you mean {hint}? " if hint else ""
        return f"must be one of {', '.join(allowed)} ({did_you_mean}".rstrip(" (") + (")" if hint else "")
    simple = {
        "int_parsing": "must be an integer",
        "int_type": "must be an integer",
        "int_from_float": "must be a whole number",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list, e.g. [a, b]",
        "dict_type": "must be a mapping, e.g. {a: 1}",
        "model_type": "must be a section (a mapping of keys)",
        "model_attributes_type": "must be a section (a mapping of keys)",
        "finite_number": "must be a finite number",
        "string_pattern_mismatch": "must be auto, cpu, cuda, cuda:N, mps, xpu or xpu:N",
        "missing": "is required",
    }
    return simple.get(kind, error.get("msg", kind).lower())


def _literal_choices(key: str) -> list[str]:
    model: type[BaseModel] | None = Config
    annotation: Any = None
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = _model_of(annotation)
    return [str(a) for a in _literal_args(annotation)]


def _literal_args(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        found = _literal_args(arg)
        if found:
            return found
    return []


def _source_of(key: str, sources: Mapping[str, str]) -> str | None:
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found:
            return found
    # A cross-field error on a key that came from defaults: name the source of any sibling that was set.
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if value and value.strip() == value and "," not in value else repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def _iter_fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, Any, type[BaseModel]]]:
    """Leaf fields as ``(dotted_key, FieldInfo, owner)``, descending into nested sections."""
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None:
            yield from _iter_fields(sub, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", field, model


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _range_text(field: Any) -> str:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = []
    for meta in field.metadata:
        for attr, symbol in symbols.items():
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
    return ", ".join(parts)


def _preset_description(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("description"), str):
        return data["description"].strip().splitlines()[0] if data["description"].strip() else ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""
