import math
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from facetrain.clean.graph import (
    build_graph,
    clean_graph,
    cluster_embeddings,
    dbscan_labels,
    filter_identities,
    filter_identities_dbscan,
    knn,
    label_propagation,
    removal_metrics,
)
from facetrain.errors import DataError


def _identities(c=100, per=15, d=64, noise=0.1, low_q=0.25, seed=0):
    """Clean images at cos ~0.74 to their centre (pair similarity ~0.55, quality 0.6); low-quality clean images at
    cos ~0.45 (similarity to clean ~0.33, quality 0.35); 10% label noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(c), per)
    noisy = rng.random(len(labels)) < noise
    shown = np.where(noisy, (labels + rng.integers(1, c, len(labels))) % c, labels)
    low = (~noisy) & (rng.random(len(labels)) < low_q)
    spread = np.where(low, 2.0, 0.9)[:, None]
    x = centres[shown] + spread * rng.standard_normal((len(labels), d)) / math.sqrt(d)
    quality = np.where(low, 0.35, 0.6) + 0.02 * rng.standard_normal(len(labels))
    return x.astype(np.float32), labels, noisy, quality.astype(np.float32), shown


def test_knn_matches_bruteforce_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    idx, sims = knn(x, 5, block=64)
    xn = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    ref = np.sort(s, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(sims, ref, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(s, idx, 1), ref, atol=1e-5)


def test_label_propagation_finds_cliques_and_noise():
    # two 4-cliques joined by one weak edge, plus an isolated node
    rows, cols, w = [], [], []
    for block in (range(0, 4), range(4, 8)):
        for i in block:
            for j in block:
                if i < j:
                    rows.append(i), cols.append(j), w.append(0.9)
    rows.append(3), cols.append(4), w.append(0.55)
    adj = build_graph(9, np.array(rows), np.array(cols), np.array(w, np.float32), threshold=0.5)
    lab = label_propagation(adj, seed=0)
    assert lab[8] == -1
    assert len(set(lab[:4])) == 1 and len(set(lab[4:8])) == 1 and lab[0] != lab[4]


def test_quality_aware_edges_follow_min_rule():
    rows, cols = np.array([0, 1]), np.array([1, 2])
    sims = np.array([0.35, 0.35], np.float32)
    q = np.array([0.4, 0.9, 0.9], np.float32)
    adj = build_graph(3, rows, cols, sims, quality=q, delta=0.1)
    assert adj[0, 1] > 0 and adj[1, 0] > 0  # 0.35 >= min(0.4, 0.9) - 0.1
    assert adj[1, 2] == 0  # 0.35 < 0.9 - 0.1


def test_filter_identities_removes_label_noise_and_quality_keeps_low_quality():
    x, labels, noisy, quality, _ = _identities()
    comm_q, keep_q = filter_identities(x, labels, quality=quality, delta=0.1)
    comm_t, keep_t = filter_identities(x, labels, threshold=0.5)
    _, keep_db = filter_identities_dbscan(x, labels)
    m_q, m_t, m_db = (removal_metrics(noisy, ~k) for k in (keep_q, keep_t, keep_db))
    print("quality-aware:", m_q, "\nfixed threshold:", m_t, "\nDBSCAN:", m_db)
    assert m_q["recall"] >= 0.9 and m_q["precision"] >= 0.8
    # the fixed threshold also drops clean low-quality faces; the quality-aware rule keeps them
    assert m_q["precision"] > m_t["precision"] + 0.2
    assert m_q["precision"] > m_db["precision"]


def test_cluster_embeddings_recovers_identities_like_dbscan():
    x, _, _, _, shown = _identities(c=150, per=10, noise=0.0, low_q=0.0, seed=3)
    t0 = time.perf_counter()
    lab = cluster_embeddings(x, k=15, threshold=0.5)
    seconds = time.perf_counter() - t0
    ari = adjusted_rand_score(shown, lab)
    ari_db = adjusted_rand_score(shown, dbscan_labels(x))
    print(f"graph ARI {ari:.3f} in {seconds:.2f}s, DBSCAN ARI {ari_db:.3f}")
    assert ari >= 0.95
    assert ari >= ari_db - 0.02


def test_nan_embeddings_rejected():
    x = np.ones((5, 4), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        cluster_embeddings(x)


def test_clean_graph_end_to_end(noisy_data, tmp_path):
    # embeddings constructed directly (.npy in dataset order) around the identity each image really shows; the
    # dataset's stored labels are wrong for the injected label noise
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, 32))
    n = len(noisy_data.labels)
    emb = centres[noisy_data.true_labels] + 0.9 * rng.standard_normal((n, 32)) / math.sqrt(32)
    path = tmp_path / "emb.npy"
    np.save(path, emb.astype(np.float32))
    report = clean_graph(path, noisy_data.path, tmp_path / "out", mode="identity", fmt="list")
    m = removal_metrics(
        noisy_data.mislabeled,
        np.array([int(r.split(",")[3]) == 0 for r in (tmp_path / "out" / "clusters.csv").read_text().splitlines()[1:]]),
    )
    print("clean_graph:", m, report.dbscan)
    assert m["recall"] >= 0.9 and m["precision"] >= 0.8
    assert (tmp_path / "out" / "clusters.png").is_file()
    lines = (tmp_path / "out" / "cleaned.lst").read_text().splitlines()
    assert len(lines) == report.kept
    assert "adjusted_rand_index" in report.dbscan


def test_faiss_knn_matches_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    idx_f, sims_f = knn(x, 7, use_faiss=True)
    idx_t, sims_t = knn(x, 7, use_faiss=False)
    np.testing.assert_allclose(sims_f, sims_t, atol=1e-5)
    assert (idx_f == idx_t).mean() > 0.99  # only exact ties may be ordered differently
    assert not (idx_f == np.arange(500)[:, None]).any()


@pytest.mark.parametrize("method", ["leiden", "components"])
def test_other_community_methods_recover_separated_identities(method):
    if method == "leiden":
        pytest.importorskip("igraph")
        pytest.importorskip("leidenalg")
    x, _, _, _, shown = _identities(c=40, per=10, noise=0.0, low_q=0.0, seed=4)
    lab = cluster_embeddings(x, k=10, threshold=0.5, method=method)
    assert adjusted_rand_score(shown, lab) >= 0.95
