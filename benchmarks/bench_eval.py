"""IJB-C scoring speed on synthetic features of the real sizes, against an upstream-style loop baseline.

Sizes: 469,375 images, 23,124 templates (3,531 gallery + 19,593 probe), 15,658,489 template pairs (gallery x probe,
as IJB-C's 1:1 list), 512-d features. ``--quick`` divides every size by 10. The baseline is InsightFace's
``image2template_feature`` loop (per template ``np.unique`` over its medias) plus its 100k-pair gather scoring,
run on the same data (with ``--quick``) or on a tenth of the templates otherwise. Also timed: 10-fold ``evaluate``
on 6,000 pairs (LFW size) and the 1:N identification (G1-sized gallery vs all probes).

Usage: python benchmarks/bench_eval.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def make_data(scale: float, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_images = int(469_375 * scale)
    n_gallery = int(3_531 * scale)
    n_probe = int(19_593 * scale)
    n_pairs = int(15_658_489 * scale)
    n_templates = n_gallery + n_probe
    subjects = np.r_[np.arange(n_gallery), rng.integers(0, n_gallery, n_probe)]
    # every template gets at least one image, the rest spread at random; ~3 images per media
    templates = np.r_[np.arange(n_templates), rng.integers(0, n_templates, n_images - n_templates)]
    templates.sort()
    medias = templates * 1000 + rng.integers(0, 7, n_images)
    centres = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    feats = centres[subjects[templates]]
    feats += 8.0 * rng.standard_normal(feats.shape, dtype=np.float32)
    # pairs: every genuine (gallery, probe) pair plus random impostor pairs, like IJB-C's enrollment x probe list
    probe_ids = np.arange(n_gallery, n_templates)
    genuine = np.stack([subjects[probe_ids], probe_ids], 1)
    n_imp = n_pairs - genuine.shape[0]
    imp = np.stack([rng.integers(0, n_gallery, n_imp), rng.integers(n_gallery, n_templates, n_imp)], 1)
    pairs = np.concatenate([genuine, imp])
    label = subjects[pairs[:, 0]] == subjects[pairs[:, 1]]
    return feats, templates, medias, pairs, label, subjects, n_gallery


def upstream_pool(feats, templates, medias):
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), feats.shape[1]), np.float32)
    for i, t in enumerate(unique_templates):
        (ind_t,) = np.where(templates == t)
        face_feats = feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for u, ct in zip(unique_medias, counts):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(face_feats[ind_m] if ct == 1 else np.mean(face_feats[ind_m], 0, keepdims=True))
        out[i] = np.sum(np.concatenate(media_feats), 0)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return unique_templates, out


def upstream_score(template_feats, unique_templates, p1, p2):
    template2id = np.zeros(max(unique_templates) + 1, dtype=int)
    template2id[unique_templates] = np.arange(len(unique_templates))
    score = np.zeros(len(p1))
    batch = 100_000
    for s in range(0, len(p1), batch):
        f1 = template_feats[template2id[p1[s : s + batch]]]
        f2 = template_feats[template2id[p2[s : s + batch]]]
        score[s : s + batch] = np.sum(f1 * f2, -1)
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/10 of IJB-C's sizes")
    parser.add_argument("--threads", type=int, default=0, help="BLAS threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from facetrain.eval.ijb import identification_metrics, pool_templates, score_template_pairs
    from facetrain.eval.roc import roc_curve, tar_at_far_nearest
    from facetrain.eval.verification import evaluate, flip_sum_normalize

    scale = 0.1 if args.quick else 1.0
    t0 = time.perf_counter()
    feats, templates, medias, pairs, label, subjects, n_gallery = make_data(scale, 512)
    t_make = time.perf_counter() - t0
    rows = []

    t = time.perf_counter()
    ids, tfeats = pool_templates(feats, templates, medias)
    t_pool = time.perf_counter() - t
    t = time.perf_counter()
    scores = score_template_pairs(tfeats, ids, pairs[:, 0], pairs[:, 1])
    t_score = time.perf_counter() - t
    t = time.perf_counter()
    fpr, tpr, _ = roc_curve(label, scores)
    tar = tar_at_far_nearest(fpr, tpr)
    t_roc = time.perf_counter() - t
    t = time.perf_counter()
    ident = identification_metrics(tfeats[n_gallery:], subjects[n_gallery:], tfeats[:n_gallery], subjects[:n_gallery])
    t_1n = time.perf_counter() - t
    total = t_pool + t_score + t_roc
    rows.append(("facetrain pool templates", len(templates), t_pool))
    rows.append(("facetrain score pairs", len(pairs), t_score))
    rows.append(("facetrain ROC + TAR@FAR", len(pairs), t_roc))
    rows.append(("facetrain 1:1 total", len(pairs), total))
    rows.append((f"facetrain 1:N ({len(subjects) - n_gallery} probes x {n_gallery} gallery)", len(subjects), t_1n))

    # upstream-style baseline on a subset of templates (all of them with --quick)
    frac = 1.0 if args.quick else 0.1
    keep_t = int(len(ids) * frac)
    img_mask = templates < keep_t
    t = time.perf_counter()
    up_ids, up_feats = upstream_pool(feats[img_mask], templates[img_mask], medias[img_mask])
    t_up_pool = (time.perf_counter() - t) / frac
    # on a subset, any template pairs of the subset do: the cost depends only on the pair count
    sub = pairs if frac == 1 else pairs[: int(len(pairs) * frac)] % keep_t
    t = time.perf_counter()
    up_scores = upstream_score(up_feats, up_ids, sub[:, 0], sub[:, 1])
    t_up_score = (time.perf_counter() - t) / frac
    if frac == 1.0:
        np.testing.assert_allclose(up_scores, scores, atol=1e-4)  # same numbers as the vectorized path
        np.testing.assert_allclose(up_feats, tfeats, atol=1e-4)
    scale_note = "" if frac == 1 else " (timed on 1/10, x10)"
    rows.append((f"upstream-style pool loop{scale_note}", len(templates), t_up_pool))
    rows.append((f"upstream-style 100k-chunk scoring{scale_note}", len(pairs), t_up_score))

    # 10-fold verification at LFW size
    rng = np.random.default_rng(1)
    n = 6000
    same = rng.random(n) < 0.5
    a = rng.standard_normal((n, 512), dtype=np.float32)
    b = np.where(
        same[:, None],
        a + rng.standard_normal(a.shape, dtype=np.float32),
        rng.standard_normal(a.shape, dtype=np.float32),
    )
    emb = np.empty((2 * n, 512), np.float32)
    emb[0::2], emb[1::2] = a, b
    t = time.perf_counter()
    res = evaluate(flip_sum_normalize(emb), same)
    t_ver = time.perf_counter() - t
    rows.append(("evaluate() 10-fold, 6000 pairs", n, t_ver))

    print(f"IJB-C-sized synthetic data ({'quick, 1/10' if args.quick else 'full'}; built in {t_make:.1f} s)\n")
    print("| step | items | seconds | items/s |")
    print("|---|---:|---:|---:|")
    for name, items, sec in rows:
        print(f"| {name} | {items:,} | {sec:.2f} | {items / max(sec, 1e-9):,.0f} |")
    print(
        f"\nTAR@FAR=1e-4 {tar[1e-4]:.4f}, 1e-3 {tar[1e-3]:.4f}; 1:N top-1 {ident.top1:.4f}; "
        f"10-fold accuracy {res.accuracy_mean:.4f}; speed-up over upstream loop (pool+score) "
        f"{(t_up_pool + t_up_score) / max(t_pool + t_score, 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
