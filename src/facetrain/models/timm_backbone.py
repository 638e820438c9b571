"""``timm:<name>`` backbones (optional extra ``facetrain[timm]``): a timm feature extractor + GDC or E head at 112x112.

timm is imported lazily; it needs torchvision, which facetrain never installs by default, so a missing or broken timm
raises a one-line DependencyError naming the extra.
"""

from __future__ import annotations

import torch
from torch import nn

from facetrain.errors import DependencyError, ModelError, require
from facetrain.models.heads import GDC, HEADS, EHead


class TimmBackbone(nn.Module):
    """A timm model's final feature map ``(B, C, h, w)`` followed by a GDC or E head: ``(B, 3, 112, 112) -> (B, D)``.

    Args:
        model_name: any timm model name that supports ``features_only`` or ``forward_features`` on 112x112 input.
        embedding_size: D.
        head: ``"gdc"`` or ``"e"``.
        dropout: dropout of the E head.
        gradient_checkpointing: forwarded to timm's ``set_grad_checkpointing``.
        **timm_kwargs: passed to ``timm.create_model`` (``pretrained`` stays False: no network at run time).
    """

    def __init__(
        self,
        model_name: str,
        *,
        embedding_size: int = 512,
        head: str = "gdc",
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        **timm_kwargs,
    ):
        super().__init__()
        timm = _import_timm()
        if head not in HEADS:
            raise ModelError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        try:
            self.body = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="", **timm_kwargs)
        except Exception as exc:
            raise ModelError(f"timm could not build {model_name!r}: {exc}") from exc
        self.embedding_size = embedding_size
        with torch.no_grad():
            was_training = self.body.training
            fmap = self.body.eval().forward_features(torch.zeros(1, 3, 112, 112))
            self.body.train(was_training)
        if fmap.ndim != 4:
            raise ModelError(
                f"timm model {model_name!r} gives a {fmap.ndim}-D feature map; a (B, C, h, w) map is needed"
            )
        channels, side = int(fmap.shape[1]), int(fmap.shape[-1])
        self.num_features = channels
        if head == "gdc":
            self.head = GDC(embedding_size, in_channels=channels, spatial=side)
        else:
            self.head = EHead(embedding_size, in_channels=channels, spatial=side, dropout=dropout)
        self.set_grad_checkpointing(gradient_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Forward to timm's own per-model checkpointing."""
        if hasattr(self.body, "set_grad_checkpointing"):
            self.body.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112) -> (B, C, h, w)``."""
        return self.body.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` normalized RGB -> ``(B, D)`` unnormalized embedding."""
        return self.head(self.forward_features(x))


def build_timm_backbone(model_name: str, embedding_size: int = 512, **kwargs) -> TimmBackbone:
    """Factory behind ``build_backbone("timm:<model_name>")``."""
    return TimmBackbone(model_name, embedding_size=embedding_size, **kwargs)


def _import_timm():
    try:
        import torchvision  # noqa: F401  # timm imports it; say so plainly rather than fail deep inside timm
    except Exception as exc:
        raise DependencyError(
            f"timm backbones need timm, which needs torchvision ({type(exc).__name__}: {exc}); torchvision is not "
            "part of facetrain's install: pip install torchvision 'facetrain[timm]' where a matching wheel exists"
        ) from exc
    return require("timm", "timm", "timm backbones")
