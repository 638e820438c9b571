"""Margins vs independent float64 formulas (numpy / math), upstream transcriptions, gradcheck, buffers, sync."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facetrain.errors import ModelError
from facetrain.heads import build_margin, interclass_filter, list_margins, subcenter_max

S = 64.0


def _batch(b=6, c=9, dtype=torch.float64, seed=0, lo=-0.95, hi=0.95):
    g = torch.Generator().manual_seed(seed)
    cos = (torch.rand(b, c, generator=g, dtype=dtype) * (hi - lo) + lo).contiguous()
    labels = torch.randint(0, c, (b,), generator=g)
    labels[1] = -1  # one row whose class lives on another shard
    norms = torch.rand(b, generator=g, dtype=dtype) * 120 + 2  # spans below l_a, inside, above u_a
    return cos, labels, norms


def _targets(labels):
    return [(i, int(y)) for i, y in enumerate(labels.tolist()) if y != -1]


# ---------------------------------------------------------------------------------------------------------------------
# arcface_torch transcription (CombinedMarginLoss.forward, HEAD), written here so our module is compared to upstream


def _upstream_combined(logits, labels, s, m1, m2, m3, tau=0.0):
    logits = logits.clone()
    labels = labels.view(-1, 1)
    index_positive = torch.where(labels.view(-1) != -1)[0]
    if tau > 0:
        with torch.no_grad():
            dirty = (logits > tau).float()
            mask = torch.ones([index_positive.size(0), logits.size(1)], dtype=logits.dtype)
            mask.scatter_(1, labels[index_positive], 0)
            dirty[index_positive] *= mask
            tensor_mul = 1 - dirty
        logits = tensor_mul * logits
    target_logit = logits[index_positive, labels[index_positive].view(-1)]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target_logit.arccos_()
            logits.arccos_()
            logits[index_positive, labels[index_positive].view(-1)] = target_logit + m2
            logits.cos_()
        return logits * s
    assert m3 > 0
    logits[index_positive, labels[index_positive].view(-1)] = target_logit - m3
    return logits * s


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_arcface_forward_matches_arcface_torch(tau):
    cos, labels, _ = _batch(b=16, c=50, dtype=torch.float32)
    ours = build_margin("arcface", scale=S, angular_margin=0.5, interclass_filtering_threshold=tau)(cos, labels).logits
    ref = _upstream_combined(cos, labels, S, 1.0, 0.5, 0.0, tau)
    # negatives skip upstream's arccos/cos round trip: equal up to float32 rounding of that round trip
    torch.testing.assert_close(ours, ref, rtol=0, atol=S * 2e-6)
    for i, y in _targets(labels):  # target column: same ops in the same order, bit-identical
        assert ours[i, y].item() == ref[i, y].item()


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_cosface_forward_matches_arcface_torch(tau):
    cos, labels, _ = _batch(b=16, c=50, dtype=torch.float32)
    ours = build_margin("cosface", scale=S, additive_margin=0.35, interclass_filtering_threshold=tau)(cos, labels)
    ref = _upstream_combined(cos, labels, S, 1.0, 0.0, 0.35, tau)
    assert torch.equal(ours.logits, ref)


def test_arcface_straight_through_gradient_is_s():
    cos, labels, _ = _batch()
    cos.requires_grad_(True)
    weights = torch.randn_like(cos)
    (build_margin("arcface", scale=S)(cos, labels).logits * weights).sum().backward()
    torch.testing.assert_close(cos.grad, S * weights, rtol=0, atol=0)


def _np_arcface(cos, labels, s, m):
    cos = cos.detach()
    out = s * cos.numpy().copy()
    for i, y in _targets(labels):
        out[i, y] = s * math.cos(math.acos(float(cos[i, y])) + m)
    return out


def _np_arcface_grad(cos, labels, s, m):
    grad = np.full(cos.shape, s)
    for i, y in _targets(labels):
        theta = math.acos(float(cos.detach()[i, y]))
        grad[i, y] = s * math.sin(theta + m) / math.sin(theta)
    return grad


def test_arcface_exact_gradient_vs_formula_and_gradcheck():
    cos, labels, _ = _batch()
    margin = build_margin("arcface", scale=S, angular_margin=0.5, exact_gradient=True)
    cos.requires_grad_(True)
    out = margin(cos, labels).logits
    np.testing.assert_allclose(out.detach().numpy(), _np_arcface(cos, labels, S, 0.5), rtol=1e-13, atol=1e-12)
    out.sum().backward()
    np.testing.assert_allclose(cos.grad.numpy(), _np_arcface_grad(cos, labels, S, 0.5), rtol=1e-10)
    assert torch.autograd.gradcheck(lambda c: margin(c, labels).logits, (cos.detach().requires_grad_(True),))


def test_arcface_gradient_modes_share_the_forward():
    cos, labels, _ = _batch(dtype=torch.float32)
    straight = build_margin("arcface")(cos, labels).logits
    exact = build_margin("arcface", exact_gradient=True)(cos, labels).logits
    assert torch.equal(straight, exact)


def test_cosface_gradcheck_and_formula():
    cos, labels, _ = _batch()
    margin = build_margin("cosface", scale=30.0, additive_margin=0.35)
    expected = 30.0 * cos.numpy().copy()
    for i, y in _targets(labels):
        expected[i, y] = 30.0 * (float(cos[i, y]) - 0.35)
    np.testing.assert_allclose(margin(cos, labels).logits.numpy(), expected, rtol=1e-14)
    assert torch.autograd.gradcheck(lambda c: margin(c, labels).logits, (cos.clone().requires_grad_(True),))


# ---------------------------------------------------------------------------------------------------------------------
# Combined / SphereFace: psi = (-1)^k cos(phi) - 2k, phi = m1*theta + m2 (Keras's rule while phi <= 2*pi)


def _np_psi(c, m1, m2, m3):
    phi = m1 * math.acos(c) + m2
    if phi <= math.pi:
        return math.cos(phi) - m3
    if phi <= 2 * math.pi:  # Keras ArcfaceLoss: theta_min - (cos(phi) - m3), theta_min = (-1 - m3) * 2
        return (-1 - m3) * 2 - (math.cos(phi) - m3)
    k = math.floor(phi / math.pi)
    return (-1) ** k * math.cos(phi) - 2 * k - m3


@pytest.mark.parametrize(("m1", "m2", "m3"), [(1.0, 0.3, 0.2), (1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (4.0, 0.0, 0.0)])
def test_combined_both_sides_of_pi(m1, m2, m3):
    threshold = math.cos((math.pi - m2) / m1)  # cos_y at which m1*theta + m2 = pi
    values = [threshold + d for d in (0.3, 0.05, 1e-3, -1e-3, -0.05)] + [0.9, -0.99]
    values = [v for v in values if -1 < v < 1]
    assert any(v > threshold for v in values) and any(v < threshold for v in values)
    cos = torch.tensor([[v, 0.1] for v in values], dtype=torch.float64)
    labels = torch.zeros(len(values), dtype=torch.long)
    margin = build_margin("combined", scale=S, multiplicative_margin=m1, angular_margin=m2, additive_margin=m3)
    out = margin(cos, labels).logits
    expected = [S * _np_psi(v, m1, m2, m3) for v in values]
    np.testing.assert_allclose(out[:, 0].numpy(), expected, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(out[:, 1].numpy(), S * 0.1)
    assert torch.autograd.gradcheck(lambda c: margin(c, labels).logits, (cos.clone().requires_grad_(True),))


@pytest.mark.parametrize("m1", [1.35, 4.0])
def test_sphereface_is_monotonic_and_matches_paper_psi(m1):
    theta = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    cos = torch.stack([torch.cos(theta), torch.zeros_like(theta)], 1)
    labels = torch.zeros(len(theta), dtype=torch.long)
    out = build_margin("sphereface", scale=1.0, multiplicative_margin=m1)(cos, labels).logits[:, 0]
    assert torch.all(out[1:] < out[:-1])  # strictly decreasing in theta
    paper = [(-1) ** math.floor(m1 * t / math.pi) * math.cos(m1 * t) - 2 * math.floor(m1 * t / math.pi) for t in theta]
    np.testing.assert_allclose(out.numpy(), paper, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# CurricularFace (TFace rule)


def _np_curricular(cos, labels, s, m, t):
    c = cos.detach().numpy()
    out = c.copy()
    for i, y in _targets(labels):
        cy = c[i, y]
        ctm = math.cos(math.acos(cy) + m)
        final = ctm if cy > math.cos(math.pi - m) else cy - math.sin(math.pi - m) * m
        for j in range(c.shape[1]):
            if c[i, j] > ctm:
                out[i, j] = c[i, j] * (t + c[i, j])
        out[i, y] = final
    return s * out


def test_curricularface_t_update_forward_and_gradcheck():
    cos, labels, _ = _batch(b=8, c=7, lo=-0.99, hi=0.99)
    cos[0, int(labels[0])] = -0.95  # fallback side of theta + m = pi
    margin = build_margin("curricularface", scale=S, angular_margin=0.5, alpha=0.1)
    assert margin.t.item() == 0.0
    out = margin(cos, labels).logits
    mean_cos_y = np.mean([float(cos[i, y]) for i, y in _targets(labels)])
    t1 = 0.1 * mean_cos_y
    assert margin.t.item() == pytest.approx(t1, rel=1e-6)
    np.testing.assert_allclose(out.numpy(), _np_curricular(cos, labels, S, 0.5, t1), rtol=1e-6, atol=1e-5)
    margin(cos, labels)
    assert margin.t.item() == pytest.approx(0.1 * mean_cos_y + 0.9 * t1, rel=1e-6)
    margin.eval()  # t frozen while gradcheck evaluates many times
    t_before = margin.t.clone()
    assert torch.autograd.gradcheck(lambda c: margin(c, labels).logits, (cos.clone().requires_grad_(True),))
    assert torch.equal(margin.t, t_before)


# ---------------------------------------------------------------------------------------------------------------------
# AdaFace (upstream head.py rule)


def _np_adaface(cos, labels, norms, s, m, h, eps, mean, std):
    c = np.clip(cos.detach().numpy(), -1 + eps, 1 - eps)
    out = c.copy()
    for i, y in _targets(labels):
        a = min(max(float(norms[i]), 0.001), 100.0)
        z = min(max(h * (a - mean) / (std + eps), -1.0), 1.0)
        theta = min(max(math.acos(c[i, y]) - m * z, eps), math.pi - eps)
        out[i, y] = math.cos(theta) - (m + m * z)
    return s * out


def test_adaface_ema_forward_and_gradcheck():
    cos, labels, norms = _batch(b=8, c=7, lo=-1.0, hi=1.0)
    margin = build_margin("adaface", scale=S, margin=0.4, h=0.333, t_alpha=0.01)
    out = margin(cos, labels, norms).logits
    valid = np.clip(np.array([float(norms[i]) for i, _ in _targets(labels)]), 0.001, 100)
    mean = 0.01 * valid.mean() + 0.99 * 20.0
    std = 0.01 * valid.std(ddof=1) + 0.99 * 100.0
    assert margin.batch_mean.item() == pytest.approx(mean, rel=1e-6)
    assert margin.batch_std.item() == pytest.approx(std, rel=1e-6)
    expected = _np_adaface(cos, labels, norms, S, 0.4, 0.333, 1e-3, margin.batch_mean.item(), margin.batch_std.item())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-5)
    margin.eval()
    assert torch.autograd.gradcheck(lambda c: margin(c, labels, norms).logits, (cos.clone().requires_grad_(True),))


# ---------------------------------------------------------------------------------------------------------------------
# MagFace


def _np_magface(cos, labels, norms, s, easy, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lam=35.0):
    c = cos.detach().numpy()
    out = c.copy()
    a = np.clip(norms.detach().numpy(), l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    for i, y in _targets(labels):
        cy, m = c[i, y], margin[i]
        ctm = math.cos(math.acos(cy) + m)
        if easy:
            out[i, y] = ctm if cy > 0 else cy
        else:
            out[i, y] = ctm if cy > math.cos(math.pi - m) else cy - math.sin(math.pi - m) * m
    return s * out, lam * np.mean(a / u_a**2 + 1 / a)


@pytest.mark.parametrize("easy", [True, False])
def test_magface_forward_aux_and_gradcheck(easy):
    cos, labels, norms = _batch(b=8, c=7)
    cos[2, int(labels[2])] = -0.9  # below cos(pi - m): fallback branch when easy_margin is off
    margin = build_margin("magface", scale=S, easy_margin=easy)
    out = margin(cos, labels, norms)
    logits, aux = _np_magface(cos, labels, norms, S, easy)
    np.testing.assert_allclose(out.logits.numpy(), logits, rtol=1e-12, atol=1e-10)
    assert out.aux_loss.item() == pytest.approx(aux, rel=1e-12)

    def fn(c, n):
        o = margin(c, labels, n)
        return o.logits, o.aux_loss

    assert torch.autograd.gradcheck(fn, (cos.clone().requires_grad_(True), norms.clone().requires_grad_(True)))


# ---------------------------------------------------------------------------------------------------------------------
# Shared properties


_ALL = [
    ("arcface", {}),
    ("arcface", {"exact_gradient": True}),
    ("cosface", {}),
    ("combined", {}),
    ("sphereface", {}),
    ("curricularface", {}),
    ("adaface", {}),
    ("magface", {}),
    ("magface", {"easy_margin": False}),
    ("subcenter", {}),
    ("softmax", {}),
]


def test_every_registered_margin_is_covered():
    assert {name for name, _ in _ALL} == set(list_margins())


@pytest.mark.parametrize(("name", "kw"), _ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cos_at_plus_minus_one_is_finite(name, kw, dtype):
    k = 3 if name == "subcenter" else 1
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=dtype)
    cos = cos.repeat_interleave(k, dim=1).requires_grad_(True)
    labels = torch.tensor([0, 0, 2, -1])
    norms = torch.tensor([0.0005, 15.0, 60.0, 200.0], dtype=dtype, requires_grad=True)
    out = build_margin(name, **kw)(cos, labels, norms)
    loss = torch.nn.functional.cross_entropy(out.logits, labels.clamp_min(0))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(cos.grad).all()
    assert norms.grad is None or torch.isfinite(norms.grad).all()


@pytest.mark.parametrize(("name", "kw"), _ALL)
def test_no_in_place_edits_and_label_minus_one_rows(name, kw):
    cos, labels, norms = _batch(b=6, c=36)
    labels = labels.remainder(12) if name == "subcenter" else labels  # 36 columns = 12 classes x 3 sub-centres
    labels[1] = -1
    copies = (cos.clone(), labels.clone(), norms.clone())
    versions = (cos._version, labels._version, norms._version)
    margin = build_margin(name, interclass_filtering_threshold=0.4, **kw)
    out = margin(cos, labels.view(-1, 1), norms)
    assert torch.equal(cos, copies[0]) and torch.equal(labels, copies[1]) and torch.equal(norms, copies[2])
    assert (cos._version, labels._version, norms._version) == versions
    # a row with label -1 only gets the (filtered) scaled cosines, no margin
    row = cos[1] if name != "subcenter" else cos[1].view(-1, 3).amax(1)
    row = torch.where(row > 0.4, torch.zeros_like(row), row)
    if name == "adaface":
        row = row.clamp(-1 + 1e-3, 1 - 1e-3)
    scale = margin.scale
    torch.testing.assert_close(out.logits[1], scale * row)


def test_subcenter_max_layout_and_build():
    cos, labels, _ = _batch(b=5, c=12)
    pooled = subcenter_max(cos, 3)
    for i in range(5):
        for c in range(4):
            assert pooled[i, c] == max(cos[i, c * 3 + k] for k in range(3))
    with_k = build_margin("cosface", subcenter_k=3)(cos, labels.clamp_max(3)).logits
    without = build_margin("cosface")(pooled, labels.clamp_max(3)).logits
    assert torch.equal(with_k, without)
    assert build_margin("subcenter").subcenter_k == 3
    with pytest.raises(ModelError, match="multiple"):
        subcenter_max(cos[:, :11], 3)


def test_interclass_filter_matches_arcface_torch():
    cos, labels, _ = _batch(b=10, c=20, dtype=torch.float32)
    ours = interclass_filter(cos, labels, 0.4)
    labels2 = labels.view(-1, 1)
    pos = torch.where(labels != -1)[0]
    dirty = (cos > 0.4).float()
    mask = torch.ones(len(pos), cos.shape[1])
    mask.scatter_(1, labels2[pos], 0)
    dirty[pos] *= mask
    assert torch.equal(ours, (1 - dirty) * cos)
    for i, y in _targets(labels):
        assert ours[i, y] == cos[i, y]


def test_errors_name_the_problem():
    with pytest.raises(ModelError, match="did you mean 'arcface'"):
        build_margin("arcfcae")
    with pytest.raises(ModelError, match="needs the embedding norms"):
        build_margin("adaface")(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ModelError, match="scale must be > 0"):
        build_margin("arcface", scale=0)
    with pytest.raises(ModelError, match="'cosface' has no angular_margin"):
        build_margin("cosface", angular_margin=0.5)
    with pytest.raises(ModelError, match="unexpected keyword"):
        build_margin("cosface", angle=0.5)


@pytest.mark.parametrize(
    ("name", "m1", "m2", "m3"),
    [
        ("arcface", 1.0, 0.5, 0.0),
        ("cosface", 1.0, 0.0, 0.4),
        ("combined", 1.0, 0.3, 0.2),
        ("sphereface", 1.35, 0.0, 0.0),
        ("curricularface", 1.0, 0.5, 0.0),
        ("adaface", 1.0, 0.0, 0.0),
        ("magface", 1.0, 0.0, 0.0),
        ("softmax", 1.0, 0.0, 0.0),
    ],
)
def test_generic_m1_m2_m3_keywords_accepted_when_neutral(name, m1, m2, m3):
    """A config written in m1/m2/m3 terms builds every margin; the values that matter reach it."""
    kw = {"multiplicative_margin": m1, "angular_margin": m2, "additive_margin": m3, "exact_gradient": False}
    margin = build_margin(name, scale=32.0, **kw)
    assert margin.scale == 32.0
    for key, value in kw.items():
        if hasattr(margin, key) and key != "exact_gradient":
            assert getattr(margin, key) == value


@pytest.mark.parametrize("name", ["curricularface", "adaface"])
def test_buffers_state_dict_round_trip(name):
    cos, labels, norms = _batch()
    trained = build_margin(name)
    for _ in range(3):
        trained(cos, labels, norms)
    fresh = build_margin(name)
    fresh.load_state_dict(trained.state_dict())
    assert set(trained.state_dict()) == ({"t"} if name == "curricularface" else {"batch_mean", "batch_std"})
    trained.eval()
    fresh.eval()
    assert torch.equal(trained(cos, labels, norms).logits, fresh(cos, labels, norms).logits)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_buffers_synced_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # spawn children inherit sys.path and import the worker module by name
    try:
        import _dist_worker

        cos, labels, norms = _batch(b=10, c=8, dtype=torch.float32, seed=3)
        labels[1] = 5
        out = tmp_path / "buffers"
        args = (2, _free_port(), cos, labels, norms, str(out))
        mp.spawn(_dist_worker.margin_buffers, args=args, nprocs=2, join=True)
    finally:
        sys.path.remove(here)
    whole_logits = build_margin("curricularface")(cos, labels).logits
    for rank, classes in enumerate(torch.arange(cos.shape[1]).chunk(2)):
        got = torch.load(f"{out}.{rank}", weights_only=True)["pfc_curricular_logits"]
        torch.testing.assert_close(got, whole_logits[:, classes])
    for name in ("curricularface", "adaface"):
        whole = build_margin(name)
        for _ in range(2):
            whole(cos, labels, norms)
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)
            for split in ("dp", "pfc"):
                for key, value in whole.state_dict().items():
                    torch.testing.assert_close(got[f"{split}_{name}"][key], value, rtol=1e-6, atol=1e-6)


def test_every_config_margin_builds_from_its_loss_section():
    """The engine's call: build_margin(loss.margin, every combined-margin key, **loss.margin_kwargs)."""
    from facetrain.config import MARGINS, LossConfig

    cos, labels, norms = _batch()
    for name in MARGINS:
        cfg = LossConfig(margin=name)
        margin = build_margin(
            cfg.margin,
            scale=cfg.scale,
            multiplicative_margin=cfg.multiplicative_margin,
            angular_margin=cfg.angular_margin,
            additive_margin=cfg.additive_margin,
            exact_gradient=cfg.exact_gradient,
            subcenter_k=cfg.subcenter_k,
            interclass_filtering_threshold=cfg.interclass_filtering_threshold,
            **cfg.margin_kwargs,
        )
        assert torch.isfinite(margin(cos, labels, norms).logits).all()


@pytest.mark.parametrize("name", ["arcface", "curricularface", "adaface", "magface"])
def test_margin_moves_with_module_conversions(name):
    """Margins are ordinary modules: .to()/.double() convert their buffers (nothing shadows nn.Module internals)."""
    margin = build_margin(name).double()
    for buffer in margin.buffers():
        assert buffer.dtype == torch.float64
    margin.to("cpu", dtype=torch.float32)
    for buffer in margin.buffers():
        assert buffer.dtype == torch.float32
