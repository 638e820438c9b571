"""Embedding heads that turn a ``(B, C, 7, 7)`` feature map into a ``(B, D)`` embedding.

- **E** (Deng et al., "ArcFace", CVPR 2019, Sec. 3.3 "Option-E"): BN -> Dropout -> FC -> BN1d. It is the head of
  arcface_torch's IResNet, whose last BatchNorm1d keeps its scale fixed at 1.0 (``features.weight`` frozen).
- **GDC**, global depthwise convolution (Chen et al., "MobileFaceNets", 2018): a 7x7 depthwise conv + BN over the
  map, then a bias-free FC and BN1d. It is arcface_torch's MobileFaceNet head.
"""

from __future__ import annotations

import torch
from torch import nn

from facetrain.errors import ModelError

HEADS = ("e", "gdc")


class LinearBlock(nn.Module):
    """Conv2d (no bias) + BatchNorm2d, no activation (arcface_torch's ``LinearBlock``; keys ``layers.0/1``)."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: ``(B, C, 7, 7) -> (B, D)``. Keys match arcface_torch's ``GDC`` for C=512."""

    def __init__(self, embedding_size: int, in_channels: int = 512, spatial: int = 7):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(in_channels, in_channels, kernel=(spatial, spatial), groups=in_channels),
            nn.Flatten(),
            nn.Linear(in_channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EHead(nn.Module):
    """BN2d -> Dropout -> flatten -> FC -> BN1d (scale frozen at 1): ``(B, C, S, S) -> (B, D)``.

    Attribute names (``bn2``, ``dropout``, ``fc``, ``features``) are those of arcface_torch's IResNet tail.
    """

    def __init__(self, embedding_size: int, in_channels: int = 512, spatial: int = 7, dropout: float = 0.0):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


class HeadMixin:
    """Gives a CNN family a selectable head with arcface_torch's attribute names.

    ``head="e"`` adds top-level ``bn2``, ``dropout``, ``fc`` and ``features`` (BatchNorm1d) exactly as arcface_torch's
    IResNet; ``head="gdc"`` adds ``features`` = :class:`GDC` exactly as its MobileFaceNet. So both released layouts
    load as they are and either family can wear either head.
    """

    head_name: str

    def _build_head(self, head: str, embedding_size: int, in_channels: int, spatial: int, dropout: float) -> None:
        if head not in HEADS:
            raise ModelError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        self.head_name = head
        if head == "gdc":
            self.features = GDC(embedding_size, in_channels=in_channels, spatial=spatial)
            return
        e = EHead(embedding_size, in_channels=in_channels, spatial=spatial, dropout=dropout)
        self.bn2, self.dropout, self.fc, self.features = e.bn2, e.dropout, e.fc, e.features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` feature map -> ``(B, D)`` embedding."""
        if self.head_name == "gdc":
            return self.features(x)
        return EHead.forward(self, x)  # type: ignore[arg-type]  # same attributes, same math
