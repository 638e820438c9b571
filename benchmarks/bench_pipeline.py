"""Training data-pipeline throughput: decode + augment + collate, per preset and worker count, vs bare decode.

On a generated ``.rec`` of synthetic 112x112 faces (``SyntheticIdentities``, JPEG q95) it measures:

1. bare decode: ``RecordDataset[i]`` in one process, shuffled order (the floor every row pays), re-measured beside
   every row (the ratio uses the mean of the measurements just before and after it);
2. ``build_train_loader`` (ResumableDistributedSampler, uint8 CHW batches of 128) for presets none / flip / strong
   at 0, 1 and 2 workers: images/s after the first batch (worker start-up excluded), and images/s per worker
   (0 workers counts the main process as one).

    python benchmarks/bench_pipeline.py            # 2,000 images, one timed epoch per row
    python benchmarks/bench_pipeline.py --quick    # 600 images
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from facetrain.data.images import encode_image
from facetrain.data.loader import ResumableDistributedSampler, build_train_loader
from facetrain.data.recordio import RecordDataset, write_rec_dataset
from facetrain.data.synthetic import SyntheticIdentities


def _write_rec(path: Path, n: int) -> None:
    faces = SyntheticIdentities(max(n // 20, 1), 20, seed=0)
    samples = ((encode_image(faces[i][0], ext=".jpg", quality=95), int(faces[i][1])) for i in range(n))
    write_rec_dataset(path, samples)


def _decode_rate(ds: RecordDataset, repeats: int) -> float:
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in order:
            ds[i]
    return repeats * len(order) / (time.perf_counter() - t0)


def _loader_rate(ds: RecordDataset, preset: str, workers: int, batch: int) -> float:
    sampler = ResumableDistributedSampler(len(ds), seed=0)
    loader = build_train_loader(
        ds, batch_size=batch, sampler=sampler, num_workers=workers, augment=preset, pin_memory=False, seed=0
    )
    it = iter(loader)
    first = next(it)  # worker start-up (and the lazy albumentations build) excluded
    assert first[0].dtype == torch.uint8 and first[0].shape[1:] == (3, 112, 112)
    t0 = time.perf_counter()
    n = sum(len(b[1]) for b in it)
    dt = time.perf_counter() - t0
    del it, loader
    return n / dt if n else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 images")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--presets", default="none,flip,strong")
    ap.add_argument("--workers", default="0,1,2")
    args = ap.parse_args()
    n = args.images or (600 if args.quick else 2_000)
    presets = [p for p in args.presets.split(",") if p]
    workers = [int(w) for w in args.workers.split(",") if w]
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp_name:
        rec = Path(tmp_name) / "ds"
        _write_rec(rec, n)
        ds = RecordDataset(rec)
        floors = [_decode_rate(ds, repeats=1)]
        rows = []
        for preset in presets:
            for w in workers:
                r = _loader_rate(ds, preset, w, min(args.batch, n // 3))
                floors.append(_decode_rate(ds, repeats=1))  # re-measured beside each row: the machine is shared
                floor = (floors[-1] + floors[-2]) / 2
                rows.append((preset, str(w), f"{r:,.0f}", f"{r / max(w, 1):,.0f}", f"{r / floor:.2f}x"))
        floor = float(np.median(floors))
        rows.insert(0, ("bare decode (RecordDataset[i]), median", "-", f"{floor:,.0f}", f"{floor:,.0f}", "1.00x"))

    print(
        f"\n### Data pipeline ({n:,} x 112x112 JPEG q95 synthetic faces, batch {args.batch}, "
        f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f})\n"
    )
    print("| pipeline | workers | img/s | img/s per worker | vs bare decode |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
