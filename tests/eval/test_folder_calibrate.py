"""eval folder / calibrate: pairs, TAR@FAR threshold, EER, leave-one-out rank-1, Clopper-Pearson, CLI."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from facetrain.eval.calibrate import calibrate_scores, clopper_pearson, regularized_beta
from facetrain.eval.folder import FolderEmbeddings, evaluate_folder_embeddings, make_pairs
from facetrain.eval.roc import equal_error_rate, threshold_at_far


def _embeddings(rng, n_ids=12, per_id=(1, 6), dim=8, noise=0.9):
    labels = np.concatenate([np.full(rng.integers(*per_id), c) for c in range(n_ids)])
    centres = rng.normal(size=(n_ids, dim))
    emb = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def ref_threshold(labels, scores, far):
    """Brute force: the smallest candidate threshold with FAR <= far (candidates: every score and just above)."""
    scores = np.asarray(scores, np.float64)
    imp, gen = scores[~labels], scores[labels]
    cands = np.unique(np.r_[scores, np.nextafter(scores, np.inf)])
    ok = [t for t in cands if np.mean(imp >= t) <= far]
    t = min(ok)
    return t, np.mean(imp >= t), np.mean(gen >= t)


def ref_rank1(emb, labels):
    emb = emb.astype(np.float64)
    correct = probes = 0
    classes = np.unique(labels)
    for i in range(len(labels)):
        if np.sum(labels == labels[i]) < 2:
            continue
        probes += 1
        best_other, own = -np.inf, None
        for c in classes:
            mask = labels == c
            if c == labels[i]:
                mask = mask.copy()
                mask[i] = False
            t = emb[mask].sum(0)
            s = emb[i] @ t / np.linalg.norm(t)
            if c == labels[i]:
                own = s
            else:
                best_other = max(best_other, s)
        correct += own > best_other
    return correct / probes, probes


def test_folder_metrics_match_bruteforce():
    rng = np.random.default_rng(0)
    emb, labels = _embeddings(rng)
    folder = FolderEmbeddings(emb, labels, [f"{i}.png" for i in range(len(labels))], [str(c) for c in range(12)], 1.0)
    res = evaluate_folder_embeddings(folder, max_pairs=None, fars=(1e-2, 1e-1))
    n = len(labels)
    assert res.n_pairs == n * (n - 1) // 2 and res.all_pairs
    i, j = res.pair_index[:, 0], res.pair_index[:, 1]
    np.testing.assert_allclose(res.scores, np.sum(emb[i].astype(np.float64) * emb[j], 1), atol=1e-6)
    for far, op in res.operating_points.items():
        t, f, tar = ref_threshold(res.issame, res.scores, far)
        assert op.threshold == t and op.far == pytest.approx(f) and op.tar == pytest.approx(tar)
    rank1, probes = ref_rank1(emb, labels)
    assert res.rank1 == pytest.approx(rank1) and res.n_probes == probes
    # EER: FAR and FRR cross between the neighbouring ROC points
    eer, thr = equal_error_rate(res.issame, res.scores)
    imp, gen = res.scores[~res.issame], res.scores[res.issame]
    assert abs(np.mean(imp >= thr) - np.mean(gen < thr)) <= 2 / min(len(imp), len(gen)) + 1e-9
    assert res.eer == eer and 0 <= eer <= 0.5


def test_make_pairs_all_or_balanced_sample():
    labels = np.repeat(np.arange(30), 5)
    pairs, all_pairs = make_pairs(labels, max_pairs=None, seed=1)
    assert all_pairs and len(pairs) == 150 * 149 // 2
    sample, all_pairs = make_pairs(labels, max_pairs=1000, seed=1)
    assert not all_pairs and len(sample) == 1000
    same = labels[sample[:, 0]] == labels[sample[:, 1]]
    assert same.sum() == 300  # all 30 * 10 genuine pairs, the rest impostors
    assert np.all(sample[:, 0] < sample[:, 1]) and len(np.unique(sample, axis=0)) == 1000
    again, _ = make_pairs(labels, max_pairs=1000, seed=1)
    np.testing.assert_array_equal(sample, again)
    balanced, _ = make_pairs(labels, max_pairs=200, seed=2)
    assert (labels[balanced[:, 0]] == labels[balanced[:, 1]]).sum() == 100


def test_threshold_at_far_ties_and_limits():
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.5, 0.4, 0.5, 0.5, 0.2, 0.1])
    op = threshold_at_far(labels, scores, 0.25)  # one impostor allowed, but two tie at 0.5 -> accept none of them
    assert op.threshold > 0.5 and op.far == 0 and op.tar == pytest.approx(1 / 3)
    op = threshold_at_far(labels, scores, 0.5)  # two allowed: both 0.5 impostors accepted
    assert op.threshold == np.nextafter(0.2, 1) and op.far == 0.5 and op.tar == 1.0


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (5, 100_000), (995, 1000)])
def test_clopper_pearson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    lo, hi = clopper_pearson(k, n, 0.05)
    ref_lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    ref_hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    assert lo == pytest.approx(ref_lo, rel=1e-8, abs=1e-14) and hi == pytest.approx(ref_hi, rel=1e-8)
    # I_x(1, 1) = x and I_x(a, b) = 1 - I_{1-x}(b, a)
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)
    assert regularized_beta(0.2, 2.5, 7) == pytest.approx(1 - regularized_beta(0.8, 7, 2.5), abs=1e-13)
    assert math.isfinite(lo)


def test_calibrate_scores_reports_unreliable_far():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(200, bool), np.zeros(5000, bool)]
    scores = np.r_[rng.normal(0.6, 0.1, 200), rng.normal(0.0, 0.1, 5000)]
    res = calibrate_scores(labels, scores, far=1e-3)
    t, f, tar = ref_threshold(labels, scores, 1e-3)
    assert res.threshold == t and res.far == pytest.approx(f) and res.tar == pytest.approx(tar) and res.reliable
    assert res.far_interval[0] <= res.far <= res.far_interval[1]
    assert not calibrate_scores(labels, scores, far=1e-4).reliable


# ---------------------------------------------------------------- CLI on a folder of faces


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 14 * 14, 8)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture
def face_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "people"
    for c in range(5):
        base = cv2.resize(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), (112, 112))
        (root / f"person{c}").mkdir(parents=True)
        for k in range(4 if c else 1):
            img = np.clip(base.astype(int) + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"person{c}" / f"{k}.png"), img)
    model = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet().eval()).save(str(model))
    return root, model


def test_cli_folder_and_hard_pairs(tmp_path, run_cli, face_folder):
    from facetrain.data.bins import load_bin_encoded

    root, model = face_folder
    out_json, hard = tmp_path / "folder.json", tmp_path / "hard.bin"
    code, out, err = run_cli("eval", "folder", model, root, "--hard-pairs-bin", hard, "--hard-pairs", "3",
                             "--json", out_json, "--far", "0.1")  # fmt: skip
    assert code == 0, err
    assert "rank-1" in out and "TAR@FAR=1e-01" in out
    data = json.loads(out_json.read_text())["results"]
    assert data["n_images"] == 17 and data["n_pairs"] == 17 * 16 // 2 and data["n_probes"] == 16
    encoded, issame = load_bin_encoded(hard)
    assert len(encoded) == 12 and list(issame) == [True] * 3 + [False] * 3
    files = {p.read_bytes() for p in root.rglob("*.png")}
    assert all(e in files for e in encoded)


def test_cli_calibrate_folder_and_bin(tmp_path, run_cli, face_folder):
    from facetrain.data.bins import write_bin

    root, model = face_folder
    code, out, err = run_cli("eval", "calibrate", model, root, "--far", "0.05", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert "threshold (cosine)" in out and "95% interval" in out
    res = json.loads((tmp_path / "c.json").read_text())["results"]
    assert res["n_genuine"] == 4 * 6 and res["n_impostor"] == 17 * 16 // 2 - 24 and res["far"] <= 0.05
    pngs = sorted(root.rglob("*.png"))
    images = [p.read_bytes() for p in pngs[:16]]
    write_bin(tmp_path / "c.bin", images, [i % 2 == 0 for i in range(8)])
    code, out, err = run_cli("eval", "calibrate", model, tmp_path / "c.bin", "--far", "0.01")
    assert code == 0, err and "warning" in out
