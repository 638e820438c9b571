"""MobileFaceNet, state-dict compatible with arcface_torch's ``backbones/mobilefacenet.py`` (``mbf``).

Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification" (2018): inverted-residual
depthwise blocks (1x1 expand -> 3x3 depthwise -> 1x1 linear projection) at strides 2/2/2/2 (112 -> 7), a 1x1 conv to
512 channels (``conv_sep``) and the GDC head. arcface_torch widens it with ``scale`` (2 for ``mbf``, 4 for
``mbf_large``) and sets stage depths with ``blocks``; both are keyword arguments here.
"""

from __future__ import annotations

import torch
from torch import nn

from facetrain.models._common import CheckpointingMixin
from facetrain.models.heads import HeadMixin, LinearBlock
from facetrain.models.registry import register_backbone


class ConvBlock(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + PReLU (keys ``layers.0/1/2``)."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted residual: 1x1 to ``groups`` channels, depthwise ``kernel`` at ``stride``, linear 1x1 to ``out_c``.

    ``groups`` is the expanded width (arcface_torch's name). With ``residual`` the input is added back.
    """

    def __init__(
        self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1
    ):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual :class:`DepthWise` blocks of width ``c`` (keys ``layers.<i>``)."""

    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(CheckpointingMixin, HeadMixin, nn.Module):
    """MobileFaceNet: ``(B, 3, 112, 112) -> (B, D)``.

    Args:
        embedding_size: D.
        blocks: residual blocks in the four stages (arcface_torch ``mbf``: (1, 4, 6, 2); ``mbf_large``: (2, 8, 12, 4)).
        scale: channel multiplier (``mbf``: 2, ``mbf_large``: 4).
        head: ``"gdc"`` (arcface_torch's layout) or ``"e"``.
        dropout: dropout before the FC of the E head.
        gradient_checkpointing: checkpoint every stage during training.
    """

    def __init__(
        self,
        *,
        embedding_size: int = 512,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        head: str = "gdc",
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.embedding_size = embedding_size
        self.blocks = tuple(blocks)
        self.scale = scale
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=128, kernel=(3, 3), stride=(1, 1)))
        self.layers.extend(
            [
                DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
                Residual(c1, num_block=blocks[1], groups=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
                DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
                Residual(c2, num_block=blocks[2], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
                DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
                Residual(c2, num_block=blocks[3], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.num_features = 512
        self._build_head(head, embedding_size, 512, 7, dropout)
        self.set_grad_checkpointing(gradient_checkpointing)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.head_name == "e":
            nn.init.constant_(self.features.weight, 1.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112) -> (B, 512, 7, 7)``: the stages and ``conv_sep``, before the head."""
        x = self._run_blocks(self.layers, x)
        return self.conv_sep(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` normalized RGB -> ``(B, D)`` unnormalized embedding."""
        return self.forward_head(self.forward_features(x))


@register_backbone(aliases=("mbf",))
def mobilefacenet(embedding_size: int = 512, **kwargs) -> MobileFaceNet:
    """arcface_torch ``mbf``: blocks (1, 4, 6, 2), scale 2, GDC head. Small CPU variant: ``blocks=(1, 2, 2, 1),
    scale=1``."""
    return MobileFaceNet(embedding_size=embedding_size, **kwargs)


@register_backbone(aliases=("mbf_large",))
def mobilefacenet_large(embedding_size: int = 512, **kwargs) -> MobileFaceNet:
    """arcface_torch ``mbf_large``: blocks (2, 8, 12, 4), scale 4."""
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    kwargs.setdefault("scale", 4)
    return MobileFaceNet(embedding_size=embedding_size, **kwargs)
