"""People library: first-scan throughput (photos/s, default RetinaFace + SFace) and the cost of a re-scan of an
unchanged library (target: < 5% of the first scan). Prints a Markdown table.

    python benchmarks/bench_people.py [--quick] [--copies 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ASSETS = Path(os.environ.get("FACETRAIN_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one copy of the 12 asset photos, in-process")
    parser.add_argument("--copies", type=int, default=4, help="copies of the 12 asset photos")
    parser.add_argument("--workers", type=int, default=2, help="decode/detect processes (0: in-process)")
    args = parser.parse_args()
    copies, workers = (1, 0) if args.quick else (args.copies, args.workers)

    from facetrain.people.cluster import cluster_unknown
    from facetrain.people.library import Library
    from facetrain.people.scan import scan

    model = ASSETS / "models" / "face_recognition_sface_2021dec_int8bq.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        for k in range(copies):
            (photos / f"set{k}").mkdir(parents=True)
            for src in sorted((ASSETS / "images").iterdir()):
                shutil.copy(src, photos / f"set{k}" / src.name)
        lib = Library.create(Path(tmp) / "lib.db", model=model)
        first = scan(lib, photos, workers=workers, progress=False)
        t0 = time.perf_counter()
        again = scan(lib, photos, workers=workers, progress=False)
        rescan = time.perf_counter() - t0
        t0 = time.perf_counter()
        cluster_unknown(lib)
        cluster_s = time.perf_counter() - t0
        lib.close()
    rows = [
        ("photos", f"{first.processed}"),
        ("faces found", f"{first.faces}"),
        ("workers", f"{workers}"),
        ("first scan (s)", f"{first.seconds:.2f}"),
        ("first scan (photos/s)", f"{first.photos_per_second:.2f}"),
        ("re-scan unchanged (s)", f"{rescan:.4f}"),
        ("re-scan / first scan", f"{100 * rescan / first.seconds:.2f}%"),
        ("re-scan skipped photos", f"{again.skipped}"),
        ("cluster unknown faces (s)", f"{cluster_s:.3f}"),
    ]
    print("| people library | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
