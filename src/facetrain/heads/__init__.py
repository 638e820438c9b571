"""facetrain.heads: margin softmax heads, metric losses and distillation losses.

- :func:`build_margin` (``margins``): ArcFace, CosFace, combined, SphereFace, CurricularFace, AdaFace, MagFace,
  sub-center, softmax; :func:`interclass_filter`, :func:`subcenter_max`.
- ``metric``: :class:`TripletLoss`, :class:`CenterLoss`, :class:`CompositeLoss` (weighted sum of named losses).
- ``distill``: cosine / L2 / KL distillation losses with an optional learnable projection.
"""

from facetrain.heads.distill import CosineDistillLoss, KLDistillLoss, L2DistillLoss, build_distill_loss
from facetrain.heads.margins import (
    Margin,
    MarginOutput,
    build_margin,
    interclass_filter,
    list_margins,
    subcenter_max,
)
from facetrain.heads.metric import CenterLoss, CompositeLoss, CompositeOutput, TripletLoss, weighted_sum

__all__ = [
    "CenterLoss",
    "CompositeLoss",
    "CompositeOutput",
    "CosineDistillLoss",
    "KLDistillLoss",
    "L2DistillLoss",
    "Margin",
    "MarginOutput",
    "TripletLoss",
    "build_distill_loss",
    "build_margin",
    "interclass_filter",
    "list_margins",
    "subcenter_max",
    "weighted_sum",
]
