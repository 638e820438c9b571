"""Clustering and identification at scale on synthetic identities (no model: embeddings written directly)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from facetrain.people.cluster import cluster_neighbours, cluster_unknown
from facetrain.people.identify import FaceIndex, identify
from facetrain.people.library import Library

DIM = 128
SIGMA = 0.75  # per-face noise: same-identity cosine ~ 1 / (1 + SIGMA^2) ~ 0.64, different ~ N(0, 1/128)


def _identities(rng, n: int) -> np.ndarray:
    centres = rng.standard_normal((n, DIM))
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _faces(rng, centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    x = centres[labels] + SIGMA * rng.standard_normal((len(labels), DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _insert(lib: Library, vectors: np.ndarray, start: int) -> np.ndarray:
    """One synthetic photo per face; returns the new face ids."""
    with lib.transaction() as conn:
        ids = []
        for k, v in enumerate(vectors):
            pid = conn.execute(
                "INSERT INTO photos (path, size, mtime, sha256, width, height, status, scanned_at) "
                "VALUES (?, 1, 0, ?, 100, 100, 'ok', 0)",
                (f"/synthetic/{start + k}.jpg", f"h{start + k}"),
            ).lastrowid
            ids.append(
                conn.execute(
                    "INSERT INTO faces (photo_id, idx, x1, y1, x2, y2, landmarks, det_score, blur, size, embedding) "
                    "VALUES (?, 0, 10, 10, 90, 90, ?, 0.99, 100, 80, ?)",
                    (pid, np.zeros(10, np.float32).tobytes(), v.tobytes()),
                ).lastrowid
            )
        lib.bump()
    return np.asarray(ids, np.int64)


def _labels(lib: Library, ids: np.ndarray) -> np.ndarray:
    found = dict(lib.conn.execute("SELECT id, cluster_id FROM faces").fetchall())
    return np.array([found[int(i)] if found[int(i)] is not None else -1 for i in ids])


def _purity_completeness(truth: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    clustered = labels >= 0
    pure = 0
    for c in np.unique(labels[clustered]):
        pure += np.bincount(truth[labels == c]).max()
    complete = 0
    for t in np.unique(truth):
        mine = labels[truth == t]
        complete += np.bincount(mine[mine >= 0]).max() if (mine >= 0).any() else 0
    return pure / max(clustered.sum(), 1), complete / len(truth)


def test_neighbours_match_float64_formula():
    rng = np.random.default_rng(1)
    v = _faces(rng, _identities(rng, 5), rng.integers(0, 5, 60))
    queries = np.array([0, 7, 59])
    got = cluster_neighbours(v, queries, 0.5, block=2)
    sims = v.astype(np.float64) @ v.astype(np.float64).T
    for q, (idx, vals) in zip(queries, got, strict=True):
        expected = np.flatnonzero(sims[q] >= 0.5)
        assert set(idx.tolist()) == set(expected.tolist()) and q in idx
        assert np.allclose(vals[idx != q], sims[q, idx[idx != q]], atol=1e-5)


def _scale_run(tmp_path, n_ids: int, per_id: int, n_single: int):
    rng = np.random.default_rng(0)
    lib = Library.create_empty(tmp_path / "lib.db", model_identity="synthetic", embedding_size=DIM)
    centres = _identities(rng, n_ids + n_single + 200)
    truth = np.concatenate([np.repeat(np.arange(n_ids), per_id), n_ids + np.arange(n_single)])
    rng.shuffle(truth)
    ids = _insert(lib, _faces(rng, centres, truth), 0)
    t0 = time.perf_counter()
    stats = cluster_unknown(lib, threshold=0.45, min_faces=3)
    seconds = time.perf_counter() - t0
    labels = _labels(lib, ids)
    multi = truth < n_ids
    purity, completeness = _purity_completeness(truth[multi], labels[multi])
    assert purity > 0.99 and completeness > 0.95, (purity, completeness)
    assert (labels[~multi] < 0).mean() > 0.95  # people seen once stay unclustered
    assert stats["new_clusters"] == pytest.approx(n_ids, rel=0.03)

    # incremental: more faces of old identities and some new identities; old labels never change
    extra_truth = np.concatenate([np.repeat(np.arange(100), 2), np.repeat(n_ids + n_single + np.arange(50), 4)])
    extra_ids = _insert(lib, _faces(rng, centres, extra_truth), len(ids))
    old_labels = labels.copy()
    cluster_unknown(lib, threshold=0.45, min_faces=3)
    assert np.array_equal(_labels(lib, ids)[old_labels >= 0], old_labels[old_labels >= 0])
    new_labels = _labels(lib, extra_ids)
    majority = {t: np.bincount(labels[(truth == t) & (labels >= 0)]).argmax() for t in range(100)}
    joined = np.mean([new_labels[k] == majority[t] for k, t in enumerate(extra_truth[:200])])
    assert joined > 0.95
    fresh = new_labels[200:]
    assert (fresh >= 0).mean() > 0.9 and not set(fresh[fresh >= 0]) & set(old_labels[old_labels >= 0])

    # identification: one reference face for 100 identities
    refs = {t: ids[np.flatnonzero(truth == t)[0]] for t in range(100)}
    with lib.transaction() as conn:
        for t, fid in refs.items():
            person = lib.person_id(f"p{t}", create=True)
            conn.execute("UPDATE faces SET person_id = ?, assignment = 'reference' WHERE id = ?", (person, int(fid)))
        lib.bump()
    lib.set_threshold(0.45)
    identify(lib)
    assigned = dict(
        lib.conn.execute(
            "SELECT f.id, p.name FROM faces f JOIN people p ON p.id = f.person_id WHERE f.assignment = 'auto'"
        ).fetchall()
    )
    enrolled = np.isin(truth, np.arange(100))
    names = np.array([assigned.get(int(i), "") for i in ids])
    expected = np.array([f"p{t}" for t in truth])
    reference_ids = set(map(int, refs.values()))
    not_ref = np.array([int(i) not in reference_ids for i in ids])
    tar = (names[enrolled & not_ref] == expected[enrolled & not_ref]).mean()
    false_accepts = (names[~enrolled] != "").mean()
    assert tar > 0.9 and false_accepts < 0.001, (tar, false_accepts)
    index = FaceIndex(lib).refresh()
    hit_ids, hit_sims = index.search(_faces(rng, centres, np.array([3])), k=5)
    owner = dict(
        zip(np.concatenate([ids, extra_ids]).tolist(), np.concatenate([truth, extra_truth]).tolist(), strict=True)
    )
    assert hit_ids.shape == (1, 5) and [owner[int(i)] for i in hit_ids[0]] == [3] * 5
    lib.close()
    return seconds


def test_cluster_and_identify_20k(tmp_path):
    _scale_run(tmp_path, n_ids=2000, per_id=9, n_single=2000)


@pytest.mark.slow
def test_cluster_and_identify_200k(tmp_path):
    seconds = _scale_run(tmp_path, n_ids=20000, per_id=9, n_single=20000)
    assert seconds < 600
