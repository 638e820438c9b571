"""RecordIO reader throughput vs the JPEG decode floor, DataLoader scaling, and idx opening cost.

Measures, in one process on a generated 112x112 JPEG (q95) ``.rec``:

1. the decode floor: a bare ``cv2.imdecode`` loop over the same encoded bytes held in memory, random order;
2. ``RecordDataset[i]`` random access (pread + unpack + decode to RGB), same order; ratio reader / floor;
3. ``RecordDataset.labels()`` (header-only read of every record);
4. a torch DataLoader over the dataset with 1 and 2 workers (images/s after the first batch);
5. ``read_idx`` on a synthetic 5.8M-line idx (MS1MV3's size), in a fresh subprocess: seconds and RSS growth.

Targets: reader >= 0.9x floor; idx open < 2 s and < 200 MB.

    python benchmarks/bench_reader.py            # 10,000 records
    python benchmarks/bench_reader.py --quick    # 2,000 records, 1.5M-line idx
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from facetrain.data.images import encode_image
from facetrain.data.recordio import RecordDataset, write_idx, write_rec_dataset


def _images(n: int, seed: int = 0) -> list[bytes]:
    """Smooth random faces-sized images (upsampled noise + fine noise), JPEG q95, ~4-6 KB each like MS1M crops."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        img = cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img += rng.integers(-6, 7, img.shape, dtype=np.int16)
        out.append(encode_image(np.clip(img, 0, 255).astype(np.uint8), ext=".jpg", quality=95))
    return out


def _rates(fns: list, order: np.ndarray, repeats: int, block: int = 250) -> list[float]:
    """Images/s of each function, alternating between them every ``block`` images for ``repeats`` passes.

    Fine-grained alternation makes the comparison fair on a noisy, shared CPU: both see the same load.
    """
    spent = [0.0] * len(fns)
    for _ in range(repeats):
        for s in range(0, len(order), block):
            chunk = order[s : s + block].tolist()
            for j, fn in enumerate(fns):
                t0 = time.perf_counter()
                for i in chunk:
                    fn(i)
                spent[j] += time.perf_counter() - t0
    return [repeats * len(order) / t for t in spent]


def _loader_rate(ds, workers: int, batch: int = 128) -> float:
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up excluded
    t0 = time.perf_counter()
    n = sum(len(b[1]) for b in it)
    dt = time.perf_counter() - t0
    del it
    return n / dt if n else float("nan")


_IDX_CHILD = """
import sys, time
import numpy as np
from facetrain.data.recordio import read_idx
def status(field):
    with open('/proc/self/status') as f:
        return int(f.read().split(field + ':')[1].split()[0]) / 1024
with open('/proc/self/clear_refs', 'w') as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
    f.write('5')
r0 = status('VmRSS')
t0 = time.perf_counter()
keys, offsets = read_idx(sys.argv[1])
dt = time.perf_counter() - t0
print(len(keys), dt, status('VmRSS') - r0, status('VmHWM') - r0)
"""


def _idx_cost(tmp: Path, lines: int) -> tuple[int, float, float, float]:
    keys = np.arange(lines, dtype=np.int64)
    offsets = np.cumsum(np.full(lines, 7_000, dtype=np.int64)) - 7_000  # ~40 GB rec: 11-digit offsets
    path = tmp / "big.idx"
    write_idx(path, keys, offsets)
    del keys, offsets
    out = subprocess.run(
        [sys.executable, "-c", _IDX_CHILD, str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    return int(out[0]), float(out[1]), float(out[2]), float(out[3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 records and a 1.5M-line idx")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--idx-lines", type=int, default=None)
    ap.add_argument("--no-loader", action="store_true", help="skip the DataLoader rows")
    args = ap.parse_args()
    n = args.records or (2_000 if args.quick else 10_000)
    idx_lines = args.idx_lines or (1_500_000 if args.quick else 5_800_000)
    repeats = 3 if args.quick else 5
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory(prefix="bench_reader_") as tmp_name:
        tmp = Path(tmp_name)
        blobs = _images(n)
        labels = np.arange(n) // 20
        write_rec_dataset(tmp / "ds", zip(blobs, labels.tolist()))
        ds = RecordDataset(tmp / "ds")
        order = np.random.default_rng(1).permutation(n)

        def floor(i: int):
            return cv2.imdecode(np.frombuffer(blobs[i], np.uint8), cv2.IMREAD_COLOR)

        floor_rate, reader_rate = _rates([floor, ds.__getitem__], order, repeats)
        t0 = time.perf_counter()
        assert (RecordDataset(tmp / "ds").labels() == labels).all()
        labels_s = time.perf_counter() - t0
        rows = [
            ("decode floor (cv2.imdecode, bytes in memory)", f"{floor_rate:,.0f} img/s", "1.00x"),
            ("RecordDataset[i] random access", f"{reader_rate:,.0f} img/s", f"{reader_rate / floor_rate:.2f}x"),
            (f"labels() of {n:,} records (headers only)", f"{labels_s * 1e3:.1f} ms", ""),
        ]
        if not args.no_loader:
            for w in (1, 2):
                r = _loader_rate(ds, w)
                rows.append(
                    (
                        f"DataLoader, {w} worker{'s' if w > 1 else ''}, batch 128",
                        f"{r:,.0f} img/s",
                        f"{r / floor_rate:.2f}x",
                    )
                )
        lines, secs, rss, peak = _idx_cost(tmp, idx_lines)
        rows.append((f"read_idx, {lines:,} lines", f"{secs:.2f} s", "target < 2 s"))
        rows.append(("read_idx RSS growth (peak growth)", f"{rss:.0f} MB ({peak:.0f} MB)", "target < 200 MB"))

    print(
        f"\n### RecordIO reader ({n:,} x 112x112 JPEG q95, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f})\n"
    )
    print("| measurement | value | vs floor / target |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
