"""Distillation losses vs float64 formulas, projection path included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrain.errors import ModelError
from facetrain.heads import CosineDistillLoss, KLDistillLoss, L2DistillLoss, build_distill_loss


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_cosine_and_l2_match_formulas():
    s = torch.randn(5, 8, dtype=torch.float64)
    t = torch.randn(5, 8, dtype=torch.float64)
    cos = (_unit(s.numpy()) * _unit(t.numpy())).sum(1)
    assert CosineDistillLoss()(s, t).item() == pytest.approx(np.mean(1 - cos), rel=1e-12)
    mse = ((_unit(s.numpy()) - _unit(t.numpy())) ** 2).mean()
    assert L2DistillLoss()(s, t).item() == pytest.approx(mse, rel=1e-12)
    assert mse == pytest.approx(np.mean(2 * (1 - cos)) / 8, rel=1e-12)
    for fn in (CosineDistillLoss(), L2DistillLoss()):
        assert torch.autograd.gradcheck(lambda x, fn=fn: fn(x, t), (s.clone().requires_grad_(True),))


def test_kl_matches_formula_with_temperature_squared():
    s = torch.randn(4, 10, dtype=torch.float64)
    t = torch.randn(4, 10, dtype=torch.float64) * 3
    temp = 3.0

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(t.numpy() / temp), softmax(s.numpy() / temp)
    expected = temp**2 * np.mean((p_t * (np.log(p_t) - np.log(p_s))).sum(1))
    loss_fn = build_distill_loss("kl", temperature=temp)
    assert loss_fn(s, t).item() == pytest.approx(expected, rel=1e-10)
    assert loss_fn(t, t).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t), (s.clone().requires_grad_(True),))


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_projection_when_sizes_differ(kind):
    loss_fn = build_distill_loss(kind, student_dim=6, teacher_dim=10).double()
    assert loss_fn.projection.weight.shape == (10, 6)
    s = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(s, t)
    projected = s.detach().numpy() @ loss_fn.projection.weight.detach().numpy().T
    cos = (_unit(projected) * _unit(t.detach().numpy())).sum(1)
    expected = np.mean(1 - cos) if kind == "cosine" else np.mean(2 * (1 - cos)) / 10
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert loss_fn.projection.weight.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is frozen
    with pytest.raises(ModelError, match="student_dim and teacher_dim"):
        build_distill_loss(kind)(s, t)


def test_unknown_kind():
    with pytest.raises(ModelError, match="did you mean 'cosine'"):
        build_distill_loss("cosin")
    with pytest.raises(ModelError, match="temperature"):
        KLDistillLoss(temperature=0)
