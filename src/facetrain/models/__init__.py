"""Face-recognition backbones: a registry (``build_backbone``, ``list_backbones``) and weight loading.

Input ``(B, 3, 112, 112)`` float RGB normalized as ``(x / 255 - 0.5) / 0.5``; output ``(B, D)`` unnormalized
embedding. Names and state-dict keys of ``r18``..``r200``, ``mbf`` and ``vit_*`` match arcface_torch, so its
``backbone.pth`` files load as they are (``load_backbone``).
"""

from facetrain.models.loading import infer_architecture, load_backbone, save_backbone
from facetrain.models.registry import (
    backbone_factory,
    build_backbone,
    canonical_name,
    list_backbones,
    register_backbone,
    register_variant,
)

__all__ = [
    "backbone_factory",
    "build_backbone",
    "canonical_name",
    "infer_architecture",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "register_variant",
    "save_backbone",
]
