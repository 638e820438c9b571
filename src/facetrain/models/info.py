"""Parameter and FLOP counts of registered backbones (for ``facetrain models`` and the docs table)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facetrain.models.registry import build_backbone, canonical_name


@dataclass(frozen=True)
class BackboneSummary:
    """What a backbone costs: trainable + frozen parameters, state-dict entries, forward FLOPs at 1x3x112x112."""

    name: str
    class_name: str
    embedding_size: int
    params: int
    state_keys: int
    gflops: float | None


def backbone_summary(name: str, *, embedding_size: int = 512, flops: bool = True, **kwargs) -> BackboneSummary:
    """Count parameters and optionally the FLOPs of one forward pass, both on the meta device (no memory, instant).

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmul / conv / attention; one multiply-add counts
    as 2 FLOPs; normalisation and activations are not counted), in eval mode at batch 1. On the meta device attention
    runs as plain matmuls and is counted (the CPU fused-attention kernel is not).
    """
    with torch.device("meta"):
        meta = build_backbone(name, embedding_size=embedding_size, **kwargs)
    params = sum(p.numel() for p in meta.parameters())
    gflops = None
    if flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            meta.eval()(torch.zeros(1, 3, 112, 112, device="meta"))
        gflops = counter.get_total_flops() / 1e9
    return BackboneSummary(
        name=canonical_name(name),
        class_name=type(meta).__name__,
        embedding_size=embedding_size,
        params=params,
        state_keys=len(meta.state_dict()),
        gflops=gflops,
    )
