"""Save and load backbones: facetrain checkpoints, arcface_torch ``backbone.pth``, TorchScript and ONNX files.

``load_backbone(path)`` recognises the format from the file itself:

- a facetrain backbone/trainer checkpoint: a dict with ``"backbone"`` (state dict) and ``"backbone_name"``,
  ``"backbone_kwargs"``, ``"embedding_size"`` metadata (written by :func:`save_backbone`);
- an arcface_torch ``backbone.pth``: a bare state dict (a ``module.`` DDP prefix is stripped); the architecture is
  inferred from its keys and shapes when ``name`` is None;
- a TorchScript archive (``torch.jit.save``): loaded with ``torch.jit.load`` and returned as is;
- an ONNX recognition model (InsightFace ``w600k_r50.onnx`` style, or ``torch.onnx.export`` of ours): its weights are
  mapped into the matching facetrain architecture (see :mod:`facetrain.models.onnx_import`).

Every ``torch.load`` uses ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from facetrain.errors import ModelError
from facetrain.fileio import atomic_path
from facetrain.models.registry import build_backbone, canonical_name

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "facetrain.backbone/1"


def save_backbone(model: nn.Module, path: str | os.PathLike, name: str, **kwargs) -> Path:
    """Write ``model``'s weights and the recipe to rebuild it, atomically (temp file + rename).

    Args:
        model: a backbone built with ``build_backbone(name, **kwargs)``.
        path: destination file (``.pt`` by convention).
        name: its registry name.
        **kwargs: the build kwargs (``embedding_size`` included or read from the model); primitives only.

    Returns:
        The written path.
    """
    path = Path(path)
    kwargs = dict(kwargs)
    embedding_size = int(kwargs.pop("embedding_size", getattr(model, "embedding_size", 512)))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "backbone_name": canonical_name(name),
        "backbone_kwargs": kwargs,
        "embedding_size": embedding_size,
        "backbone": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_backbone(path: str | os.PathLike, name: str | None = None, **kwargs) -> nn.Module:
    """Load a backbone from any supported file (see the module docstring); returns it in eval mode on the CPU.

    Args:
        path: the weights file.
        name: registry name to build; None infers it (from the metadata, the state-dict keys or the ONNX graph).
        **kwargs: build kwargs (``embedding_size``, ``blocks``, ``scale``, ...) that override inferred ones.

    Raises:
        ModelError: unreadable file, unknown architecture, or weights that do not fit (missing, unexpected and
            mis-shaped keys listed in one message).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    kind = sniff_format(path)
    if kind == "onnx":
        from facetrain.models.onnx_import import import_onnx

        return import_onnx(path, name=name, **kwargs).eval()
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("backbone"), Mapping):
        state = obj["backbone"]
        if name is None:
            name = obj.get("backbone_name")
            kwargs = {**dict(obj.get("backbone_kwargs") or {}), **kwargs}
            if "embedding_size" in obj:
                kwargs.setdefault("embedding_size", int(obj["embedding_size"]))
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise ModelError(
            f"{path}: neither a facetrain checkpoint (dict with 'backbone') nor a state dict of tensors; "
            "pass a backbone.pth, a facetrain .pt, a TorchScript or an ONNX file"
        )
    state = _strip_prefix(dict(state))
    if name is None:
        name, inferred = infer_architecture(state, source=str(path))
        kwargs = {**inferred, **kwargs}
    model = build_backbone(name, **kwargs)
    load_state_dict_checked(model, state, source=str(path), name=name)
    return model.eval()


def sniff_format(path: Path) -> str:
    """``"onnx"``, ``"torchscript"`` or ``"torch"`` from the file's content (the suffix only breaks ties)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        # torch.jit.save archives hold the model's code; torch.save archives only data.pkl + tensors.
        if any(re.search(r"(^|/)code/", n) for n in names) or any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save pickle
        return "torch"
    return "onnx" if head[:1] == b"\x08" else "torch"  # ONNX ModelProto starts with field 1 (ir_version)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, name: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one ModelError listing every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        raise ModelError(
            f"{source}: weights do not fit backbone {name!r}: "
            f"missing {_summarise(missing)}; unexpected {_summarise(unexpected)}; shape mismatch "
            f"(file vs model) {_summarise(mis_shaped)}; pass the right name/kwargs (e.g. embedding_size) or the "
            "matching file"
        )
    model.load_state_dict(state, strict=True)


def _summarise(items: list[str], limit: int = 5) -> str:
    if not items:
        return "0 keys"
    shown = ", ".join(items[:limit])
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} keys [{shown}{more}]"


def infer_architecture(state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> tuple[str, dict]:
    """Guess the registry name and build kwargs of an arcface_torch / facetrain state dict from its keys and shapes.

    IResNet: blocks per stage from ``layer{1..4}.{j}``; MobileFaceNet: ``scale`` from the stem width and ``blocks``
    from the residual stages; ViT: size from the token width and block count. Embedding size from the last layer.
    """
    keys = set(state)

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        return max(found) + 1 if found else 0

    kwargs: dict = {}
    if "features.layers.3.weight" in state:  # GDC head
        kwargs["embedding_size"] = int(state["features.layers.3.weight"].shape[0])
        head = "gdc"
    elif "features.weight" in state and "fc.weight" in state:  # E head
        kwargs["embedding_size"] = int(state["features.weight"].shape[0])
        head = "e"
    else:
        head = None

    if "layer1.0.conv1.weight" in keys:
        from facetrain.models.iresnet import IRESNET_LAYERS

        layers = tuple(count(f"layer{i}.") for i in range(1, 5))
        depth = next((d for d, lay in IRESNET_LAYERS.items() if lay == layers), None)
        if depth is None:
            raise ModelError(f"{source}: IResNet with {layers} blocks per stage matches no registered depth")
        if head == "gdc":
            kwargs["head"] = "gdc"
        elif head == "e":
            spatial = int(round((state["fc.weight"].shape[1] / 512) ** 0.5))
            if spatial != 7:
                kwargs["input_size"] = spatial * 16
        return f"iresnet{depth}", kwargs

    if "conv_sep.layers.0.weight" in keys and "layers.0.layers.0.weight" in keys:
        scale = int(state["layers.0.layers.0.weight"].shape[0]) // 64
        first = count("layers.1.layers.") if "layers.1.layers.0.layers.0.layers.0.weight" in keys else 1
        blocks = (first, count("layers.3.layers."), count("layers.5.layers."), count("layers.7.layers."))
        kwargs.update(blocks=blocks, scale=scale)
        if head == "e":
            kwargs["head"] = "e"
        return "mobilefacenet", kwargs

    if "patch_embed.proj.weight" in keys and "feature.3.weight" in keys:
        from facetrain.models.vit import VIT_SIZES

        embed_dim = int(state["patch_embed.proj.weight"].shape[0])
        depth = count("blocks.")
        kwargs["embedding_size"] = int(state["feature.3.weight"].shape[0])
        for size, (dim, blocks, _heads) in VIT_SIZES.items():
            if (dim, blocks) == (embed_dim, depth):
                return size, kwargs
        raise ModelError(f"{source}: ViT with width {embed_dim} and {depth} blocks matches no registered size")

    sample = ", ".join(sorted(keys)[:5])
    raise ModelError(
        f"{source}: cannot infer the architecture from keys like [{sample}]; pass name= (one of the registered "
        "backbones) explicitly"
    )
