"""Export a backbone to TorchScript (``torch.jit.trace``), loadable with ``torch.jit.load`` without facetrain.

The archive carries ``facetrain.json`` as an extra file: embedding size, input layout, mean/std, version and the
source checkpoint's SHA-256, the same facts the ONNX export stores in its metadata.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from facetrain.errors import ModelError
from facetrain.export.onnx import INPUT_MEAN, INPUT_STD
from facetrain.fileio import atomic_path

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["export_torchscript", "read_torchscript_metadata"]

METADATA_FILE = "facetrain.json"


def export_torchscript(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    input_size: int = 112,
    source_sha256: str | None = None,
    name: str | None = None,
    check_tolerance: float = 1e-4,
) -> Path:
    """Trace ``model`` on a (2, 3, S, S) input and save it atomically; the traced module is checked against eager.

    Args:
        model: maps (B, 3, S, S) normalized RGB to (B, D); already a ScriptModule is saved as is.
        out: destination path (``.pt`` / ``.torchscript``).
        input_size: S.
        source_sha256: SHA-256 of the checkpoint, stored in ``facetrain.json``.
        name: model name for the metadata.
        check_tolerance: max abs difference allowed between traced and eager outputs on a batch of 3.

    Returns:
        The written path.

    Raises:
        ModelError: tracing fails or the traced module disagrees with the eager one.
    """
    import torch

    out = Path(out)
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit is deprecated, still supported
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # traced vs eager is compared below
        if isinstance(model, torch.jit.ScriptModule):
            scripted = model
        else:
            try:
                scripted = torch.jit.trace(model, example, check_trace=False)
            except Exception as exc:  # tracer errors are RuntimeErrors with long messages
                raise ModelError(f"TorchScript tracing failed: {str(exc).strip().splitlines()[0]}") from exc
        probe = torch.randn(3, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        eager = _first(model(probe))
        traced = _first(scripted(probe))
    diff = float((eager - traced).abs().max())
    if diff > check_tolerance:
        raise ModelError(f"traced module differs from eager by {diff:.3g} (> {check_tolerance}); the model is dynamic")
    meta = {
        "embedding_size": int(eager.shape[1]),
        "input_layout": f"NCHW RGB float32 {input_size}x{input_size}",
        "input_mean": INPUT_MEAN,
        "input_std": INPUT_STD,
        "version": _version(),
        "source_sha256": source_sha256 or "random-init",
        "model": name or type(model).__name__,
    }
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
    logger.info("wrote %s (traced, max |traced - eager| = %.2g)", out, diff)
    return out


def read_torchscript_metadata(path: str | os.PathLike) -> dict:
    """The ``facetrain.json`` stored by :func:`export_torchscript` (empty dict for other TorchScript files)."""
    import torch

    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelError(f"{path}: not a TorchScript archive ({str(exc).strip().splitlines()[0]})") from exc
    return json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _version() -> str:
    from facetrain import __version__

    return str(__version__)
