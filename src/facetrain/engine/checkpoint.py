"""Training checkpoints: atomic, world-size independent, tensors and primitives only.

A checkpoint is one ``torch.save``-d dict that ``torch.load(path, weights_only=True)`` reads. Keys:

- the model contract (read by :func:`facetrain.models.load_backbone` and the other tools): ``format``, ``step``,
  ``backbone_name``, ``backbone_kwargs``, ``embedding_size``, ``num_classes``, ``subcenter_k``, ``backbone``
  (state dict), ``class_centres`` ((C*K, D), every centre in global class order, row ``c*K + k``), ``config``;
- what an exact resume needs: ``optimizer`` (a torch optimizer state dict whose per-centre tensors, e.g. SGD
  momentum or Adam moments of the class centres, are gathered into (C*K, D) in global class order), ``scaler``
  (GradScaler), ``margin`` (margin buffers: CurricularFace t, AdaFace statistics), ``head_sample_step`` (Partial FC
  sampling counter), ``data`` (the sampler's epoch and position in it), ``rng`` (torch, numpy, python and cuda
  generator states of every rank), ``hooks`` (each hook's state), ``distill`` (projection weights, if any),
  ``world_size`` and ``progress`` (images seen, training seconds).

Because the class centres and their optimizer state are stored whole, a run written by W ranks resumes on any
number of ranks. On the same W every rank restores its own RNG states: the run continues exactly. On another W the
data order continues where it stopped (no sample of the epoch repeated) and each rank's torch / numpy / python
streams restart from a seed derived from ``(train.seed, step, rank)``: repeatable (the same checkpoint resumed twice
on W' ranks gives the same run), but not the streams a straight W' run would have had, which never existed. Only
dropout / drop-path draw from those streams; Partial FC sampling is seeded by ``(seed, rank, step)`` and
augmentation by ``(seed, epoch, sample)``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facetrain.errors import FacetrainError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "write_checkpoint",
    "read_checkpoint",
    "find_resume_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "gather_optimizer_state",
    "load_optimizer_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "facetrain.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


def write_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    A reader (or a resume after ``kill -9``) sees either the previous complete file or the new complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint on the CPU with ``weights_only=True``.

    Raises:
        FacetrainError: missing or unreadable file, or not a facetrain training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FacetrainError(f"{path}: no such checkpoint; pass --resume auto or a checkpoint.pt written by train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FacetrainError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FacetrainError(f"{path}: not a facetrain training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def find_resume_checkpoint(resume: str | None, out_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``--resume`` means: None/"" -> none; ``auto`` -> ``out_dir/checkpoint.pt`` if it exists;
    anything else is a path (a folder means its ``checkpoint.pt``)."""
    if not resume:
        return None
    if resume == "auto":
        candidate = Path(out_dir) / CHECKPOINT_NAME
        return candidate if candidate.is_file() else None
    path = Path(resume)
    return path / CHECKPOINT_NAME if path.is_dir() else path


# ---------------------------------------------------------------------------------------------------------------------
# RNG states (tensors and primitives, so weights_only loads them)


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy global and python ``random`` generator states of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer state with the class-centre rows gathered / re-sharded


def _param_index(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> int | None:
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return index
            index += 1
    return None


def gather_optimizer_state(optimizer: torch.optim.Optimizer, head: nn.Module) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` on the CPU with the state of ``head.weight`` (the sharded class centres) gathered
    into (C*K, ...) tensors in global class order.

    Collective when ``head`` is sharded (every rank calls it); returns the dict on rank 0 (every rank at world size
    1) and None elsewhere.
    """
    state = optimizer.state_dict()
    centre_index = _param_index(optimizer, head.weight)
    local_rows = head.weight.shape[0]
    rank = getattr(head, "rank", 0)
    centre_state = state["state"].get(centre_index, {}) if centre_index is not None else {}
    # Every rank has the same keys in the same order (same optimizer), so the collectives line up.
    gathered = {}
    for key in sorted(centre_state):
        value = centre_state[key]
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == local_rows:
            gathered[key] = head.gather_full(value, dst=0)
    if rank != 0:
        return None
    out: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for index, per_param in state["state"].items():
        entry = {}
        for key, value in per_param.items():
            if index == centre_index and key in gathered:
                value = gathered[key]
            entry[key] = value.detach().cpu() if torch.is_tensor(value) else value
        out["state"][index] = entry
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, head: nn.Module, saved: dict[str, Any]) -> None:
    """Load what :func:`gather_optimizer_state` wrote (any world size) into ``optimizer``, slicing this rank's rows
    of the class-centre state."""
    centre_index = _param_index(optimizer, head.weight)
    full_rows = head.num_classes * head.subcenter_k
    state: dict[str, Any] = {"state": {}, "param_groups": saved["param_groups"]}
    for index, per_param in saved["state"].items():
        entry = {}
        for key, value in per_param.items():
            if (
                int(index) == centre_index
                and torch.is_tensor(value)
                and value.dim() >= 1
                and value.shape[0] == full_rows
            ):
                value = head.local_rows(value).clone()
            entry[key] = value
        state["state"][int(index)] = entry
    optimizer.load_state_dict(state)
