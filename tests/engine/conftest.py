"""Shared pieces of the trainer tests: a tiny backbone without BatchNorm and a one-thread torch fixture."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNoBN(nn.Module):
    """A backbone without batch statistics: a batch of 8 and two micro-batches of 4 give the same gradient, and few
    kernels to compile (no BatchNorm on tiny batches to amplify eager-vs-compiled rounding differences)."""

    def __init__(self, embedding_size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def register_tiny_nobn(name: str) -> None:
    """Register :class:`TinyNoBN` as backbone ``name`` (once per process)."""
    from facetrain.models import list_backbones
    from facetrain.models.registry import register_backbone

    if name not in list_backbones():
        register_backbone(lambda embedding_size=8, **kw: TinyNoBN(embedding_size), name=name)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the runs compared are small; threads only add noise and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
