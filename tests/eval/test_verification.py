"""evaluate() against an independent float64 re-implementation of InsightFace's verification protocol."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.interpolate import interp1d
from sklearn.model_selection import KFold

from facetrain.errors import EvalError
from facetrain.eval.verification import evaluate, flip_sum_normalize, kfold_splits


def _reference(dist: np.ndarray, issame: np.ndarray, n_folds: int = 10, far_target: float = 1e-3) -> dict:
    """Upstream's calculate_roc / calculate_val written as loops over thresholds, in float64."""
    acc_thresholds = np.arange(0, 4, 0.01)
    val_thresholds = np.arange(0, 4, 0.001)

    def accuracy(thr, d, s):
        pred = np.less(d, thr)
        tp = np.sum(pred & s)
        fp = np.sum(pred & ~s)
        tn = np.sum(~pred & ~s)
        fn = np.sum(~pred & s)
        tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
        fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
        return tpr, fpr, float(tp + tn) / d.size

    def val_far(thr, d, s):
        pred = np.less(d, thr)
        return float(np.sum(pred & s)) / float(np.sum(s)), float(np.sum(pred & ~s)) / float(np.sum(~s))

    def interp_threshold(far_train):
        # Linear interpolation on the segment [last threshold with FAR <= target, next threshold]; when FARs are
        # distinct this is scipy's interp1d(kind='slinear'), which the test checks separately.
        below = np.nonzero(far_train <= far_target)[0]
        i = below[-1]
        if far_train[i] == far_target or i == far_train.size - 1:
            return val_thresholds[i]
        x0, x1 = far_train[i], far_train[i + 1]
        y0, y1 = val_thresholds[i], val_thresholds[i + 1]
        return y0 + (far_target - x0) * (y1 - y0) / (x1 - x0)

    accs, thrs, vals, fars, tprs, fprs = [], [], [], [], [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(dist.size)):
        acc_train = [accuracy(t, dist[train], issame[train])[2] for t in acc_thresholds]
        best = acc_thresholds[int(np.argmax(acc_train))]
        thrs.append(best)
        accs.append(accuracy(best, dist[test], issame[test])[2])
        rates = np.array([accuracy(t, dist[test], issame[test])[:2] for t in acc_thresholds])
        tprs.append(rates[:, 0])
        fprs.append(rates[:, 1])
        far_train = np.array([val_far(t, dist[train], issame[train])[1] for t in val_thresholds])
        thr = interp_threshold(far_train) if far_train.max() >= far_target else 0.0
        v, f = val_far(thr, dist[test], issame[test])
        vals.append(v)
        fars.append(f)
    return {
        "acc": np.array(accs),
        "thr": np.array(thrs),
        "val": np.mean(vals),
        "val_std": np.std(vals),
        "far": np.mean(fars),
        "tpr": np.mean(tprs, 0),
        "fpr": np.mean(fprs, 0),
    }


def _pairs_from_distances(dist: np.ndarray) -> np.ndarray:
    """(2N, 2) unit vectors whose pair i has squared L2 distance dist[i] (up to float64 rounding)."""
    angle = 2 * np.arcsin(np.sqrt(dist) / 2)
    emb = np.zeros((2 * dist.size, 2))
    emb[0::2, 0] = 1.0
    emb[1::2, 0] = np.cos(angle)
    emb[1::2, 1] = np.sin(angle)
    return emb


def _check(result, ref):
    np.testing.assert_array_equal(result.fold_accuracies, ref["acc"])
    np.testing.assert_array_equal(result.thresholds, ref["thr"])
    assert result.accuracy_mean == pytest.approx(np.mean(ref["acc"]), abs=1e-15)
    assert result.accuracy_std == pytest.approx(np.std(ref["acc"]), abs=1e-15)
    assert result.val == pytest.approx(ref["val"], abs=1e-12)
    assert result.val_std == pytest.approx(ref["val_std"], abs=1e-12)
    assert result.far == pytest.approx(ref["far"], abs=1e-12)
    np.testing.assert_allclose(result.tpr, ref["tpr"], atol=1e-15)
    np.testing.assert_allclose(result.fpr, ref["fpr"], atol=1e-15)


@pytest.mark.parametrize("n_pairs", [600, 1003, 47])
def test_matches_reference_on_random_embeddings(n_pairs):
    rng = np.random.default_rng(n_pairs)
    issame = rng.random(n_pairs) < 0.5
    issame[0::4], issame[1::4] = True, False  # every fold (>= 4 consecutive pairs) holds both classes
    a = rng.normal(size=(n_pairs, 16))
    b = np.where(issame[:, None], a + rng.normal(size=a.shape) * 0.9, rng.normal(size=a.shape))
    raw = np.empty((2 * n_pairs, 16), np.float32)
    raw[0::2], raw[1::2] = a, b
    emb = flip_sum_normalize(raw)
    result = evaluate(emb, issame)
    dist = np.sum((emb[0::2].astype(np.float64) - emb[1::2]) ** 2, 1)
    ref = _reference(np.sum(np.square(emb[0::2] - emb[1::2]), 1).astype(np.float64), issame)
    _check(result, ref)
    np.testing.assert_allclose(result.distances, dist, atol=1e-6)
    np.testing.assert_allclose(result.cosine_thresholds, 1 - ref["thr"] / 2)


def test_distances_on_grid_values_and_ties():
    """Distances exactly equal to grid thresholds (``d < thr`` must exclude them) and many duplicates."""
    rng = np.random.default_rng(1)
    n = 1234
    grid = np.arange(0, 4, 0.01)
    issame = rng.random(n) < 0.5
    # genuine pairs near the low grid values, impostors overlapping them; all values taken from the grid itself
    idx = np.where(issame, rng.integers(40, 120, n), rng.integers(100, 200, n))
    dist = grid[idx]
    emb = _pairs_from_distances(dist)
    result = evaluate(emb, issame)
    _check(result, _reference(result.distances, issame))
    # the reference sees exactly the distances evaluate() used; check that those are the grid values to ~1e-15
    np.testing.assert_allclose(result.distances, dist, atol=1e-12)


def test_val_interpolates_between_grid_points():
    """Impostor distances spread so the FAR target sits between thresholds of the 0.001 grid."""
    rng = np.random.default_rng(2)
    n = 4000
    issame = np.zeros(n, bool)
    issame[rng.permutation(n)[: n // 2]] = True
    dist = np.where(issame, rng.uniform(0.2, 1.4, n), rng.uniform(1.0, 3.0, n))
    emb = _pairs_from_distances(dist)
    result = evaluate(emb, issame)
    ref = _reference(result.distances, issame)
    _check(result, ref)
    assert 0 < result.far < 5e-3 and result.val > 0


def test_interpolation_equals_scipy_slinear_where_fars_are_distinct():
    from facetrain.eval import verification as v

    far = np.array([0.0, 1e-4, 5e-4, 2e-3, 1e-2])
    thr = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    expected = float(interp1d(far, thr, kind="slinear")(1e-3))
    assert float(np.interp(1e-3, far, thr)) == pytest.approx(expected, rel=1e-12)
    assert v.DEFAULT_FAR_TARGET == 1e-3


def test_val_unreachable_gives_threshold_zero():
    """Impostors all beyond the grid's reach (d = 4 exactly): training FAR never reaches 1e-3 -> threshold 0, VAL 0."""
    n = 200
    issame = np.arange(n) % 2 == 0
    dist = np.where(issame, 0.5, 4.0)
    emb = _pairs_from_distances(dist)
    result = evaluate(emb, issame)
    assert result.val == 0.0 and result.far == 0.0
    _check(result, _reference(result.distances, issame))
    assert result.accuracy_mean == 1.0


@pytest.mark.parametrize(("n", "k"), [(6000, 10), (1003, 10), (17, 10), (10, 10), (5, 1)])
def test_kfold_sizes_match_sklearn(n, k):
    ours = kfold_splits(n, k)
    if k == 1:
        assert np.array_equal(ours[0][0], np.arange(n)) and np.array_equal(ours[0][1], np.arange(n))
        return
    for (train, test), (rtrain, rtest) in zip(ours, KFold(n_splits=k, shuffle=False).split(np.arange(n))):
        np.testing.assert_array_equal(train, rtrain)
        np.testing.assert_array_equal(test, rtest)


def test_flip_sum_normalize_and_xnorm():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 5)).astype(np.float32)
    b = rng.normal(size=(8, 5)).astype(np.float32)
    out = flip_sum_normalize(a, b)
    s = a.astype(np.float64) + b
    np.testing.assert_allclose(out, s / np.linalg.norm(s, axis=1, keepdims=True), rtol=1e-6)
    assert out.dtype == np.float32
    issame = np.array([True, False, True, False])
    r = evaluate(out, issame, n_folds=2, raw=(a, b))
    expected = np.mean(
        np.concatenate([np.linalg.norm(a.astype(np.float64), axis=1), np.linalg.norm(b.astype(np.float64), axis=1)])
    )
    assert r.xnorm == pytest.approx(expected, rel=1e-9)


def test_bad_inputs_raise_one_line_errors():
    emb = np.ones((7, 4))
    with pytest.raises(EvalError, match="even"):
        evaluate(emb, np.ones(3, bool))
    with pytest.raises(EvalError, match="issame"):
        evaluate(np.ones((8, 4)), np.ones(3, bool))
    with pytest.raises(EvalError, match="n_folds"):
        evaluate(np.ones((8, 4)), np.ones(4, bool))


def test_far_target_hit_exactly_on_a_plateau_takes_the_largest_threshold():
    """2 folds of 1000 impostors: one impostor per fold at d=0.5 makes the training FAR exactly 1e-3 from 0.501 up to
    the next impostor (d=2.5): the documented choice takes the largest threshold of that plateau."""
    n = 4000
    issame = np.arange(n) % 2 == 0
    dist = np.where(issame, 1.0, 3.0)
    dist[[1, 2001]] = 0.5  # one low impostor in each fold
    dist[[3, 2003]] = 2.5
    emb = _pairs_from_distances(dist)
    result = evaluate(emb, issame, n_folds=2)
    _check(result, _reference(result.distances, issame, n_folds=2))
    # threshold 2.5 (the last grid value with FAR 1e-3, since d=2.5 is not < 2.5): all genuine (d=1) accepted
    assert result.val == 1.0 and result.far == pytest.approx(1e-3)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(20, 60),
    seed=st.integers(0, 2**31 - 1),
    on_grid=st.booleans(),
)
def test_property_matches_reference(n, seed, on_grid):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    # every fold holds both classes (upstream divides by zero otherwise): force its first two pairs
    starts = np.cumsum([0, *[len(t) for _, t in KFold(10).split(np.arange(n))]])[:-1]
    issame[starts], issame[starts + 1] = True, False
    if on_grid:  # distances exactly on grid values, many ties
        dist = np.arange(0, 4, 0.01)[rng.integers(0, 400, n)]
    else:
        dist = rng.uniform(0, 4, n)
    result = evaluate(_pairs_from_distances(dist), issame)
    _check(result, _reference(result.distances, issame))
