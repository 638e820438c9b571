"""Pieces every backbone family shares: optional gradient checkpointing (per instance, never a global)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointingMixin:
    """Adds ``set_grad_checkpointing`` (timm's name) and a runner that checkpoints each block when enabled.

    Checkpointing recomputes a block's forward during backward instead of keeping its activations: same gradients,
    less memory, about a third more compute. Dropout / DropPath masks are replayed exactly (RNG state is preserved);
    BatchNorm running statistics are updated a second time by the recomputation (momentum applied twice), as in
    timm and arcface_torch.
    """

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block gradient checkpointing on or off for this instance."""
        self.grad_checkpointing = bool(enable)

    def _run_blocks(self, blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()  # type: ignore[attr-defined]
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x
