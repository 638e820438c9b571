"""Margin-based softmax heads: cosine logits in, margin-adjusted logits out.

Every margin is a small ``nn.Module`` called as ``margin(cos, labels, norms=None) -> MarginOutput`` where

- ``cos`` (B, C): cosine similarities in [-1, 1] between normalized embeddings and (sampled) class centres,
- ``labels`` (B,): column of the target class, or ``-1`` when the row's class is not in this shard (Partial FC),
- ``norms`` (B,): unnormalized embedding norms, only for the norm-aware margins (AdaFace, MagFace).

The output logits go straight into a softmax cross-entropy. Notation: theta = arccos(cos), y = target column,
s = scale. Angles are radians. No margin edits its inputs in place; running statistics live in registered buffers
(saved in ``state_dict``) and are all-reduced across ranks when a process group is initialized.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from facetrain.errors import ModelError, closest

__all__ = [
    "MarginOutput",
    "Margin",
    "ArcFace",
    "CosFace",
    "CombinedMargin",
    "SphereFace",
    "CurricularFace",
    "AdaFace",
    "MagFace",
    "SoftmaxHead",
    "monotonic_cos_margin",
    "safe_arccos",
    "build_margin",
    "list_margins",
    "interclass_filter",
    "subcenter_max",
]


@dataclass
class MarginOutput:
    """What a margin returns.

    Attributes:
        logits: (B, C) logits for softmax cross-entropy.
        aux_loss: scalar to ADD to the cross-entropy (MagFace: ``lambda_g * mean(g(a))``), else None.
    """

    logits: Tensor
    aux_loss: Tensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# Factory


def build_margin(
    name: str,
    *,
    subcenter_k: int = 1,
    interclass_filtering_threshold: float = 0.0,
    **kwargs,
) -> Margin:
    """Build a margin by name.

    Args:
        name: one of :func:`list_margins` (``arcface``, ``cosface``, ``combined``, ``sphereface``,
            ``curricularface``, ``adaface``, ``magface``, ``subcenter``, ``softmax``).
        subcenter_k: sub-centres per class K; when > 1 the input has C*K columns (class-major, row = c*K + k) and
            :func:`subcenter_max` reduces it to C columns before the margin (Sub-center ArcFace, Deng et al. 2020).
        interclass_filtering_threshold: tau of Partial FC v2's inter-class filtering (0 disables), see
            :func:`interclass_filter`; applied after the sub-centre max, before the margin.
        **kwargs: keyword-only hyper-parameters of the chosen margin (see its class docstring). The combined-margin
            names ``multiplicative_margin`` (m1), ``angular_margin`` (m2), ``additive_margin`` (m3) and
            ``exact_gradient`` may be passed to every margin: a margin without one of them accepts it at its
            neutral value (1, 0, 0; any ``exact_gradient``) and raises otherwise, instead of ignoring it silently.

    Returns:
        The margin module.

    Raises:
        ModelError: unknown name or invalid hyper-parameter.
    """
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        hint = closest(key, _REGISTRY)
        raise ModelError(
            f"unknown margin '{name}'"
            + (f" (did you mean '{hint}'?)" if hint else "")
            + f"; known margins: {', '.join(sorted(_REGISTRY))}"
        )
    factory, defaults = _REGISTRY[key]
    if key == "subcenter" and subcenter_k == 1:
        subcenter_k = defaults["subcenter_k"]
    kwargs = _drop_neutral(name, factory, kwargs)
    try:
        return factory(subcenter_k=subcenter_k, interclass_filtering_threshold=interclass_filtering_threshold, **kwargs)
    except TypeError as exc:
        raise ModelError(f"margin '{name}': {exc}; see help(facetrain.heads.margins.{factory.__name__})") from exc


#: Combined-margin parameters at the value that means "no such margin": a config written in m1/m2/m3 terms may pass
#: them to every method; a method without that parameter accepts it only at this value.
_NEUTRAL = {"multiplicative_margin": 1.0, "angular_margin": 0.0, "additive_margin": 0.0}


def _drop_neutral(name: str, factory: Callable[..., Margin], kwargs: dict) -> dict:
    """Remove m1/m2/m3 the chosen margin does not take when they are neutral (and ``exact_gradient``, which only
    ArcFace distinguishes: every other margin's gradient is exact); a non-neutral one is an error."""
    accepted = set(inspect.signature(factory).parameters)
    kept = {}
    for key, value in kwargs.items():
        if key in accepted:
            kept[key] = value
        elif key == "exact_gradient":
            continue
        elif key in _NEUTRAL:
            if float(value) != _NEUTRAL[key]:
                raise ModelError(
                    f"margin '{name}' has no {key} (got {value}); use 'combined' for m1/m2/m3 together, or set it "
                    f"to {_NEUTRAL[key]}"
                )
        else:
            kept[key] = value  # let the constructor report the unknown keyword
    return kept


def list_margins() -> list[str]:
    """Names accepted by :func:`build_margin`."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------------------------
# Base class and shared pieces


class Margin(nn.Module):
    """Base class: sub-centre max, inter-class filtering, then the margin itself (``_margin``).

    Args:
        subcenter_k: sub-centres per class (1 = none).
        interclass_filtering_threshold: Partial FC v2 tau (0 = off).
    """

    needs_norms: bool = False

    def __init__(self, *, subcenter_k: int = 1, interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__()
        if int(subcenter_k) < 1:
            raise ModelError(f"subcenter_k must be >= 1, got {subcenter_k}")
        if not 0.0 <= float(interclass_filtering_threshold) < 1.0:
            raise ModelError(f"interclass_filtering_threshold must be in [0, 1), got {interclass_filtering_threshold}")
        self.subcenter_k = int(subcenter_k)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)

    def forward(self, cos: Tensor, labels: Tensor, norms: Tensor | None = None) -> MarginOutput:
        """Margin-adjusted logits.

        Args:
            cos: (B, C*K) cosine logits in [-1, 1].
            labels: (B,) or (B, 1) int target columns in [0, C), -1 for "not in this shard".
            norms: (B,) embedding norms (AdaFace, MagFace only).

        Returns:
            MarginOutput with (B, C) logits.
        """
        if cos.dim() != 2:
            raise ModelError(f"{type(self).__name__}: cos must be (B, C), got shape {tuple(cos.shape)}")
        labels = labels.reshape(-1)
        if labels.numel() != cos.shape[0]:
            raise ModelError(f"{type(self).__name__}: {labels.numel()} labels for {cos.shape[0]} rows of cos")
        if self.needs_norms:
            if norms is None:
                raise ModelError(f"{type(self).__name__} needs the embedding norms: call margin(cos, labels, norms)")
            norms = norms.reshape(-1)
            if norms.numel() != cos.shape[0]:
                raise ModelError(f"{type(self).__name__}: {norms.numel()} norms for {cos.shape[0]} rows of cos")
        if self.subcenter_k > 1:
            cos = subcenter_max(cos, self.subcenter_k)
        if self.interclass_filtering_threshold > 0:
            cos = interclass_filter(cos, labels, self.interclass_filtering_threshold)
        return self._margin(cos, labels, norms)

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"{k}={v}" for k, v in self._hparams().items()]
        if self.subcenter_k > 1:
            parts.append(f"subcenter_k={self.subcenter_k}")
        if self.interclass_filtering_threshold > 0:
            parts.append(f"interclass_filtering_threshold={self.interclass_filtering_threshold}")
        return ", ".join(parts)

    def _hparams(self) -> dict:
        return {}


def _targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the target entries: rows whose label is not -1, and their label."""
    rows = torch.nonzero(labels != -1, as_tuple=True)[0]
    return rows, labels[rows].long()


def _scaled_with_targets(cos: Tensor, rows: Tensor, cols: Tensor, target: Tensor, scale: float) -> Tensor:
    """``scale * cos`` with its target entries replaced by ``scale * target`` (differentiable in both).

    One (B, C) allocation: the product is a new tensor, so writing the targets into it edits nothing of the caller.
    """
    logits = cos * scale
    logits.index_put_((rows, cols), (target * scale).to(logits.dtype))
    return logits


class _SafeArccos(torch.autograd.Function):
    """arccos with its derivative -1/sqrt(1 - c^2) capped where 1 - c^2 < machine epsilon.

    The forward value is exactly ``torch.arccos``; only the infinite slope at |c| = 1 is replaced by the slope at
    the nearest representable interior point (1 - c^2 = eps), so cosines of exactly +/-1 give finite gradients.
    """

    @staticmethod
    def forward(ctx, cos: Tensor) -> Tensor:
        ctx.save_for_backward(cos)
        return torch.arccos(cos)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (cos,) = ctx.saved_tensors
        eps = torch.finfo(cos.dtype).eps
        return -grad / torch.sqrt((1 - cos * cos).clamp_min(eps))


def safe_arccos(cos: Tensor) -> Tensor:
    """``arccos(cos)`` with finite gradient at +/-1 (see :class:`_SafeArccos`)."""
    return _SafeArccos.apply(cos)


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ModelError(f"{name} must be > 0, got {value}")
    return value


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:
        raise ModelError(f"{name} must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# Sub-centres and inter-class filtering


def subcenter_max(cos: Tensor, k: int) -> Tensor:
    """Sub-center ArcFace pooling: one logit per class = max over its K sub-centres (Deng et al., ECCV 2020).

    Args:
        cos: (B, C*K) cosines, class-major layout (column = c*K + k), as in the reference implementation.
        k: sub-centres per class K.

    Returns:
        (B, C) maximum over the K sub-centres of each class (gradient goes to the arg-max sub-centre).
    """
    if cos.shape[1] % k:
        raise ModelError(f"subcenter_max: {cos.shape[1]} columns is not a multiple of K={k}")
    return cos.reshape(cos.shape[0], cos.shape[1] // k, k).amax(dim=2)


def interclass_filter(cos: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Partial FC v2 inter-class filtering: zero the negative cosines above ``threshold``.

    Every entry with cos > threshold is set to 0 (treated as a probable duplicate identity, i.e. label noise),
    except the target column of rows whose label is in this shard. Rows with label -1 have no target here, so all
    their columns are negatives and are filtered too: exactly arcface_torch's rule, which is also what makes N
    class shards equal one process holding all classes. The mask is constant (no gradient reaches zeroed entries).

    Args:
        cos: (B, C) cosines.
        labels: (B,) target columns, -1 = not in this shard.
        threshold: tau, e.g. 0.4 (arcface_torch's ``*_filter04`` configs).

    Returns:
        (B, C) filtered copy.
    """
    labels = labels.reshape(-1)
    with torch.no_grad():
        dirty = cos > threshold
        rows, cols = _targets(labels)
        dirty[rows, cols] = False
    return cos.masked_fill(dirty, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# ArcFace, CosFace, softmax


class ArcFace(Margin):
    """Additive angular margin (ArcFace, Deng et al., CVPR 2019).

    ``logit_y = s*cos(theta_y + m)``, ``logit_j = s*cos_j``.

    The forward pass equals arcface_torch's ``CombinedMarginLoss`` with (m1, m2, m3) = (1, m, 0): no easy margin and
    no special case past theta_y + m > pi (where cos(theta + m) rises again), exactly like upstream. The target
    column is computed with the same ops (bit-identical); negatives skip upstream's cos(arccos(x)) round trip, which
    only differs by float rounding. Use ``combined`` for a margin that stays monotonic past pi.

    Gradient (``exact_gradient``):
        - False (default, arcface_torch's): the margin is a constant offset, straight-through:
          d logit_y / d cos_y = s (upstream applies the margin in place under ``no_grad``).
        - True: the analytic derivative d logit_y / d cos_y = s*sin(theta_y + m)/sin(theta_y). Its infinite slope at
          cos_y = +/-1 is capped at the nearest interior float (see :func:`safe_arccos`).

    Args:
        scale: s, logit scale (arcface_torch: 64).
        angular_margin: m (m2 upstream), radians (default 0.5).
        exact_gradient: use the analytic gradient instead of straight-through.
    """

    def __init__(
        self, *, scale: float = 64.0, angular_margin: float = 0.5, exact_gradient: bool = False, **base
    ) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)
        self.angular_margin = _check_nonneg("angular_margin", angular_margin)
        self.exact_gradient = bool(exact_gradient)

    def _hparams(self) -> dict:
        return {"scale": self.scale, "angular_margin": self.angular_margin, "exact_gradient": self.exact_gradient}

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        rows, cols = _targets(labels)
        cos_y = cos[rows, cols]
        if self.exact_gradient:
            target = torch.cos(safe_arccos(cos_y) + self.angular_margin)
        else:
            with torch.no_grad():
                value = torch.cos(torch.arccos(cos_y) + self.angular_margin)
            # value + 0 keeps the forward bit-identical to upstream; the (cos_y - cos_y.detach()) term carries slope 1
            target = value + (cos_y - cos_y.detach())
        return MarginOutput(_scaled_with_targets(cos, rows, cols, target, self.scale))


class CosFace(Margin):
    """Additive cosine margin (CosFace, Wang et al., CVPR 2018): ``logit_y = s*(cos_y - m)``, ``logit_j = s*cos_j``.

    Equals arcface_torch's ``CombinedMarginLoss`` with m3 = m (its CosFace branch). The margin is a constant, so
    the gradient is exact (d logit_y / d cos_y = s) with or without ``exact_gradient`` (accepted for symmetry).

    Args:
        scale: s (default 64).
        additive_margin: m (m3 upstream), in cosine units (default 0.4; arcface_torch configs use 0.4,
            the MXNet sample config 0.35).
        exact_gradient: no effect (see above).
    """

    def __init__(
        self, *, scale: float = 64.0, additive_margin: float = 0.4, exact_gradient: bool = False, **base
    ) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)
        self.additive_margin = _check_nonneg("additive_margin", additive_margin)
        self.exact_gradient = bool(exact_gradient)

    def _hparams(self) -> dict:
        return {"scale": self.scale, "additive_margin": self.additive_margin}

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        rows, cols = _targets(labels)
        target = cos[rows, cols] - self.additive_margin
        return MarginOutput(_scaled_with_targets(cos, rows, cols, target, self.scale))


class SoftmaxHead(Margin):
    """Plain (normalized) softmax: ``logits = s*cos`` with no margin (NormFace, Wang et al., 2017).

    With ``scale=1`` the input is passed through unchanged, so it also serves raw (unnormalized) linear logits
    for a classic softmax classifier.

    Args:
        scale: s (default 64; use 1.0 for raw logits).
    """

    def __init__(self, *, scale: float = 64.0, **base) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)

    def _hparams(self) -> dict:
        return {"scale": self.scale}

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        return MarginOutput(cos * self.scale if self.scale != 1.0 else cos.clone())


# --------------------------------------------------------------------------------------------------------------------
# Combined margin and SphereFace


def monotonic_cos_margin(cos: Tensor, multiplicative_margin: float | Tensor, angular_margin: float | Tensor) -> Tensor:
    """psi(theta) = (-1)^k * cos(phi) - 2k with phi = m1*theta + m2 and k = floor(phi / pi).

    SphereFace's monotonic extension of cos(m1*theta) (Liu et al., CVPR 2017, eq. 6), generalized to phi = m1*theta
    + m2. Equals cos(phi) while phi <= pi, and Keras's ``ArcfaceLoss`` fallback ``-2 - cos(phi)`` (its
    ``theta_min - cos(phi)`` with m3 moved out) for pi < phi <= 2*pi; continuous and strictly decreasing in theta.

    Args:
        cos: cosines in [-1, 1], any shape.
        multiplicative_margin: m1 (>= 1).
        angular_margin: m2, radians.

    Returns:
        psi, same shape as ``cos``; gradient exact (capped only at |cos| = 1, see :func:`safe_arccos`).
    """
    phi = multiplicative_margin * safe_arccos(cos) + angular_margin
    k = torch.floor(phi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(phi) - 2.0 * k


class CombinedMargin(Margin):
    """Combined margin (InsightFace; ArcFace paper, sec. 2.3).

    ``logit_y = s*(psi(theta_y) - m3)``, ``logit_j = s*cos_j``.

    ``psi`` is cos(m1*theta_y + m2) made monotonic past m1*theta_y + m2 > pi by SphereFace's rule
    (:func:`monotonic_cos_margin`; identical to Keras's ``ArcfaceLoss`` up to 2*pi). The gradient is the exact
    analytic one. Note: arcface_torch's ``CombinedMarginLoss`` does NOT implement this: with m3 > 0 it silently
    drops m2 (pure CosFace), and m1 != 1 raises.

    Args:
        scale: s (default 64).
        multiplicative_margin: m1 (default 1.0).
        angular_margin: m2, radians (default 0.3, InsightFace's combined setting).
        additive_margin: m3, cosine units (default 0.2).
    """

    def __init__(
        self,
        *,
        scale: float = 64.0,
        multiplicative_margin: float = 1.0,
        angular_margin: float = 0.3,
        additive_margin: float = 0.2,
        **base,
    ) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)
        self.multiplicative_margin = float(multiplicative_margin)
        if self.multiplicative_margin < 1.0:
            raise ModelError(f"multiplicative_margin must be >= 1, got {multiplicative_margin}")
        self.angular_margin = _check_nonneg("angular_margin", angular_margin)
        self.additive_margin = _check_nonneg("additive_margin", additive_margin)

    def _hparams(self) -> dict:
        return {
            "scale": self.scale,
            "multiplicative_margin": self.multiplicative_margin,
            "angular_margin": self.angular_margin,
            "additive_margin": self.additive_margin,
        }

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        rows, cols = _targets(labels)
        psi = monotonic_cos_margin(cos[rows, cols], self.multiplicative_margin, self.angular_margin)
        return MarginOutput(_scaled_with_targets(cos, rows, cols, psi - self.additive_margin, self.scale))


class SphereFace(CombinedMargin):
    """Multiplicative angular margin on normalized features (SphereFace, Liu et al., CVPR 2017).

    ``logit_y = s*psi(theta_y)``, psi(theta) = (-1)^k cos(m1*theta) - 2k, k = floor(m1*theta/pi): the combined
    margin with m2 = m3 = 0. Unlike the paper, features are normalized and scaled by s, and there is no lambda
    annealing with plain softmax.

    Args:
        scale: s (default 64).
        multiplicative_margin: m1 (default 1.35, the normalized-SphereFace setting of the ArcFace paper).
    """

    def __init__(self, *, scale: float = 64.0, multiplicative_margin: float = 1.35, **base) -> None:
        super().__init__(
            scale=scale, multiplicative_margin=multiplicative_margin, angular_margin=0.0, additive_margin=0.0, **base
        )


# --------------------------------------------------------------------------------------------------------------------
# Running statistics synced across ranks


def _global_moments(values: Tensor, sync: bool) -> tuple[float, Tensor, Tensor]:
    """(count, sum, sum of squares) of ``values`` over every rank, in float64 (one all-reduce)."""
    v = values.detach().to(torch.float64)
    count = torch.full((), float(v.numel()), dtype=torch.float64, device=v.device)
    stats = torch.stack([count, v.sum(), (v * v).sum()])
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return float(stats[0]), stats[1], stats[2]


class CurricularFace(Margin):
    """CurricularFace (Huang et al., CVPR 2020), TFace's rule.

    Target: ``cos(theta_y + m)`` if ``cos_y > cos(pi - m)`` else ``cos_y - m*sin(pi - m)``. Hard negatives
    (``cos_j > cos(theta_y + m)``, compared with the value before the fallback) become ``cos_j*(t + cos_j)``; others
    stay ``cos_j``. All x s. In training mode the buffer ``t`` (starts at 0) follows
    ``t <- alpha*mean(cos_y) + (1 - alpha)*t`` (no gradient) BEFORE it is used, the mean taken over every target row
    of every rank (sum and count all-reduced). A row with label -1 has its target, hence its hard-negative threshold,
    on another rank: with ``shared_rows=True`` (every rank passes the same rows, as under Partial FC) the thresholds
    are all-reduced (one (B,) MAX) so its negatives here are reweighted exactly as in one process holding all
    classes; otherwise such rows stay ``s*cos``. Gradient: exact, with ``t`` a constant.

    Args:
        scale: s (default 64).
        angular_margin: m, radians (default 0.5).
        alpha: EMA momentum of t (default 0.1, TFace; Keras uses 0.01).
        sync_across_ranks: all-reduce the batch statistic when a process group is initialized.
        shared_rows: rows are the same on every rank (Partial FC's global batch); see above.
    """

    def __init__(
        self,
        *,
        scale: float = 64.0,
        angular_margin: float = 0.5,
        alpha: float = 0.1,
        sync_across_ranks: bool = True,
        shared_rows: bool = False,
        **base,
    ) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)
        self.angular_margin = _check_nonneg("angular_margin", angular_margin)
        self.alpha = float(alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ModelError(f"alpha must be in [0, 1], got {alpha}")
        self.sync_across_ranks = bool(sync_across_ranks)
        self.shared_rows = bool(shared_rows)
        self.register_buffer("t", torch.zeros(()))

    def _hparams(self) -> dict:
        return {"scale": self.scale, "angular_margin": self.angular_margin, "alpha": self.alpha}

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        m = self.angular_margin
        rows, cols = _targets(labels)
        cos_y = cos[rows, cols]
        cos_theta_m = torch.cos(safe_arccos(cos_y) + m)
        target = torch.where(cos_y > math.cos(math.pi - m), cos_theta_m, cos_y - math.sin(math.pi - m) * m)
        if self.training:
            count, total, _ = _global_moments(cos_y, self.sync_across_ranks)
            if count > 0:
                with torch.no_grad():
                    self.t.mul_(1.0 - self.alpha).add_(self.alpha * (total / count).to(self.t.dtype))
        threshold = torch.full((cos.shape[0],), math.inf, dtype=cos.dtype, device=cos.device)
        threshold = threshold.index_put((rows,), cos_theta_m.detach())
        if self.shared_rows and torch.distributed.is_available() and torch.distributed.is_initialized():
            owned = torch.full_like(threshold, -math.inf).index_put((rows,), cos_theta_m.detach())
            torch.distributed.all_reduce(owned, op=torch.distributed.ReduceOp.MAX)
            from_owner = (labels == -1) & (owned > -math.inf)
            threshold = torch.where(from_owner, owned, threshold)
        hard = cos > threshold.unsqueeze(1)
        t = self.t.detach().clone().to(cos.dtype)
        logits = torch.where(hard, cos * (t + cos), cos)
        return MarginOutput(_scaled_with_targets(logits, rows, cols, target, self.scale))


class AdaFace(Margin):
    """AdaFace: quality-adaptive margin from the feature norm (Kim et al., CVPR 2022), upstream ``head.py`` rule.

    ``cos`` is clamped to [-1 + eps, 1 - eps]; ``a = clip(norms, 0.001, 100)`` (no gradient);
    ``z = clip(h*(a - mu)/(sigma + eps), -1, 1)``; target ``cos(clip(theta_y - m*z, eps, pi - eps)) - (m + m*z)``;
    negatives ``cos_j``; all x s. In training mode the buffers follow ``mu <- t_alpha*mean(a) + (1 - t_alpha)*mu``,
    ``sigma <- t_alpha*std(a) + (1 - t_alpha)*sigma`` (unbiased std; no gradient) BEFORE they are used. The batch
    statistics cover the rows with a target on this rank, summed over ranks (each row counts once: on the rank
    holding its class under Partial FC, on its own rank under data parallelism); std is not updated from < 2 rows.
    Gradient: exact autograd of the above (as upstream).

    Args:
        scale: s (default 64).
        margin: m (default 0.4, README example).
        h: concentration of z (default 0.333).
        t_alpha: EMA momentum (default 0.01; upstream's class default 1.0 means pure batch statistics).
        eps: clamp epsilon (default 1e-3).
        sync_across_ranks: all-reduce the batch statistics when a process group is initialized.
    """

    needs_norms = True

    def __init__(
        self,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
        sync_across_ranks: bool = True,
        **base,
    ) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)
        self.margin = _check_nonneg("margin", margin)
        self.h = _check_nonneg("h", h)
        self.t_alpha = float(t_alpha)
        if not 0.0 <= self.t_alpha <= 1.0:
            raise ModelError(f"t_alpha must be in [0, 1], got {t_alpha}")
        self.eps = _check_positive("eps", eps)
        self.sync_across_ranks = bool(sync_across_ranks)
        self.register_buffer("batch_mean", torch.full((), 20.0))
        self.register_buffer("batch_std", torch.full((), 100.0))

    def _hparams(self) -> dict:
        return {"scale": self.scale, "margin": self.margin, "h": self.h, "t_alpha": self.t_alpha, "eps": self.eps}

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        assert norms is not None
        eps, m = self.eps, self.margin
        cos = cos.clamp(-1 + eps, 1 - eps)
        safe_norms = norms.detach().clamp(0.001, 100)
        rows, cols = _targets(labels)
        if self.training:
            self._update_statistics(safe_norms[rows])
        mean = self.batch_mean.detach().clone().to(cos.dtype)
        std = self.batch_std.detach().clone().to(cos.dtype)
        z = (self.h * (safe_norms.to(cos.dtype) - mean) / (std + eps)).clamp(-1, 1)[rows]
        theta_y = torch.arccos(cos[rows, cols])
        target = torch.cos((theta_y - m * z).clamp(eps, math.pi - eps)) - (m + m * z)
        return MarginOutput(_scaled_with_targets(cos, rows, cols, target, self.scale))

    def _update_statistics(self, safe_norms: Tensor) -> None:
        count, total, total_sq = _global_moments(safe_norms, self.sync_across_ranks)
        if count == 0:
            return
        a = self.t_alpha
        with torch.no_grad():
            mean = total / count
            self.batch_mean.mul_(1 - a).add_(a * mean.to(self.batch_mean.dtype))
            if count > 1:
                std = ((total_sq - total * mean) / (count - 1)).clamp_min(0).sqrt()
                self.batch_std.mul_(1 - a).add_(a * std.to(self.batch_std.dtype))


class MagFace(Margin):
    """MagFace (Meng et al., CVPR 2021): margin grows with the feature magnitude, plus a magnitude regularizer.

    ``a = clamp(norms, l_a, u_a)``, ``m(a) = (u_m - l_m)/(u_a - l_a)*(a - l_a) + l_m``. Target ``cos(theta_y + m(a))``;
    with ``easy_margin`` (upstream's default) only where ``cos_y > 0``, else ``cos_y``; without it, ``cos_y -
    m(a)*sin(pi - m(a))`` where ``cos_y <= cos(pi - m(a))``. Negatives ``cos_j``; all x s. ``aux_loss = lambda_g *
    mean(g(a))`` with ``g(a) = a/u_a^2 + 1/a`` over all rows: add it to the cross-entropy. Gradient: exact, and it
    reaches ``norms`` through both m(a) and g(a) (pass norms that carry gradient, as upstream does).

    Args:
        scale: s (default 64).
        lower_norm, upper_norm: l_a, u_a (default 10, 110).
        lower_margin, upper_margin: l_m, u_m, radians (default 0.45, 0.8).
        lambda_g: regularizer weight (default 35).
        easy_margin: see above (default True).
    """

    needs_norms = True

    def __init__(
        self,
        *,
        scale: float = 64.0,
        lower_norm: float = 10.0,
        upper_norm: float = 110.0,
        lower_margin: float = 0.45,
        upper_margin: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
        **base,
    ) -> None:
        super().__init__(**base)
        self.scale = _check_positive("scale", scale)
        self.lower_norm = _check_positive("lower_norm", lower_norm)
        self.upper_norm = float(upper_norm)
        if not self.upper_norm > self.lower_norm:
            raise ModelError(f"upper_norm ({upper_norm}) must be > lower_norm ({lower_norm})")
        self.lower_margin = _check_nonneg("lower_margin", lower_margin)
        self.upper_margin = _check_nonneg("upper_margin", upper_margin)
        self.lambda_g = _check_nonneg("lambda_g", lambda_g)
        self.easy_margin = bool(easy_margin)

    def _hparams(self) -> dict:
        return {
            "scale": self.scale,
            "lower_norm": self.lower_norm,
            "upper_norm": self.upper_norm,
            "lower_margin": self.lower_margin,
            "upper_margin": self.upper_margin,
            "lambda_g": self.lambda_g,
            "easy_margin": self.easy_margin,
        }

    def _margin(self, cos: Tensor, labels: Tensor, norms: Tensor | None) -> MarginOutput:
        assert norms is not None
        a = norms.to(cos.dtype).clamp(self.lower_norm, self.upper_norm)
        slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
        margin = slope * (a - self.lower_norm) + self.lower_margin
        rows, cols = _targets(labels)
        cos_y, m_y = cos[rows, cols], margin[rows]
        cos_theta_m = torch.cos(safe_arccos(cos_y) + m_y)
        if self.easy_margin:
            target = torch.where(cos_y > 0, cos_theta_m, cos_y)
        else:
            target = torch.where(cos_y > torch.cos(math.pi - m_y), cos_theta_m, cos_y - torch.sin(math.pi - m_y) * m_y)
        regularizer = (a / self.upper_norm**2 + 1.0 / a).mean()
        return MarginOutput(_scaled_with_targets(cos, rows, cols, target, self.scale), self.lambda_g * regularizer)


_REGISTRY: dict[str, tuple[Callable[..., Margin], dict]] = {
    "arcface": (ArcFace, {}),
    "cosface": (CosFace, {}),
    "combined": (CombinedMargin, {}),
    "sphereface": (SphereFace, {}),
    "curricularface": (CurricularFace, {}),
    "adaface": (AdaFace, {}),
    "magface": (MagFace, {}),
    "softmax": (SoftmaxHead, {}),
    "subcenter": (ArcFace, {"subcenter_k": 3}),
}
