"""Incremental density-based clustering of unknown faces (core points, in the spirit of DBSCAN — Ester et al.
1996, "A density-based algorithm for discovering clusters in large spatial databases with noise" — and of immich's
incremental face clustering).

Two unknown faces are neighbours when their cosine similarity is ``>= threshold``. A face is a **core** face when
at least ``min_faces`` faces (itself included) are its neighbours. Two neighbouring core faces are **linked** when
they also share at least ``min_faces`` neighbours (themselves included): a shared-neighbour check (Jarvis & Patrick
1973, "Clustering using a similarity measure based on shared near neighbors") that keeps one chance match between
two people from chaining their clusters together, which plain DBSCAN does at scale. Each run only places faces that
have no cluster yet; faces already in a cluster never move, so re-running never reshuffles existing clusters:

1. pending core faces linked to each other form groups (connected components); a group linked to a core face of
   an existing cluster joins the cluster of the most similar such link, otherwise it becomes a new cluster;
2. pending non-core faces join the cluster of their most similar clustered core neighbour, or stay unclustered
   (noise) until enough similar faces arrive.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .library import Library

logger = logging.getLogger(__name__)

UNKNOWN_FACES = (
    "(person_id IS NULL OR assignment = 'unsure') AND (assignment IS NULL OR assignment IN ('unsure', 'split')) "
    "AND forgotten = 0"
)


def cluster_unknown(
    lib: Library, *, threshold: float | None = None, min_faces: int | None = None, block: int = 2048
) -> dict[str, int]:
    """Cluster the library's unknown faces incrementally (see the module docstring).

    Args:
        lib: an open library.
        threshold: neighbour cosine (default: the library's ``cluster_threshold``).
        min_faces: neighbours (self included) that make a core face (default: the library's ``min_faces``).
        block: query rows per similarity block (memory ~ block x N floats).

    Returns:
        Counts: ``pending`` faces considered, ``joined`` existing clusters, ``new_clusters``, ``clustered``
        (pending faces placed), ``noise`` (left unclustered).
    """
    threshold = float(lib.get("cluster_threshold")) if threshold is None else float(threshold)
    min_faces = int(lib.get("min_faces")) if min_faces is None else int(min_faces)
    ids, vectors = lib.embeddings(UNKNOWN_FACES)
    state = dict(
        (r[0], (r[1], r[2]))
        for r in lib.conn.execute(f"SELECT id, cluster_id, is_core FROM faces WHERE {UNKNOWN_FACES}")
    )
    labels = np.array([state[int(i)][0] or -1 for i in ids], np.int64)
    core = np.array([bool(state[int(i)][1]) for i in ids], bool)
    pending = np.flatnonzero(labels < 0)
    stats = {"pending": len(pending), "joined": 0, "new_clusters": 0, "clustered": 0, "noise": 0}
    if not len(pending):
        return stats
    neighbours = cluster_neighbours(vectors, pending, threshold, block=block)
    pending_core = [n for n, (idx, _) in zip(pending.tolist(), neighbours, strict=True) if len(idx) >= min_faces]
    core[pending_core] = True
    nb = dict(zip(pending.tolist(), neighbours, strict=True))

    # 1. connected components of pending core faces (union-find), then attach or create
    parent = {i: i for i in pending_core}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def linked(i: int, j: int) -> bool:
        """Core faces i, j (neighbours) share >= min_faces neighbours, themselves included."""
        if j not in nb:
            nb[j] = cluster_neighbours(vectors, np.array([j]), threshold, block=block)[0]
        return np.intersect1d(nb[i][0], nb[j][0], assume_unique=True).size >= min_faces

    core_set = set(pending_core)
    for i in pending_core:
        for j in nb[i][0].tolist():
            if j in core_set and j > i and linked(i, j):
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in pending_core:
        groups.setdefault(root(i), []).append(i)
    new_labels: dict[int, int] = {}
    with lib.transaction() as conn:
        for members in sorted(groups.values(), key=lambda m: min(m)):
            best, best_sim = -1, -2.0
            for i in members:
                idx, sims = nb[i]
                for j, s in zip(idx.tolist(), sims.tolist(), strict=True):
                    if labels[j] >= 0 and core[j] and s > best_sim and linked(i, j):
                        best, best_sim = int(labels[j]), s
            if best < 0:
                best = int(conn.execute("INSERT INTO clusters (created) VALUES (?)", (time.time(),)).lastrowid)
                stats["new_clusters"] += 1
            else:
                stats["joined"] += 1
            for i in members:
                labels[i] = best
                new_labels[i] = best
        # 2. border faces
        for i in pending.tolist():
            if i in core_set:
                continue
            idx, sims = nb[i]
            order = np.argsort(-sims, kind="stable")
            for j in idx[order].tolist():
                if labels[j] >= 0 and core[j]:
                    new_labels[i] = int(labels[j])
                    break
        for i in new_labels:
            labels[i] = new_labels[i]
        conn.executemany(
            "UPDATE faces SET cluster_id = ?, is_core = ? WHERE id = ?",
            [(int(label), int(core[i]), int(ids[i])) for i, label in new_labels.items()],
        )
        conn.execute(
            "DELETE FROM clusters WHERE id NOT IN (SELECT DISTINCT cluster_id FROM faces WHERE cluster_id IS NOT NULL)"
        )
        lib.bump()
    stats["clustered"] = len(new_labels)
    stats["noise"] = len(pending) - len(new_labels)
    return stats


def cluster_neighbours(
    vectors: np.ndarray, queries: np.ndarray, threshold: float, *, block: int = 2048
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query row index, the indices (self included) and cosines of rows with cosine ``>= threshold``.

    Args:
        vectors: (N, D) L2-normalized float32.
        queries: (Q,) row indices into ``vectors``.
        threshold: cosine similarity.
        block: query rows per matrix product.
    """
    out: list[tuple[np.ndarray, np.ndarray]] = []
    block = max(1, min(block, 64_000_000 // max(len(vectors), 1)))  # at most ~256 MB of similarities at once
    for start in range(0, len(queries), block):
        rows = queries[start : start + block]
        sims = vectors[rows] @ vectors.T
        sims[np.arange(len(rows)), rows] = 1.0  # self is always a neighbour, whatever the rounding
        r, c = np.nonzero(sims >= threshold)
        values = sims[r, c]
        bounds = np.searchsorted(r, np.arange(len(rows) + 1))
        for k in range(len(rows)):
            out.append((c[bounds[k] : bounds[k + 1]], values[bounds[k] : bounds[k + 1]]))
    return out


def cluster_summary(lib: Library, *, limit: int | None = None) -> list[dict]:
    """Unknown clusters, largest first: id, face count, photo count, a few face ids."""
    rows = lib.conn.execute(
        "SELECT cluster_id, COUNT(*), COUNT(DISTINCT photo_id), GROUP_CONCAT(id) FROM faces "
        "WHERE cluster_id IS NOT NULL AND not_face = 0 GROUP BY cluster_id ORDER BY COUNT(*) DESC, cluster_id"
        + (f" LIMIT {int(limit)}" if limit else "")
    ).fetchall()
    return [
        {"cluster": r[0], "faces": r[1], "photos": r[2], "face_ids": [int(x) for x in r[3].split(",")][:12]}
        for r in rows
    ]
