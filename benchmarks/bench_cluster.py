"""Graph clustering and per-identity filtering speed on synthetic embeddings, against DBSCAN.

Embeddings: ``N`` unit vectors in ``D = 128`` dims around ``N / 10`` identity centres (pair similarity ~0.55),
10% label noise for the filtering case. Timed: the k-NN graph (faiss if installed, else exact blockwise torch top-k),
label propagation, the whole unlabeled clustering, per-identity filtering (quality-aware), and scikit-learn DBSCAN
(cosine, eps 0.3, min_samples 2) on at most 20,000 embeddings (it is quadratic). ``--quick``: N = 10,000.

Usage: python benchmarks/bench_cluster.py [--quick] [--n N] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def make(n: int, dim: int = 128, per: int = 10, noise: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = n // per
    centres = rng.standard_normal((c, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(c), per)
    noisy = rng.random(n) < noise
    shown = np.where(noisy, (labels + rng.integers(1, c, n)) % c, labels)
    x = centres[shown] + 0.9 * rng.standard_normal((n, dim), dtype=np.float32) / math.sqrt(dim)
    return x.astype(np.float32), labels, shown, noisy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 embeddings")
    ap.add_argument("--n", type=int, default=None, help="number of embeddings (default 100,000)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--no-faiss", action="store_true", help="use the exact torch top-k even when faiss is installed")
    args = ap.parse_args()
    import torch
    from sklearn.metrics import adjusted_rand_score

    from facetrain.clean.graph import (
        build_graph,
        dbscan_labels,
        filter_identities,
        knn,
        label_propagation,
        removal_metrics,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (10_000 if args.quick else 100_000)
    x, labels, shown, noisy = make(n)
    rows = []

    t = time.perf_counter()
    try:
        import faiss  # noqa: F401

        use_faiss = not args.no_faiss
    except ImportError:
        use_faiss = False
    idx, sims = knn(x, 30, use_faiss=use_faiss)
    t_knn = time.perf_counter() - t
    rows.append(("k-NN graph (k=30)", n, t_knn, "faiss IndexFlatIP" if use_faiss else "exact torch top-k"))
    t = time.perf_counter()
    adj = build_graph(n, np.repeat(np.arange(n), idx.shape[1]), idx.ravel(), sims.ravel(), threshold=0.4)
    comm = label_propagation(adj)
    t_lp = time.perf_counter() - t
    ari = adjusted_rand_score(shown, comm)
    rows.append(("edges + label propagation", n, t_lp, f"ARI {ari:.3f}, {comm.max() + 1} clusters"))
    rows.append(("unlabeled clustering total", n, t_knn + t_lp, f"{(t_knn + t_lp) / n * 1e6:.1f} us/embedding"))

    quality = np.full(n, 0.6, np.float32)
    t = time.perf_counter()
    _, keep = filter_identities(x, labels, quality=quality, delta=0.1)
    m = removal_metrics(noisy, ~keep)
    rows.append(
        (
            "per-identity filtering (quality-aware)",
            n,
            time.perf_counter() - t,
            f"noise precision {m['precision']:.3f} recall {m['recall']:.3f}",
        )
    )

    n_db = min(n, 20_000)
    t = time.perf_counter()
    db = dbscan_labels(x[:n_db])
    rows.append(
        (
            "DBSCAN (cosine, eps 0.3, min_samples 2)",
            n_db,
            time.perf_counter() - t,
            f"ARI {adjusted_rand_score(shown[:n_db], db):.3f}",
        )
    )

    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| step | embeddings | seconds | note |")
    print("|---|---:|---:|---|")
    for name, count, seconds, note in rows:
        print(f"| {name} | {count:,} | {seconds:.2f} | {note} |")


if __name__ == "__main__":
    main()
