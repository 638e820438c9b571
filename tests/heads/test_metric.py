"""Triplet (batch-hard / batch-all), center loss and CompositeLoss vs brute-force float64 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facetrain.errors import ModelError
from facetrain.heads import CenterLoss, CompositeLoss, TripletLoss, weighted_sum


def _data(b=12, d=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.arange(b) % classes
    labels[-1] = 99  # an identity with a single image: no positive, still a negative for others
    return x, labels


def _np_dist(x, i, j, distance):
    a, b = x[i], x[j]
    if distance == "cosine":
        return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.sqrt(max(float(((a - b) ** 2).sum()), 1e-12))


def _brute_force(x, labels, margin, distance, mining):
    x, labels = x.detach().numpy(), labels.tolist()
    n = len(labels)
    if mining == "batch_hard":
        losses = []
        for a in range(n):
            pos = [_np_dist(x, a, p, distance) for p in range(n) if p != a and labels[p] == labels[a]]
            neg = [_np_dist(x, a, q, distance) for q in range(n) if labels[q] != labels[a]]
            if pos and neg:
                losses.append(max(max(pos) - min(neg) + margin, 0.0))
        return float(np.mean(losses))
    active = []
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for q in range(n):
                if labels[q] != labels[a]:
                    value = _np_dist(x, a, p, distance) - _np_dist(x, a, q, distance) + margin
                    if value > 0:
                        active.append(value)
    return float(np.mean(active)) if active else 0.0


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_triplet_vs_brute_force_and_gradcheck(distance, mining):
    x, labels = _data()
    margin = 0.3 if distance == "cosine" else 1.0
    loss_fn = TripletLoss(margin=margin, distance=distance, mining=mining)
    assert loss_fn(x, labels).item() == pytest.approx(_brute_force(x, labels, margin, distance, mining), rel=1e-10)
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (x.clone().requires_grad_(True),))


def test_triplet_float32_matches_float64():
    x, labels = _data(seed=1)
    for mining in ("batch_hard", "batch_all"):
        loss_fn = TripletLoss(mining=mining)
        assert loss_fn(x.float(), labels).item() == pytest.approx(loss_fn(x, labels).item(), rel=1e-5)


def test_triplet_without_positives_is_zero_with_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    for mining in ("batch_hard", "batch_all"):
        loss = TripletLoss(mining=mining)(x, torch.arange(4))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(x.grad).all()
    with pytest.raises(ModelError, match="mining"):
        TripletLoss(mining="semi_hard")


def test_center_loss_paper_update():
    x, labels = _data(b=10, d=4, classes=3)
    labels[-1] = 2
    loss_fn = CenterLoss(3, 4, alpha=0.5).double()
    before = loss_fn.centres.clone().numpy()
    loss = loss_fn(x, labels)
    xn, ln = x.numpy(), labels.numpy()
    assert loss.item() == pytest.approx(np.mean([0.5 * ((xn[i] - before[ln[i]]) ** 2).sum() for i in range(10)]))
    for j in range(3):
        members = xn[ln == j]
        delta = (before[j] - members).sum(0) / (1 + len(members))
        np.testing.assert_allclose(loss_fn.centres[j].numpy(), before[j] - 0.5 * delta, rtol=1e-12)
    assert "centres" in loss_fn.state_dict() and not list(loss_fn.parameters())
    loss_fn.eval()
    frozen = loss_fn.centres.clone()
    loss_fn(x, labels)
    assert torch.equal(loss_fn.centres, frozen)


def test_center_loss_learnable_centres_gradient():
    x, labels = _data(b=6, d=3, classes=2)
    labels[-1] = 1
    loss_fn = CenterLoss(2, 3, alpha=None).double()
    x.requires_grad_(True)
    loss_fn(x, labels).backward()
    c = loss_fn.centres.detach()
    torch.testing.assert_close(x.grad, (x.detach() - c[labels]) / 6)
    expected = torch.zeros_like(c).index_add_(0, labels, (c[labels] - x.detach()) / 6)
    torch.testing.assert_close(loss_fn.centres.grad, expected)


def test_composite_loss_weights_and_errors():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    out = CompositeLoss({"margin": 1.0, "triplet": 0.5, "center": 0.0})({"margin": a, "triplet": b, "center": b * 7})
    assert out.total.item() == pytest.approx(3.5)
    out.total.backward()
    assert a.grad.item() == 1.0 and b.grad.item() == 0.5
    assert out.parts["center"].item() == 21.0 and not out.parts["center"].requires_grad
    with pytest.raises(ModelError, match="no loss computed for \\['triplet'\\]"):
        weighted_sum({"margin": a}, {"margin": 1.0, "triplet": 1.0})
    with pytest.raises(ModelError, match="no weight given for \\['tripet'\\]"):
        weighted_sum({"margin": a, "tripet": b}, {"margin": 1.0})
