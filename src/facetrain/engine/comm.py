"""Process-group helpers that fall back to world size 1 (detectron2-style ``comm``).

Nothing here creates a process group at import. Every helper works without ``torch.distributed`` initialized (one
CPU or GPU process): world size 1, rank 0, reductions and gathers return their input. ``group=None`` means the
default group. Under ``torchrun`` call :func:`init_distributed_from_env` once at start-up.

Gradient semantics of :func:`all_gather_with_grad` (the one differentiable collective): every rank computes its own
loss ``L_r`` from the gathered ``(B_global, D)`` tensor; the backward pass returns to each rank the rows of its own
input in ``sum_r dL_r / dX_global``. When the ranks' losses are the pieces of one distributed loss (Partial FC: each
rank's graph holds the logits of its own class centres) that sum is exactly the gradient of that loss with respect
to this rank's rows, as if one process had computed everything.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# The collectives Partial FC needs live beside it (heads must not import engine); this module is their public home.
from facetrain.heads import partial_fc as _collectives

__all__ = [
    "all_gather_object",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "free_port",
    "gather_sizes",
    "get_rank",
    "get_world_size",
    "init_distributed_from_env",
    "is_distributed",
    "is_main_process",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def is_main_process() -> bool:
    """True on global rank 0 (and always without a process group)."""
    return get_rank() == 0


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group``; no-op at world size 1."""
    if get_world_size(group) > 1:
        dist.barrier(group=group)


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Element-wise sum over ranks, as a new tensor (the input is not modified; no gradient)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group) if get_world_size(group) > 1 else tensor.clone()


def all_reduce_max(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Element-wise maximum over ranks, as a new tensor (the input is not modified; no gradient)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group) if get_world_size(group) > 1 else tensor.clone()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    out = tensor.detach().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def gather_sizes(size: int, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's ``size`` (e.g. its batch size), in rank order; ``[size]`` at world size 1."""
    return _collectives.gather_sizes(size, device, group)


def all_gather_tensor(tensor: Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (no gradient).

    Args:
        tensor: (B_local, ...) this rank's rows; B_local may differ between ranks (trailing dims may not).
        group: process group (default group when None).
        sizes: every rank's B_local if already known (saves one small collective), else gathered.

    Returns:
        (sum of B_local, ...) tensor; the input itself at world size 1.
    """
    return _collectives.all_gather_tensor(tensor, group, sizes)


def all_gather_with_grad(
    tensor: Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> Tensor:
    """Differentiable all-gather of rows (e.g. embeddings for Partial FC).

    Gradient: this rank receives its own rows of the SUM over ranks of the gradients each rank's loss sends to the
    gathered tensor (see the module docstring). With DDP also averaging the backbone over W ranks, the backbone's
    gradient is the one-process gradient divided by W (arcface_torch behaves the same).

    Args:
        tensor: (B_local, D) this rank's rows; B_local may differ between ranks.
        group: process group (default group when None).
        sizes: every rank's B_local if known, else gathered (one small collective).

    Returns:
        (B_global, D) rows of every rank in rank order; ``tensor`` itself at world size 1.
    """
    return _collectives.all_gather_with_grad(tensor, group, sizes)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` at world size 1)."""
    world = get_world_size(group)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself at world size 1)."""
    if get_world_size(group) == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group from torchrun's environment variables.

    Uses ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (``init_method="env://"``). The
    backend defaults to NCCL when CUDA is available (and selects ``cuda:LOCAL_RANK``), else Gloo.

    Args:
        backend: force a backend ("gloo", "nccl").

    Returns:
        True when a process group is initialized (now or already), False when not launched by torchrun (nothing is
        initialized then; the helpers above behave as world size 1).
    """
    if is_distributed():
        return True
    if not dist.is_available() or any(name not in os.environ for name in _TORCHRUN_VARS):
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    logger.debug("process group initialized: backend=%s rank=%d world=%d", backend, get_rank(), get_world_size())
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for tests that start a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
