"""Improved ResNet (IResNet) for 112x112 faces, state-dict compatible with arcface_torch's ``backbones/iresnet.py``.

Duta et al., "Improved Residual Networks" (2020) as adapted by InsightFace: pre-activation residual blocks
``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` plus identity (or a 1x1 conv + BN projection), a stride-1
3x3 stem, four stages of stride 2 (112 -> 7), then the E head (BN -> Dropout -> FC -> BN1d with scale frozen at 1).
Parameter names, shapes, BatchNorm eps (1e-5) and forward math equal arcface_torch's, so its released
``backbone.pth`` files load with ``strict=True`` and give the same embeddings. arcface_torch's ``fp16`` flag is not
reproduced: mixed precision is the caller's ``torch.autocast``.
"""

from __future__ import annotations

import torch
from torch import nn

from facetrain.models._common import CheckpointingMixin
from facetrain.models.heads import HeadMixin
from facetrain.models.registry import register_backbone

#: Blocks per stage for each depth (arcface_torch's iresnet18 ... iresnet200).
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
_BN_EPS = 1e-05


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """``out = BN3(conv2_s(PReLU(BN2(conv1(BN1(x)))))) + shortcut(x)``; ``(B, C_in, H, W) -> (B, C, H/s, W/s)``.

    Note the stride sits on the second conv, as in arcface_torch.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(CheckpointingMixin, HeadMixin, nn.Module):
    """IResNet backbone: ``(B, 3, 112, 112) -> (B, D)``.

    Args:
        layers: blocks in each of the four stages.
        embedding_size: D.
        dropout: dropout probability before the FC of the E head (arcface_torch uses 0; 0.4 in some papers).
        head: ``"e"`` (arcface_torch's layout) or ``"gdc"``.
        zero_init_residual: start each block's last BN scale at 0 (arcface_torch zeroes ``bn2`` of each block).
        gradient_checkpointing: checkpoint every block during training.
        input_size: square input side; the head's FC expects ``(input_size / 16) ** 2`` positions.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        head: str = "e",
        zero_init_residual: bool = False,
        gradient_checkpointing: bool = False,
        input_size: int = 112,
    ):
        super().__init__()
        self.layers_per_stage = tuple(layers)
        self.embedding_size = embedding_size
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=_BN_EPS)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.num_features = 512  # channels of forward_features' map
        self._build_head(head, embedding_size, 512, input_size // 16, dropout)
        self.set_grad_checkpointing(gradient_checkpointing)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=_BN_EPS),
            )
        stage = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112) -> (B, 512, 7, 7)``: stem and the four stages, before the head."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_blocks(stage, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` normalized RGB -> ``(B, D)`` unnormalized embedding."""
        return self.forward_head(self.forward_features(x))


def _iresnet(depth: int, embedding_size: int, **kwargs) -> IResNet:
    return IResNet(IRESNET_LAYERS[depth], embedding_size=embedding_size, **kwargs)


@register_backbone(aliases=("r18",))
def iresnet18(embedding_size: int = 512, **kwargs) -> IResNet:
    """IResNet-18 (arcface_torch ``r18``)."""
    return _iresnet(18, embedding_size, **kwargs)


@register_backbone(aliases=("r34",))
def iresnet34(embedding_size: int = 512, **kwargs) -> IResNet:
    """IResNet-34 (arcface_torch ``r34``)."""
    return _iresnet(34, embedding_size, **kwargs)


@register_backbone(aliases=("r50",))
def iresnet50(embedding_size: int = 512, **kwargs) -> IResNet:
    """IResNet-50 (arcface_torch ``r50``; InsightFace's ``w600k_r50``)."""
    return _iresnet(50, embedding_size, **kwargs)


@register_backbone(aliases=("r100",))
def iresnet100(embedding_size: int = 512, **kwargs) -> IResNet:
    """IResNet-100 (arcface_torch ``r100``)."""
    return _iresnet(100, embedding_size, **kwargs)


@register_backbone(aliases=("r200",))
def iresnet200(embedding_size: int = 512, **kwargs) -> IResNet:
    """IResNet-200 (arcface_torch ``r200``)."""
    return _iresnet(200, embedding_size, **kwargs)
