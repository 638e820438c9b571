"""``demo_cnn``: a plain CNN backbone for CPU demos and tests.

About 10x cheaper per image on a CPU than the smallest MobileFaceNet (depthwise convolutions are slow on CPUs), so
``facetrain demo`` shows real learning within a few minutes on 2 cores. Not meant for real face recognition.
"""

from __future__ import annotations

import torch
from torch import nn

from facetrain.models._common import CheckpointingMixin
from facetrain.models.registry import register_backbone


class DemoCNN(CheckpointingMixin, nn.Module):
    """A plain CNN for CPU demos: ``(B, 3, 112, 112) -> (B, D)``.

    Four stages of ``conv3x3 stride 2 -> BN -> PReLU -> conv3x3 -> BN -> PReLU`` (112 -> 56 -> 28 -> 14 -> 7, widths
    ``width * (1, 2, 4, 8)``), then the E head of IResNet (BN2d -> flatten -> FC -> BN1d). About 40 M multiply-adds
    per image at ``width=16``.

    Args:
        embedding_size: D.
        width: channels of the first stage.
        dropout: dropout before the FC.
        gradient_checkpointing: checkpoint every stage during training.
    """

    def __init__(
        self,
        *,
        embedding_size: int = 128,
        width: int = 16,
        dropout: float = 0.0,
        input_size: int = 112,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, in_c = [], 3
        for out_c in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_c, out_c, 3, 2, 1, bias=False),
                    nn.BatchNorm2d(out_c),
                    nn.PReLU(out_c),
                    nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(out_c),
                    nn.PReLU(out_c),
                )
            )
            in_c = out_c
        self.stages = nn.Sequential(*stages)
        spatial = -(-input_size // 16)
        self.num_features = in_c
        self.bn2 = nn.BatchNorm2d(in_c)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_c * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        # He init keeps activations at unit scale through the stack, so even the untrained network's embeddings
        # spread out instead of collapsing onto the FC bias.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.set_grad_checkpointing(gradient_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112) -> (B, 8*width, 7, 7)``."""
        return self._run_blocks(self.stages, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` normalized RGB -> ``(B, D)`` unnormalized embedding."""
        x = self.dropout(self.bn2(self.forward_features(x)))
        return self.features(self.fc(torch.flatten(x, 1)))


@register_backbone(name="demo_cnn")
def _demo_cnn(embedding_size: int = 128, **kwargs) -> DemoCNN:
    """``demo_cnn``: :class:`DemoCNN`, the CPU demo backbone (kwargs: ``width``, ``dropout``)."""
    return DemoCNN(embedding_size=embedding_size, **kwargs)
