"""Knowledge-distillation losses: student embeddings / logits pulled towards a frozen teacher's.

The teacher's outputs are always detached. When the student and teacher embedding sizes differ, give both sizes
and a learnable linear projection (student -> teacher, no bias) is created; train it with the student.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from facetrain.errors import ModelError, closest

__all__ = ["CosineDistillLoss", "L2DistillLoss", "KLDistillLoss", "build_distill_loss"]


class _EmbeddingDistill(nn.Module):
    """Shared projection logic of the embedding losses."""

    def __init__(self, *, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.projection: nn.Module | None = None
        if student_dim is not None and teacher_dim is not None and int(student_dim) != int(teacher_dim):
            self.projection = nn.Linear(int(student_dim), int(teacher_dim), bias=False)

    def _pair(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        if self.projection is not None:
            student = self.projection(student)
        teacher = teacher.detach()
        if student.dim() != 2 or student.shape != teacher.shape:
            raise ModelError(
                f"{type(self).__name__}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings "
                "differ; pass student_dim and teacher_dim to learn a projection"
            )
        return student, teacher.to(student.dtype)


class CosineDistillLoss(_EmbeddingDistill):
    """``mean_i (1 - cos(P s_i, t_i))``: aligns directions only (norms are free).

    Args:
        student_dim, teacher_dim: embedding sizes; a projection P is learned when they differ (else P = identity).
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Scalar loss for (B, D_s) student and (B, D_t) teacher embeddings."""
        student, teacher = self._pair(student, teacher)
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


class L2DistillLoss(_EmbeddingDistill):
    """MSE between L2-normalized embeddings: ``mean over B*D of (P s/|P s| - t/|t|)^2`` (= mean_i 2(1 - cos_i) / D).

    Args:
        student_dim, teacher_dim: embedding sizes; a projection P is learned when they differ.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Scalar loss for (B, D_s) student and (B, D_t) teacher embeddings."""
        student, teacher = self._pair(student, teacher)
        return F.mse_loss(F.normalize(student, dim=1), F.normalize(teacher, dim=1))


class KLDistillLoss(nn.Module):
    """Soft-target distillation (Hinton, Vinyals & Dean, 2015): ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Averaged over the batch ("batchmean"); the T^2 factor keeps gradient magnitudes comparable across T.

    Args:
        temperature: T > 0 (default 4.0).
    """

    def __init__(self, *, temperature: float = 4.0) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ModelError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Scalar loss for (B, C) student and teacher logits."""
        if student_logits.shape != teacher_logits.shape:
            raise ModelError(
                f"KLDistillLoss: student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} must have the same shape"
            )
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


_KINDS = {"cosine": CosineDistillLoss, "l2": L2DistillLoss, "kl": KLDistillLoss}


def build_distill_loss(kind: str, **kwargs) -> nn.Module:
    """``"cosine"``, ``"l2"`` (keyword args student_dim, teacher_dim) or ``"kl"`` (temperature)."""
    if kind not in _KINDS:
        hint = closest(kind, _KINDS)
        raise ModelError(
            f"unknown distillation loss '{kind}'" + (f" (did you mean '{hint}'?)" if hint else "") + f"; known: "
            f"{', '.join(_KINDS)}"
        )
    try:
        return _KINDS[kind](**kwargs)
    except TypeError as exc:
        raise ModelError(f"distillation loss '{kind}': {exc}") from exc
