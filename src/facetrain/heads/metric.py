"""Metric-learning losses: batch-hard / batch-all triplet, center loss, and a weighted sum of named losses.

Triplet losses expect batches holding several images per identity: draw them with
:class:`facetrain.data.samplers.PKSampler` (P identities x K images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetrain.errors import ModelError

__all__ = ["TripletLoss", "CenterLoss", "CompositeLoss", "CompositeOutput", "pairwise_distance", "weighted_sum"]

_DISTANCES = ("cosine", "euclidean")
_MININGS = ("batch_hard", "batch_all")


def pairwise_distance(embeddings: Tensor, distance: str = "cosine", eps: float = 1e-12) -> Tensor:
    """All-pairs distances.

    Args:
        embeddings: (B, D).
        distance: ``"cosine"``: 1 - cos(x_i, x_j) (embeddings normalized here), in [0, 2];
            ``"euclidean"``: ||x_i - x_j||_2 on the embeddings as given (normalize them first for the usual setup).
        eps: floor under the squared distance before the square root, so identical vectors (the diagonal)
            get a finite gradient; it shifts a zero distance to sqrt(eps) = 1e-6.

    Returns:
        (B, B) distances.
    """
    if distance == "cosine":
        unit = F.normalize(embeddings, dim=1)
        return 1.0 - unit @ unit.T
    if distance == "euclidean":
        sq = (embeddings * embeddings).sum(1)
        d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * embeddings @ embeddings.T
        return d2.clamp_min(eps).sqrt()
    raise ModelError(f"distance must be one of {', '.join(_DISTANCES)}, got {distance!r}")


class TripletLoss(nn.Module):
    """Triplet loss with in-batch mining (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss", 2017).

    For an anchor a, positive p (same label, p != a) and negative n (other label), the hinge is
    ``[d(a, p) - d(a, n) + margin]_+``.

    - ``batch_hard``: per anchor, the farthest positive and the nearest negative; mean over anchors that have
      both a positive and a negative.
    - ``batch_all``: every valid (a, p, n); mean over the triplets with a non-zero hinge ("BA != 0" in the paper),
      0 when none is active.

    Args:
        margin: hinge margin, in units of the distance (default 0.2; cosine distance lies in [0, 2]).
        distance: ``"cosine"`` or ``"euclidean"`` (see :func:`pairwise_distance`).
        mining: ``"batch_hard"`` or ``"batch_all"``.
    """

    def __init__(self, *, margin: float = 0.2, distance: str = "cosine", mining: str = "batch_hard") -> None:
        super().__init__()
        if distance not in _DISTANCES:
            raise ModelError(f"distance must be one of {', '.join(_DISTANCES)}, got {distance!r}")
        if mining not in _MININGS:
            raise ModelError(f"mining must be one of {', '.join(_MININGS)}, got {mining!r}")
        if not float(margin) >= 0:
            raise ModelError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.distance = distance
        self.mining = mining

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, mining={self.mining!r}"

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar loss.

        Args:
            embeddings: (B, D).
            labels: (B,) int identities.
        """
        labels = labels.reshape(-1)
        if embeddings.dim() != 2 or labels.numel() != embeddings.shape[0]:
            raise ModelError(
                f"TripletLoss: embeddings must be (B, D) with B labels, got {tuple(embeddings.shape)} "
                f"and {labels.numel()} labels"
            )
        dist = pairwise_distance(embeddings, self.distance)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive = same & ~eye
        negative = ~same
        if self.mining == "batch_hard":
            hardest_pos = dist.masked_fill(~positive, -math.inf).amax(1)
            hardest_neg = dist.masked_fill(~negative, math.inf).amin(1)
            valid = positive.any(1) & negative.any(1)
            if not valid.any():
                return dist.sum() * 0.0
            return F.relu(hardest_pos[valid] - hardest_neg[valid] + self.margin).mean()
        # batch_all: (a, p, n) cube of hinges, masked to valid triplets
        hinge = dist.unsqueeze(2) - dist.unsqueeze(1) + self.margin
        valid = positive.unsqueeze(2) & negative.unsqueeze(1)
        losses = F.relu(hinge[valid])
        active = losses > 0
        if not active.any():
            return dist.sum() * 0.0
        return losses[active].mean()


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): ``L = 1/2 * mean_i ||x_i - c_{y_i}||^2``.

    Two ways to learn the centres:

    - ``alpha=None``: ``centres`` is an ``nn.Parameter`` trained by your optimizer (gradient ``c - x`` per sample).
    - ``alpha`` in (0, 1] (paper, eq. 4): ``centres`` is a buffer; in training mode, after the loss is computed,
      ``c_j <- c_j - alpha * sum_{i: y_i = j}(c_j - x_i) / (1 + n_j)``. The sums and counts are all-reduced across
      ranks when a process group is initialized (costs one (C, D) all-reduce per step). The loss then
      differentiates only the embeddings.

    Weigh it against the softmax loss with :class:`CompositeLoss` (the paper's lambda).

    Args:
        num_classes: C.
        embedding_size: D.
        alpha: centre learning rate of the paper's update, or None for optimizer-trained centres (default 0.5).
    """

    def __init__(self, num_classes: int, embedding_size: int, *, alpha: float | None = 0.5) -> None:
        super().__init__()
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ModelError(f"CenterLoss needs num_classes, embedding_size >= 1, got {num_classes}, {embedding_size}")
        if alpha is not None and not 0.0 < float(alpha) <= 1.0:
            raise ModelError(f"CenterLoss alpha must be in (0, 1] or None, got {alpha}")
        self.alpha = None if alpha is None else float(alpha)
        centres = torch.randn(int(num_classes), int(embedding_size)) * 0.01
        if self.alpha is None:
            self.centres = nn.Parameter(centres)
        else:
            self.register_buffer("centres", centres)

    def extra_repr(self) -> str:
        return f"num_classes={self.centres.shape[0]}, embedding_size={self.centres.shape[1]}, alpha={self.alpha}"

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar loss for (B, D) embeddings and (B,) labels in [0, C)."""
        labels = labels.reshape(-1).long()
        if embeddings.shape[1:] != self.centres.shape[1:] or labels.numel() != embeddings.shape[0]:
            raise ModelError(
                f"CenterLoss: expected (B, {self.centres.shape[1]}) embeddings with B labels, "
                f"got {tuple(embeddings.shape)} and {labels.numel()} labels"
            )
        centres = self.centres[labels].to(embeddings.dtype)
        loss = 0.5 * ((embeddings - centres) ** 2).sum(1).mean()
        if self.alpha is not None and self.training:
            self._update_centres(embeddings.detach(), labels)
        return loss

    @torch.no_grad()
    def _update_centres(self, embeddings: Tensor, labels: Tensor) -> None:
        diff = torch.zeros_like(self.centres, dtype=torch.float64)
        diff.index_add_(0, labels, (self.centres[labels] - embeddings).double())
        counts = torch.zeros(self.centres.shape[0], dtype=torch.float64, device=self.centres.device)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(diff)
            torch.distributed.all_reduce(counts)
        step = self.alpha * diff / (1.0 + counts).unsqueeze(1)
        self.centres.sub_(step.to(self.centres.dtype))


@dataclass
class CompositeOutput:
    """Result of :class:`CompositeLoss`.

    Attributes:
        total: scalar, sum of weight * loss (differentiable).
        parts: each named loss, detached (for logging).
    """

    total: Tensor
    parts: dict[str, Tensor]


def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum_name weights[name] * losses[name]``; every weighted name must be present, and every loss weighted."""
    missing = sorted(set(weights) - set(losses))
    unweighted = sorted(set(losses) - set(weights))
    if missing or unweighted:
        raise ModelError(
            "loss weights and losses disagree: "
            + (f"no loss computed for {missing}; " if missing else "")
            + (f"no weight given for {unweighted}; " if unweighted else "")
            + f"weights cover {sorted(weights)}"
        )
    terms = [float(w) * losses[name] for name, w in weights.items() if float(w) != 0.0]
    if not terms:
        raise ModelError("every loss weight is 0: give at least one loss a non-zero weight")
    return torch.stack([t.reshape(()) for t in terms]).sum()


class CompositeLoss(nn.Module):
    """Weighted sum of named scalar losses, e.g. ``{"margin": 1.0, "triplet": 0.5, "magface_g": 1.0}``.

    Compute each loss yourself (a margin's cross-entropy, ``MarginOutput.aux_loss``, a triplet loss, a
    distillation loss ...) and pass them by name; the names must match the weights exactly, so a typo fails loudly.

    Args:
        weights: name -> weight (>= 0; 0 keeps the term in ``parts`` for logging but out of the total).
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        if not weights:
            raise ModelError("CompositeLoss needs at least one weight, e.g. {'margin': 1.0}")
        for name, w in weights.items():
            if not float(w) >= 0:
                raise ModelError(f"loss weight '{name}' must be >= 0, got {w}")
        self.weights = {str(k): float(v) for k, v in weights.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.weights.items())

    def forward(self, losses: Mapping[str, Tensor]) -> CompositeOutput:
        """Weighted total and detached parts of ``losses`` (name -> scalar)."""
        total = weighted_sum(losses, self.weights)
        return CompositeOutput(total, {name: value.detach() for name, value in losses.items()})
