"""Quality-aware graph clustering and per-identity filtering of face embeddings.

Graph: nodes are L2-normalized embeddings; candidate edges are each node's ``k`` nearest neighbours (faiss when
installed, else an exact blockwise top-k with torch matmuls), or every pair inside an identity for dataset filtering.
An edge ``(i, j)`` is kept when

* quality-aware (when qualities ``q`` in [0, 1] are given): ``S_ij >= min(q_i, q_j) - delta`` — the open_midas
  dataset-filtering rule (``Q_ij - S_ij <= 0.1``): two low-quality faces need less similarity to be linked;
* otherwise: ``S_ij >= threshold``.

Communities: label propagation (Raghavan, Albert & Kumara, 2007) — every node repeatedly takes the label with the
largest summed edge weight among its neighbours; here vectorized over a ``scipy.sparse`` matrix, updating a random
half of the nodes per round (semi-synchronous, so two-colourable structures do not oscillate), with the current label
winning ties. ``method="leiden"`` uses igraph + leidenalg (optional extra ``graph``), ``"components"`` the connected
components. Nodes without any edge get label ``-1`` (noise).

Dataset filtering keeps, per identity, its main (largest) community; DBSCAN (cosine, eps 0.3, min_samples 2) is the
baseline the report compares against.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from facetrain.clean.common import (
    atomic_write_json,
    atomic_write_text,
    check_embeddings,
    l2_normalize,
    pyplot,
    relabel,
    save_figure,
    write_subset,
)
from facetrain.errors import DataError, require

log = logging.getLogger(__name__)

__all__ = [
    "knn",
    "build_graph",
    "label_propagation",
    "communities",
    "cluster_embeddings",
    "filter_identities",
    "dbscan_labels",
    "filter_identities_dbscan",
    "removal_metrics",
    "plot_clusters",
    "clean_graph",
    "GraphReport",
]

METHODS = ("label_propagation", "leiden", "components")


def knn(embeddings: np.ndarray, k: int, *, block: int = 1024, use_faiss: bool | None = None):
    """Exact k nearest neighbours by cosine similarity (self excluded).

    Args:
        embeddings: (N, D) embeddings (normalized here).
        k: neighbours per node (clipped to N - 1).
        block: rows per similarity block (memory ``block * N * 4`` bytes).
        use_faiss: None = faiss when importable.

    Returns:
        ``(indices (N, k) int64, similarities (N, k) float32)``, most similar first.
    """
    emb = l2_normalize(check_embeddings(embeddings, "knn"))
    n = emb.shape[0]
    k = int(min(k, n - 1))
    if k < 1:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    if use_faiss is None:
        try:
            import faiss  # noqa: F401

            use_faiss = True
        except ImportError:
            use_faiss = False
    if use_faiss:
        faiss = require("faiss", "graph", "faiss k-NN")
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        sims, idx = index.search(emb, k + 1)
        return _drop_self(idx, sims, k)
    import torch

    t = torch.from_numpy(emb)
    out_idx = np.empty((n, k), np.int64)
    out_sim = np.empty((n, k), np.float32)
    with torch.inference_mode():
        for start in range(0, n, block):
            stop = min(n, start + block)
            sims = t[start:stop] @ t.T
            rows = torch.arange(stop - start)
            sims[rows, rows + start] = -float("inf")
            values, indices = torch.topk(sims, k, dim=1)
            out_idx[start:stop] = indices.numpy()
            out_sim[start:stop] = values.numpy()
    return out_idx, out_sim


def _drop_self(idx: np.ndarray, sims: np.ndarray, k: int):
    n = idx.shape[0]
    is_self = idx == np.arange(n)[:, None]
    # keep the first k non-self entries of every row
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, 1).astype(np.int64), np.take_along_axis(sims, order, 1).astype(np.float32)


def build_graph(
    n: int,
    rows: np.ndarray,
    cols: np.ndarray,
    sims: np.ndarray,
    *,
    quality: np.ndarray | None = None,
    delta: float = 0.1,
    threshold: float = 0.5,
):
    """Symmetric weighted adjacency from candidate edges.

    Args:
        n: number of nodes.
        rows, cols: (E,) candidate edge endpoints.
        sims: (E,) cosine similarity of each candidate.
        quality: (n,) qualities in [0, 1] for the quality-aware rule, or None for the fixed threshold.
        delta: slack of the quality-aware rule, ``S_ij >= min(q_i, q_j) - delta``.
        threshold: fixed rule ``S_ij >= threshold``.

    Returns:
        ``scipy.sparse.csr_matrix`` (n, n) with weights ``max(S_ij, 1e-6)`` on kept edges, no self loops.
    """
    sparse = _scipy_sparse()

    rows, cols, sims = np.asarray(rows), np.asarray(cols), np.asarray(sims, np.float32)
    if quality is not None:
        q = np.asarray(quality, np.float32)
        if q.shape != (n,) or not np.all(np.isfinite(q)):
            raise DataError(f"quality must be a finite ({n},) array, got shape {q.shape}")
        limit = np.minimum(q[rows], q[cols]) - delta
    else:
        limit = np.float32(threshold)
    ok = (sims >= limit) & (rows != cols)
    w = np.maximum(sims[ok], 1e-6)
    adj = sparse.coo_matrix((w, (rows[ok], cols[ok])), shape=(n, n)).tocsr()
    return adj.maximum(adj.T).tocsr()


def label_propagation(adjacency, *, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """Semi-synchronous weighted label propagation (see the module docstring).

    Args:
        adjacency: symmetric ``scipy.sparse`` (n, n) non-negative weights.
        seed: seed of the random half updated each round.
        max_iter: rounds at most.

    Returns:
        (n,) int64 community labels ``0..L-1`` (by first appearance), ``-1`` for nodes without edges.
    """
    sparse = _scipy_sparse()

    adj = sparse.csr_matrix(adjacency)
    n = adj.shape[0]
    adj.eliminate_zeros()
    coo = adj.tocoo()
    src, dst, w = coo.row, coo.col, coo.data.astype(np.float64)
    labels = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    eps = 1e-9 * (w.min() if len(w) else 1.0)
    self_rows = np.arange(n)
    for _ in range(max_iter):
        votes = sparse.coo_matrix(
            (
                np.concatenate([w, np.full(n, eps)]),
                (np.concatenate([src, self_rows]), np.concatenate([labels[dst], labels])),
            ),
            shape=(n, n),
        ).tocsr()
        votes.sum_duplicates()
        best = _row_argmax(votes)
        unstable = best != labels
        if not unstable.any():
            break
        update = unstable & (rng.random(n) < 0.5)
        if not update.any():
            update = unstable
        labels[update] = best[update]
    degree = np.diff(adj.indptr)
    labels[degree == 0] = -1
    return _compact(labels)


def _row_argmax(m) -> np.ndarray:
    """Column of the largest entry of each row of a CSR matrix with no empty row (lowest column on ties)."""
    counts = np.diff(m.indptr)
    starts = m.indptr[:-1]
    row_max = np.maximum.reduceat(m.data, starts)
    rows = np.repeat(np.arange(m.shape[0]), counts)
    cand = np.where(m.data >= row_max[rows], m.indices.astype(np.int64), np.int64(m.shape[1]))
    return np.minimum.reduceat(cand, starts).astype(np.int64)


def _compact(labels: np.ndarray) -> np.ndarray:
    """Renumber non-negative labels 0..L-1 by first appearance; -1 stays."""
    out = np.full(labels.shape, -1, np.int64)
    valid = labels >= 0
    if valid.any():
        _, first, inverse = np.unique(labels[valid], return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        out[valid] = rank[inverse]
    return out


def communities(adjacency, *, method: str = "label_propagation", seed: int = 0) -> np.ndarray:
    """Community labels of a graph (``-1`` for isolated nodes) with the chosen method."""
    sparse = _scipy_sparse()

    if method not in METHODS:
        raise DataError(f"unknown community method {method!r}; choose one of {list(METHODS)}")
    adj = sparse.csr_matrix(adjacency)
    n = adj.shape[0]
    isolated = np.diff(adj.indptr) == 0
    if method == "label_propagation":
        return label_propagation(adj, seed=seed)
    if method == "components":
        _, labels = sparse.csgraph.connected_components(adj, directed=False)
        labels = labels.astype(np.int64)
    else:
        ig = require("igraph", "graph", "Leiden community detection")
        leidenalg = require("leidenalg", "graph", "Leiden community detection")
        upper = sparse.triu(adj, k=1).tocoo()
        g = ig.Graph(n=n, edges=np.column_stack([upper.row, upper.col]).tolist())
        part = leidenalg.find_partition(
            g, leidenalg.ModularityVertexPartition, weights=upper.data.tolist(), seed=int(seed)
        )
        labels = np.asarray(part.membership, np.int64)
    labels[isolated] = -1
    return _compact(labels)


def cluster_embeddings(
    embeddings: np.ndarray,
    *,
    quality: np.ndarray | None = None,
    k: int = 30,
    threshold: float = 0.5,
    delta: float = 0.1,
    method: str = "label_propagation",
    seed: int = 0,
) -> np.ndarray:
    """Cluster an unlabeled collection: k-NN graph, edge rule, communities.

    Args:
        embeddings: (N, D).
        quality: optional (N,) qualities in [0, 1] (quality-aware edges).
        k: neighbours per node.
        threshold: fixed similarity threshold (used when ``quality`` is None).
        delta: quality-aware slack.
        method: ``label_propagation`` | ``leiden`` | ``components``.
        seed: label-propagation seed.

    Returns:
        (N,) cluster labels, ``-1`` for noise.
    """
    idx, sims = knn(embeddings, k)
    n = idx.shape[0]
    rows = np.repeat(np.arange(n), idx.shape[1])
    adj = build_graph(n, rows, idx.ravel(), sims.ravel(), quality=quality, delta=delta, threshold=threshold)
    return communities(adj, method=method, seed=seed)


def filter_identities(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    quality: np.ndarray | None = None,
    threshold: float = 0.5,
    delta: float = 0.1,
    method: str = "label_propagation",
    max_dense: int = 4096,
    k: int = 30,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-identity graph filtering: each identity's main community is kept.

    Within an identity every pair is a candidate edge (identities above ``max_dense`` images use their ``k``
    nearest neighbours); one block-diagonal graph is built for all identities and communities found once.

    Args:
        embeddings: (N, D).
        labels: (N,) identity of each image.
        quality, threshold, delta, method, seed: see :func:`cluster_embeddings`.
        max_dense: identities up to this size use all pairs.
        k: neighbours for larger identities.

    Returns:
        ``(communities (N,) with -1 for noise, keep (N,) bool)``; ``keep`` marks the images in their identity's
        largest community.
    """
    emb = l2_normalize(check_embeddings(embeddings, "filter_identities"))
    labels = np.asarray(labels, np.int64)
    if labels.shape != (emb.shape[0],):
        raise DataError(f"labels have shape {labels.shape}, expected ({emb.shape[0]},)")
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    rows_l, cols_l, sims_l = [], [], []
    for members in np.split(order, bounds):
        m = len(members)
        if m < 2:
            continue
        if m <= max_dense:
            s = emb[members] @ emb[members].T
            r, c = np.triu_indices(m, 1)
            rows_l.append(members[r])
            cols_l.append(members[c])
            sims_l.append(s[r, c])
        else:
            idx, sims = knn(emb[members], k)
            rows_l.append(np.repeat(members, idx.shape[1]))
            cols_l.append(members[idx.ravel()])
            sims_l.append(sims.ravel())
    n = emb.shape[0]
    if rows_l:
        rows, cols, sims = np.concatenate(rows_l), np.concatenate(cols_l), np.concatenate(sims_l)
    else:
        rows = cols = np.zeros(0, np.int64)
        sims = np.zeros(0, np.float32)
    adj = build_graph(n, rows, cols, sims, quality=quality, delta=delta, threshold=threshold)
    comm = communities(adj, method=method, seed=seed)
    return comm, main_community_mask(comm, labels)


def main_community_mask(comm: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """True for images in the largest non-noise community of their identity (ties: the lowest community id)."""
    keep = np.zeros(len(comm), bool)
    valid = comm >= 0
    if not valid.any():
        return keep
    pairs = np.stack([labels[valid], comm[valid]], axis=1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    # uniq is sorted by (label, community); pick the largest count per label (first = lowest id on ties)
    order = np.lexsort((uniq[:, 1], -counts, uniq[:, 0]))
    uniq = uniq[order]
    first = np.ones(len(uniq), bool)
    first[1:] = uniq[1:, 0] != uniq[:-1, 0]
    main = dict(zip(uniq[first, 0].tolist(), uniq[first, 1].tolist()))
    main_of = np.array([main.get(int(lab), -2) for lab in labels], np.int64)
    keep[valid] = comm[valid] == main_of[valid]
    return keep


def dbscan_labels(embeddings: np.ndarray, *, eps: float = 0.3, min_samples: int = 2) -> np.ndarray:
    """The baseline: scikit-learn DBSCAN with the cosine metric; ``-1`` for noise."""
    cluster = require("sklearn.cluster", "clean", "the DBSCAN baseline")
    emb = check_embeddings(embeddings, "dbscan")
    return cluster.DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(emb).astype(np.int64)


def filter_identities_dbscan(
    embeddings: np.ndarray, labels: np.ndarray, *, eps: float = 0.3, min_samples: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """DBSCAN run per identity, then the same main-cluster rule as :func:`filter_identities`."""
    emb = l2_normalize(check_embeddings(embeddings, "dbscan"))
    labels = np.asarray(labels, np.int64)
    comm = np.full(len(labels), -1, np.int64)
    offset = 0
    order = np.argsort(labels, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        if len(members) < min_samples:
            continue
        lab = dbscan_labels(emb[members], eps=eps, min_samples=min_samples)
        ok = lab >= 0
        comm[members[ok]] = lab[ok] + offset
        offset += int(lab.max()) + 1 if ok.any() else 0
    return comm, main_community_mask(comm, labels)


def removal_metrics(is_noise: np.ndarray, removed: np.ndarray) -> dict:
    """Precision and recall of a removal against the true noise: ``precision = |removed & noise| / |removed|``,
    ``recall = |removed & noise| / |noise|`` (1.0 when the denominator is 0)."""
    is_noise, removed = np.asarray(is_noise, bool), np.asarray(removed, bool)
    hit = int((is_noise & removed).sum())
    return {
        "precision": hit / removed.sum() if removed.any() else 1.0,
        "recall": hit / is_noise.sum() if is_noise.any() else 1.0,
        "removed": int(removed.sum()),
        "noise": int(is_noise.sum()),
    }


def plot_clusters(
    embeddings: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str = "",
    max_points: int = 5000,
    tsne: bool = False,
    seed: int = 0,
) -> None:
    """2-D scatter (PCA, or t-SNE from scikit-learn) coloured by cluster, noise (-1) in red."""
    plt = pyplot()
    emb = l2_normalize(embeddings)
    rng = np.random.default_rng(seed)
    pick = np.arange(len(emb)) if len(emb) <= max_points else np.sort(rng.choice(len(emb), max_points, replace=False))
    x, lab = emb[pick], np.asarray(labels)[pick]
    if tsne and len(x) > 5:
        manifold = require("sklearn.manifold", "clean", "t-SNE plots")
        xy = manifold.TSNE(2, random_state=seed, perplexity=min(30.0, len(x) - 1.0), init="pca").fit_transform(x)
    else:
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 6))
    noise = lab < 0
    ax.scatter(xy[~noise, 0], xy[~noise, 1], c=lab[~noise] % 20, cmap="tab20", s=6, vmin=0, vmax=19)
    ax.scatter(xy[noise, 0], xy[noise, 1], c="red", s=10, marker="x", label="noise")
    ax.set_title(title or f"{len(set(lab[~noise].tolist()))} clusters, {int(noise.sum())} noise")
    if noise.any():
        ax.legend(loc="best")
    fig.tight_layout()
    save_figure(fig, path)


@dataclass
class GraphReport:
    """Summary of :func:`clean_graph` (also ``summary.json``)."""

    mode: str
    method: str
    images: int
    clusters: int
    noise: int
    kept: int
    dropped: int
    dbscan: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def clean_graph(
    source: str | os.PathLike,
    data: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    mode: str = "identity",
    quality: str | os.PathLike | None = None,
    threshold: float = 0.5,
    delta: float = 0.1,
    k: int = 30,
    method: str = "label_propagation",
    fmt: str = "rec",
    compare_dbscan: bool = True,
    plot: bool = True,
    tsne: bool = False,
    batch_size: int = 256,
    device: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> GraphReport:
    """Graph clustering (``mode="cluster"``) or per-identity filtering (``mode="identity"``) of a dataset.

    Args:
        source: an ``(N, D)`` ``.npy`` of embeddings in dataset order, or a model file (embeds ``data``).
        data: the dataset (needed for ``identity`` mode and for a model source).
        out_dir: receives ``clusters.csv`` (index, label, cluster, kept), ``summary.json``, ``clusters.png`` and, in
            ``identity`` mode, the cleaned dataset ``cleaned`` (or ``cleaned.lst``).
        mode: ``"identity"`` or ``"cluster"``.
        quality: optional per-image qualities: a ``.npy`` (N,) in [0, 1] or [0, 100], or the CSV of
            ``facetrain quality score`` (column ``quality`` 0..100); switches to the quality-aware edge rule.
        threshold, delta, k, method, seed: see :func:`cluster_embeddings`.
        fmt: cleaned dataset format ``rec`` | ``folder`` | ``list``.
        compare_dbscan: also run DBSCAN (cosine, eps 0.3, min_samples 2) and report how both agree.
        plot: write the 2-D plot.
        tsne: t-SNE instead of PCA for the plot.
        batch_size, device: for embedding with a model.
        overwrite: replace existing outputs.
    """
    if mode not in ("identity", "cluster"):
        raise DataError(f"unknown mode {mode!r}; use 'identity' or 'cluster'")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: exists and is not empty; pass --overwrite")
    emb = _load_source(source, data, batch_size=batch_size, device=device)
    q = load_quality(quality, len(emb)) if quality is not None else None
    labels = None
    if data is not None:
        from facetrain.data import open_dataset

        labels = np.asarray(open_dataset(data).labels(), np.int64)
        if len(labels) != len(emb):
            raise DataError(f"{source}: {len(emb)} embeddings but {data} has {len(labels)} images")
    elif mode == "identity":
        raise DataError("identity mode needs the dataset (DATA) for the labels")
    if mode == "identity":
        comm, keep = filter_identities(
            emb, labels, quality=q, threshold=threshold, delta=delta, method=method, seed=seed
        )
    else:
        comm = cluster_embeddings(emb, quality=q, k=k, threshold=threshold, delta=delta, method=method, seed=seed)
        keep = comm >= 0
    out_dir.mkdir(parents=True, exist_ok=True)
    report = GraphReport(
        mode=mode,
        method=method,
        images=len(emb),
        clusters=int(comm.max()) + 1 if (comm >= 0).any() else 0,
        noise=int((comm < 0).sum()),
        kept=int(keep.sum()),
        dropped=int((~keep).sum()),
    )
    if compare_dbscan:
        adjusted_rand_score = require("sklearn.metrics", "clean", "the DBSCAN comparison").adjusted_rand_score

        if mode == "identity":
            db_comm, db_keep = filter_identities_dbscan(emb, labels)
        else:
            db_comm = dbscan_labels(emb)
            db_keep = db_comm >= 0
        report.dbscan = {
            "adjusted_rand_index": float(adjusted_rand_score(db_comm, comm)),
            "dbscan_dropped": int((~db_keep).sum()),
            "agreement_on_dropped": removal_metrics(~db_keep, ~keep),
        }
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "label", "cluster", "kept"])
    lab_col = labels if labels is not None else np.full(len(emb), -1)
    for i in range(len(emb)):
        writer.writerow([i, int(lab_col[i]), int(comm[i]), int(keep[i])])
    files = [out_dir / "clusters.csv", out_dir / "summary.json"]
    atomic_write_text(files[0], buf.getvalue())
    if mode == "identity":
        kept_idx, new_labels, _ = relabel(keep, labels)
        dst = out_dir / ("cleaned.lst" if fmt == "list" else "cleaned")
        write_subset(data, dst, kept_idx, new_labels, fmt=fmt, overwrite=overwrite)
        files.append(dst)
    if plot:
        try:
            plot_clusters(emb, comm, out_dir / "clusters.png", seed=seed, tsne=tsne)
            files.append(out_dir / "clusters.png")
        except Exception as exc:  # matplotlib is optional; the CSV/JSON are complete without the picture
            log.warning("no cluster plot: %s", exc)
    report.files = [str(f) for f in files]
    atomic_write_json(files[1], report.to_dict())
    return report


def load_quality(path: str | os.PathLike, n: int) -> np.ndarray:
    """Per-image qualities in [0, 1] from a ``.npy`` ([0, 1] or [0, 100]) or a quality-score CSV (``quality``
    column, 0..100)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such quality file")
    if path.suffix == ".npy":
        q = np.load(path, allow_pickle=False).astype(np.float32).ravel()
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "quality" not in rows[0]:
            raise DataError(f"{path}: expected a CSV with a 'quality' column (from 'facetrain quality score')")
        q = np.array([float(r["quality"]) for r in rows], np.float32)
    else:
        raise DataError(f"{path}: quality must be a .npy or a .csv file")
    if len(q) != n or not np.all(np.isfinite(q)):
        raise DataError(f"{path}: {len(q)} qualities (all finite required) for {n} images")
    return q / 100.0 if q.max() > 1.0 else q


def _scipy_sparse():
    """scipy.sparse (+ csgraph), which comes with scikit-learn (extra ``clean``)."""
    sparse = require("scipy.sparse", "clean", "graph clustering")
    require("scipy.sparse.csgraph", "clean", "graph clustering")
    return sparse


def _load_source(source, data, *, batch_size: int, device: str | None) -> np.ndarray:
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such embeddings or model file")
    if source.suffix == ".npy":
        return l2_normalize(check_embeddings(np.load(source, allow_pickle=False), str(source)))
    if data is None:
        raise DataError(f"{source}: a model source needs the dataset (DATA) to embed")
    from facetrain.clean.common import embed_dataset
    from facetrain.data import open_dataset
    from facetrain.embed import load_embedder

    embedder = load_embedder(source, device=device, batch_size=batch_size)
    return embed_dataset(embedder, open_dataset(data), batch_size=batch_size, flip=False)
