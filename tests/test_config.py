"""Typed config: presets, load order, dotted overrides, one-line errors, round trips, generated docs."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from facetrain import config as config_module
from facetrain.config import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    TrainConfig,
    config_reference_markdown,
    describe_keys,
    list_presets,
    load_config,
    preset_path,
    save_config,
)
from facetrain.errors import ConfigError, FacetrainError

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "config.md"
PRESETS = sorted(list_presets())
# arcface_torch's names for the presets the project promises (configs/ folder of recognition/arcface_torch).
EXPECTED_PRESETS = {
    "ms1mv2_r50",
    "ms1mv3_r18",
    "ms1mv3_r34",
    "ms1mv3_r50",
    "ms1mv3_r100",
    "ms1mv3_mbf",
    "glint360k_r50",
    "glint360k_r100",
    "glint360k_mbf",
    "wf4m_r50",
    "wf4m_mbf",
    "wf12m_r50",
    "wf42m_pfc02_r100",
    "tiny_cpu",
    "demo_cpu",
}


def _error(preset=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert isinstance(info.value, FacetrainError)
    return message


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("backbone_kwargs", "margin_kwargs"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------------


def test_expected_presets_exist():
    missing = EXPECTED_PRESETS - set(PRESETS)
    assert not missing, f"missing presets: {sorted(missing)}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_validates_and_describes_itself(name):
    raw = yaml.safe_load(preset_path(name).read_text())
    assert isinstance(raw, dict)
    config = load_config(name)
    assert isinstance(config, Config)
    description = list_presets()[name]
    assert description and "\n" not in description
    # Facts that come from the data never appear in a preset.
    flat_keys = set(_flatten(raw))
    assert not any(re.search(r"num_classes|num_images?$", key) for key in flat_keys), flat_keys
    # Every key written in the file survived validation with the written value (nothing silently dropped).
    resolved = _flatten(config.to_dict())
    for key, value in _flatten(raw).items():
        assert resolved[key] == value, key


@pytest.mark.parametrize("name", PRESETS)
def test_preset_backbone_is_registered(name):
    models = pytest.importorskip("facetrain.models")
    config = load_config(name)
    assert config.model.backbone in models.list_backbones(include_aliases=True)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_yaml(name, tmp_path):
    config = load_config(name)
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(path) == config
    assert sorted(os.listdir(path.parent)) == ["config.yaml"]  # no temp file left behind


def test_arcface_torch_values_are_taken_over():
    # Spot checks against arcface_torch's config files (values read from recognition/arcface_torch/configs/).
    pfc = load_config("wf42m_pfc02_r100")
    assert (pfc.model.backbone, pfc.loss.sample_rate, pfc.loss.margin, pfc.loss.additive_margin) == (
        "r100",
        0.2,
        "cosface",
        0.4,
    )
    glint = load_config("glint360k_r50")
    assert (glint.optim.weight_decay, glint.loss.angular_margin, glint.train.amp) == (1e-4, 0.0, "fp16")
    arc = load_config("ms1mv3_r50")
    assert (arc.loss.margin, arc.loss.angular_margin, arc.model.embedding_size, arc.train.batch_size) == (
        "arcface",
        0.5,
        512,
        128,
    )
    vit = load_config("wf42m_pfc03_40epoch_8gpu_vit_t")
    assert (vit.optim.name, vit.optim.lr, vit.optim.weight_decay, vit.schedule.warmup_epochs) == ("adamw", 1e-3, 0.1, 4)
    conflict = load_config("wf12m_conflict_r50_pfc03_filter04")
    assert (conflict.loss.sample_rate, conflict.loss.interclass_filtering_threshold) == (0.3, 0.4)


def test_tiny_cpu_is_tiny():
    tiny = load_config("tiny_cpu")
    assert tiny.data.path is None and tiny.train.device == "cpu" and tiny.train.amp == "none"
    assert tiny.train.max_steps is not None and tiny.train.max_steps <= 10
    assert tiny.data.synthetic.num_identities * tiny.data.synthetic.images_per_identity <= 64


def test_tiny_cpu_backbone_builds_and_embeds():
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("facetrain.models")
    tiny = load_config("tiny_cpu")
    backbone = models.build_backbone(
        tiny.model.backbone, embedding_size=tiny.model.embedding_size, **tiny.model.backbone_kwargs
    ).eval()
    size = tiny.data.image_size
    with torch.no_grad():
        embeddings = backbone(torch.zeros(2, 3, size, size))
    assert embeddings.shape == (2, tiny.model.embedding_size)


def test_list_presets_falls_back_to_first_comment(tmp_path, monkeypatch):
    (tmp_path / "commented.yaml").write_text("# Small thing for a test\n# second line\noptim:\n  lr: 0.01\n")
    (tmp_path / "keyed.yaml").write_text("# a comment\ndescription: From the key\n")
    (tmp_path / "bare.yaml").write_text("optim:\n  lr: 0.01\n")
    monkeypatch.setattr(config_module, "PRESET_DIR", tmp_path)
    assert list_presets() == {"bare": "", "commented": "Small thing for a test", "keyed": "From the key"}
    assert load_config("commented").optim.lr == 0.01


# --------------------------------------------------------------------------------------------------------------------
# Load order and overrides
# --------------------------------------------------------------------------------------------------------------------


def test_defaults_match_the_agreed_schema():
    config = load_config()
    assert config == Config()
    assert (config.data.path, config.data.augment, config.data.num_workers, config.data.image_size) == (
        None,
        "flip",
        2,
        112,
    )
    assert config.data.synthetic.num_identities == 200 and config.data.synthetic.val_pairs == 600
    assert (config.model.backbone, config.model.embedding_size, config.model.init_from) == ("r50", 512, None)
    assert (config.loss.margin, config.loss.scale, config.loss.angular_margin, config.loss.sample_rate) == (
        "arcface",
        64.0,
        0.5,
        1.0,
    )
    assert (config.optim.name, config.optim.lr, config.optim.clip_grad_norm) == ("sgd", 0.1, 5.0)
    assert (config.schedule.name, config.schedule.epochs, config.schedule.power) == ("poly", 20, 2.0)
    assert (config.train.batch_size, config.train.max_steps, config.train.amp, config.train.device) == (
        128,
        None,
        "auto",
        "auto",
    )
    assert (config.eval.every_steps, config.eval.n_folds, config.output.dir) == (2000, 10, "runs/facetrain")
    section_types = {name: type(getattr(config, name)) for name in config_module.SECTIONS}
    assert section_types == {
        "data": DataConfig,
        "model": ModelConfig,
        "loss": LossConfig,
        "optim": OptimConfig,
        "schedule": ScheduleConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "output": OutputConfig,
    }


def test_override_beats_preset_beats_default():
    preset = load_config("glint360k_r50")
    assert preset.loss.margin == "cosface"  # preset beats default (arcface)
    assert preset.optim.momentum == 0.9  # untouched default survives
    both = load_config("glint360k_r50", ["loss.margin=arcface", "loss.angular_margin=0.5", "loss.additive_margin=0"])
    assert (both.loss.margin, both.loss.angular_margin, both.loss.additive_margin) == ("arcface", 0.5, 0.0)
    assert both.optim.weight_decay == preset.optim.weight_decay  # other preset values survive
    later = load_config(None, ["optim.lr=0.3", "optim.lr=0.4"])
    assert later.optim.lr == 0.4  # the last override wins


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lr=0.05", "optim.lr", 0.05),
        ("optim.lr=1e-3", "optim.lr", 1e-3),  # YAML 1.1 reads 1e-3 as a string; the schema makes it a float
        ("train.max_steps=100", "train.max_steps", 100),
        ("train.max_steps=null", "train.max_steps", None),
        ("model.init_from=null", "model.init_from", None),
        ("model.init_from=/w/backbone.pth", "model.init_from", "/w/backbone.pth"),
        ("train.compile=true", "train.compile", True),
        ("data.skip_bad=yes", "data.skip_bad", True),
        ("data.val_bins=[a.bin,b.bin]", "data.val_bins", ["a.bin", "b.bin"]),
        ("data.val_bins=[]", "data.val_bins", []),
        ("schedule.milestones=[8, 12.5]", "schedule.milestones", [8.0, 12.5]),
        ("data.synthetic.seed=7", "data.synthetic.seed", 7),
        ("optim.clip_grad_norm=null", "optim.clip_grad_norm", None),
        ("train.device=cuda:1", "train.device", "cuda:1"),
        # a sub-key of a free-form dict adds to the preset's dict
        (
            "model.backbone_kwargs.fp16=true",
            "model.backbone_kwargs",
            {"blocks": [1, 1, 1, 1], "scale": 1, "fp16": True},
        ),
        ("loss.margin_kwargs={h: 0.333, t_alpha: 0.01}", "loss.margin_kwargs", {"h": 0.333, "t_alpha": 0.01}),
        ("description=my run", "description", "my run"),
        ("data.path=2024", "data.path", "2024"),  # numbers are accepted where a string is expected
    ],
)
def test_override_types(override, key, expected):
    config = load_config("tiny_cpu", [override])
    value = _flatten(config.to_dict())[key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("margin", "m1", "m2", "m3"),
    [("arcface", 1.0, 0.5, 0.0), ("cosface", 1.0, 0.0, 0.4), ("combined", 1.0, 0.3, 0.2), ("sphereface", 1.35, 0, 0)],
)
def test_unset_margins_follow_the_chosen_method(margin, m1, m2, m3):
    loss = load_config(None, [f"loss.margin={margin}"]).loss
    assert (loss.multiplicative_margin, loss.angular_margin, loss.additive_margin) == (m1, m2, m3)
    used = sorted(config_module.MARGIN_USES[margin])[0]
    explicit = load_config(None, [f"loss.margin={margin}", f"loss.{used}=1.2"]).loss
    assert getattr(explicit, used) == 1.2


def test_switching_a_preset_to_cosface_gets_a_cosface_margin(caplog):
    # ms1mv3_r50 sets only m2; switching the method must not leave CosFace with m3 = 0 (no margin at all), and the
    # resolved config must not claim an m2 that CosFace ignores.
    with caplog.at_level(logging.WARNING, logger="facetrain.config"):
        loss = load_config("ms1mv3_r50", ["loss.margin=cosface"]).loss
    assert (loss.multiplicative_margin, loss.angular_margin, loss.additive_margin) == (1.0, 0.0, 0.4)
    assert "loss.angular_margin=0.5 (in " in caplog.text and "is not used by loss.margin=cosface" in caplog.text
    assert load_config("glint360k_r50").loss.angular_margin == 0.0
    combined = load_config("ms1mv3_r50", ["loss.margin=combined", "loss.additive_margin=0.1"]).loss
    assert (combined.angular_margin, combined.additive_margin) == (0.5, 0.1)  # combined reads all three
    assert (
        load_config(None, ["loss.multiplicative_margin=1.35"]).loss.multiplicative_margin == 1.0
    )  # arcface: m1 unused


def test_section_mapping_override_merges_into_preset():
    config = load_config("ms1mv3_r50", ["optim={lr: 0.01, momentum: 0.5}"])
    assert (config.optim.lr, config.optim.momentum, config.optim.weight_decay) == (0.01, 0.5, 5e-4)


def test_dict_field_override_replaces():
    config = load_config(None, ["model.backbone_kwargs={a: 1}", "model.backbone_kwargs={b: 2}"])
    assert config.model.backbone_kwargs == {"b": 2}


def test_validate_assignment():
    config = load_config("tiny_cpu")
    config.optim.lr = 0.5
    assert config.optim.lr == 0.5
    with pytest.raises(ValidationError):
        config.loss.sample_rate = 2.0
    with pytest.raises(ValidationError):
        config.optim.lrr = 0.1  # extra keys forbidden on assignment too


def test_to_dict_is_plain_and_schema_has_no_data_facts():
    tree = load_config("ms1mv3_r50").to_dict()
    assert list(tree) == ["description", "data", "model", "loss", "optim", "schedule", "train", "eval", "output"]
    assert yaml.safe_load(yaml.safe_dump(tree)) == tree  # only primitives
    assert not [k for k in _flatten(tree) if "num_classes" in k or "num_image" in k]


# --------------------------------------------------------------------------------------------------------------------
# Errors: one line, dotted key, bad value, source, closest match
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_key_suggests_sibling():
    message = _error(None, ["optim.lrr=0.1"])
    assert message.startswith("config error: optim.lrr: unknown key (did you mean optim.lr?)")
    assert "from override 'optim.lrr=0.1'" in message


def test_unknown_key_suggests_across_sections():
    assert "(did you mean optim.lr?)" in _error(None, ["lr=0.1"])
    assert "(did you mean data.synthetic.seed?)" in _error(None, ["data.synthetic.sed=1"])
    assert "(did you mean schedule.warmup_epochs?)" in _error(None, ["schedule.warmup_epoch=1"])
    assert "(did you mean optim" in _error(None, ["optimizer.lr=0.1"])


def test_value_is_not_a_section():
    message = _error(None, ["optim.lr.x=3"])
    assert "optim.lr.x" in message and "use optim.lr=VALUE" in message


def test_out_of_range_names_key_value_and_source():
    message = _error(None, ["loss.sample_rate=1.5"])
    assert message == "config error: loss.sample_rate=1.5: must be <= 1 (from override 'loss.sample_rate=1.5')"
    assert "loss.sample_rate=0: must be > 0" in _error(None, ["loss.sample_rate=0"])
    assert "model.dropout=1: must be < 1" in _error(None, ["model.dropout=1"])
    assert "train.batch_size=0: must be > 0" in _error(None, ["train.batch_size=0"])
    assert "optim.clip_grad_norm=-1: must be > 0" in _error(None, ["optim.clip_grad_norm=-1"])


def test_wrong_type():
    assert "train.batch_size=abc: must be an integer" in _error(None, ["train.batch_size=abc"])
    assert "train.batch_size=1.5: must be a whole number" in _error(None, ["train.batch_size=1.5"])
    assert "optim.lr=fast: must be a number" in _error(None, ["optim.lr=fast"])
    assert "data.val_bins=3: must be a list" in _error(None, ["data.val_bins=3"])
    assert "train.compile=maybe: must be true or false" in _error(None, ["train.compile=maybe"])
    assert "optim=3: must be a section" in _error(None, ["optim=3"])
    assert "optim.lr=.inf: must be a finite number" in _error(None, ["optim.lr=.inf"])
    assert "train.device=gpu: must be auto, cpu, cuda, cuda:N" in _error(None, ["train.device=gpu"])
    assert "loss.scale=.nan: must be a finite number" in _error(None, ["loss.scale=.nan"])


def test_choice_suggests_closest():
    message = _error(None, ["loss.margin=arcfce"])
    assert message.startswith("config error: loss.margin=arcfce: must be one of arcface, cosface")
    assert "did you mean arcface?" in message
    assert "did you mean adamw?" in _error(None, ["optim.name=adam"])


def test_cross_field_checks_name_the_key():
    message = _error(None, ["schedule.warmup_epochs=30"])
    assert "schedule.warmup_epochs=30.0: must be <= schedule.epochs (20)" in message
    assert "from override 'schedule.warmup_epochs=30'" in message
    assert "schedule.milestones=[12.0, 8.0]: must be in increasing order" in _error(
        None, ["schedule.milestones=[12,8]"]
    )


def test_bad_override_syntax():
    assert "override 'optim.lr': expected KEY=VALUE" in _error(None, ["optim.lr"])
    assert "override '=3': expected KEY=VALUE" in _error(None, ["=3"])
    assert "data.val_bins=[a.bin: not valid YAML" in _error(None, ["data.val_bins=[a.bin"])


def test_unknown_preset_suggests_and_lists():
    message = _error("ms1mv3_r5")
    assert message.startswith("preset 'ms1mv3_r5': unknown (did you mean ms1mv3_r50? available: ")
    assert "glint360k_r100" in message and "tiny_cpu" in message
    assert "not found" in _error("missing/run.yaml")


def test_preset_file_errors_name_the_file(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lr: 0.1\n  wieght_decay: 0.1\n")
    message = _error(typo)
    assert "optim.wieght_decay: unknown key (did you mean optim.weight_decay?)" in message
    assert f"in {typo}" in message
    value = tmp_path / "value.yaml"
    value.write_text("loss:\n  sample_rate: 1.5\n")
    assert _error(value) == f"config error: loss.sample_rate=1.5: must be <= 1 (in {value})"
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [0.1\n")
    assert f"{broken}:" in _error(broken) and "not valid YAML" in _error(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "must be a YAML mapping" in _error(listing)
    data_fact = tmp_path / "facts.yaml"
    data_fact.write_text("data:\n  num_classes: 93431\n")
    assert "data.num_classes: unknown key" in _error(data_fact)


def test_error_blames_override_over_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("loss:\n  sample_rate: 0.5\n")
    assert "(from override 'loss.sample_rate=2')" in _error(preset, ["loss.sample_rate=2"])
    assert "(from override 'loss={sample_rate: 2}')" in _error(preset, ["loss={sample_rate: 2}"])
    assert "loss.scale=0: must be > 0 (from override" in _error(preset, ["loss.scale=0"])


def test_list_item_errors_name_the_index():
    message = _error(None, ["data.val_bins=[a.bin, [b.bin]]"])
    assert message == (
        "config error: data.val_bins[1]=[b.bin]: must be a string (from override 'data.val_bins=[a.bin, [b.bin]]')"
    )


# --------------------------------------------------------------------------------------------------------------------
# Saving and generated docs
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(min_value=1e-12, max_value=1e3, allow_nan=False, allow_infinity=False),
    sample_rate=st.floats(min_value=1e-9, max_value=1.0, exclude_min=False),
    batch_size=st.integers(min_value=1, max_value=2**31),
    path=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
    bins=st.lists(st.text(min_size=1, max_size=10), max_size=3),
)
def test_yaml_round_trip_is_exact_for_any_valid_values(lr, sample_rate, batch_size, path, bins):
    config = load_config("tiny_cpu")
    config.optim.lr = lr
    config.loss.sample_rate = sample_rate
    config.train.batch_size = batch_size
    config.data.path = path
    config.data.val_bins = bins
    assert Config.model_validate(yaml.safe_load(config.to_yaml())) == config


def test_save_config_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    config = load_config("tiny_cpu", ["optim.lr=0.07"])
    assert save_config(config, path) == path
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.07
    assert load_config(path) == config
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load_config(tmp_path) == config  # a run folder stands for the config.yaml it saved


def test_describe_keys_covers_every_leaf():
    keys = [key for key, _, _ in describe_keys()]
    assert keys == list(_flatten(Config().to_dict()))
    assert all(text for _, _, text in describe_keys())


def test_reference_markdown_lists_every_key_with_default():
    text = config_reference_markdown()
    for key in _flatten(Config().to_dict()):
        assert f"| `{key}` |" in text, key
    assert "| `loss.sample_rate` | float | `1.0` | > 0.0, <= 1.0 |" in text


def test_docs_contain_current_reference():
    # Regenerate the table with: FACETRAIN_UPDATE_DOCS=1 python -m pytest tests/test_config.py -k docs
    if os.environ.get("FACETRAIN_UPDATE_DOCS") == "1":
        _update_doc()
    text = DOC.read_text(encoding="utf-8")
    assert config_reference_markdown() in text, (
        "docs/config.md is out of date with the schema; regenerate it with "
        "FACETRAIN_UPDATE_DOCS=1 python -m pytest tests/test_config.py -k docs"
    )


def test_docs_mention_every_preset():
    text = DOC.read_text(encoding="utf-8")
    assert [name for name in PRESETS if f"`{name}`" not in text] == []


def _update_doc() -> None:
    begin, end = "<!-- BEGIN GENERATED: config_reference_markdown() -->", "<!-- END GENERATED -->"
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{config_reference_markdown()}{end}{tail}", encoding="utf-8")
