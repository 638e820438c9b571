"""Detection and alignment throughput on this CPU: photos/s per detector at phone-photo size, and norm_crop faces/s.

The photos are the asset images (../shared/assets or $FACETRAIN_ASSETS) resized to 1920x1440, a typical phone photo
(4:3 after the camera's own downscale). Baselines measured in the same run: JPEG decode of such a photo (the floor
any pipeline pays per photo) and a bare ``cv2.warpAffine`` with a fixed matrix (the floor under norm_crop).

    python benchmarks/bench_align.py            # full run
    python benchmarks/bench_align.py --quick    # a few photos, well under a minute
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few photos and repeats")
    parser.add_argument("--assets", type=Path, default=None, help="assets folder (default ../shared/assets)")
    parser.add_argument("--size", default="1920x1440", help="photo size WxH")
    parser.add_argument("--detectors", default="retinaface,yunet,mtcnn", help="comma-separated detector names")
    args = parser.parse_args()

    from facetrain.align import build_detector, estimate_norm, norm_crop, read_image

    assets = args.assets or Path(os.environ.get("FACETRAIN_ASSETS", REPO_ROOT.parent / "shared" / "assets"))
    if not (assets / "images").is_dir():
        raise SystemExit(f"assets not found at {assets}; pass --assets or set FACETRAIN_ASSETS")
    width, height = (int(v) for v in args.size.lower().split("x"))
    names = sorted(p.name for p in (assets / "images").iterdir())
    if args.quick:
        names = [n for n in names if n.startswith("faceapi")][:2] + ["obama.jpg"]
    photos = [
        cv2.resize(read_image(assets / "images" / n), (width, height), interpolation=cv2.INTER_AREA) for n in names
    ]
    repeats = 1 if args.quick else 3

    rows = []
    encoded = [cv2.imencode(".jpg", p[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1] for p in photos]
    seconds = _time(lambda: [cv2.imdecode(e, cv2.IMREAD_COLOR) for e in encoded], repeats) / len(photos)
    rows.append(("JPEG decode (floor)", f"{width}x{height}", 1 / seconds, seconds * 1000, "-"))

    kwargs = {
        "retinaface": {},
        "yunet": {"model_path": assets / "models" / "face_detection_yunet_2023mar_int8bq.onnx"},
        "mtcnn": {"weights_dir": assets / "models" / "mtcnn"},
    }
    all_faces = []
    for name in [d.strip() for d in args.detectors.split(",") if d.strip()]:
        try:
            detector = build_detector(name, **kwargs.get(name, {}))
        except Exception as exc:  # a missing optional dependency or weight file: report and go on
            rows.append((f"detect: {name}", f"{width}x{height}", float("nan"), float("nan"), f"skipped: {exc}"))
            continue
        detector.detect(photos[0])  # warm-up (session init, allocations)
        found = []
        seconds = _time(lambda d=detector, f=found: f.append([d.detect(p) for p in photos]), repeats) / len(photos)
        faces = sum(len(x) for x in found[-1])
        rows.append(
            (
                f"detect: {name} (max_side {detector.max_side})",
                f"{width}x{height}",
                1 / seconds,
                seconds * 1000,
                str(faces),
            )
        )
        if name == "retinaface":
            all_faces = [(p, f.landmarks) for p, fs in zip(photos, found[-1]) for f in fs]

    if all_faces:
        count = 200 if args.quick else 2000
        work = [all_faces[i % len(all_faces)] for i in range(count)]
        seconds = _time(lambda: [norm_crop(p, lm) for p, lm in work], repeats) / count
        rows.append(("norm_crop 112 (estimate + warp)", "per face", 1 / seconds, seconds * 1000, str(count)))
        fixed = estimate_norm(all_faces[0][1])
        seconds = _time(lambda: [cv2.warpAffine(p, fixed, (112, 112)) for p, _ in work], repeats) / count
        rows.append(("bare warpAffine 112 (floor)", "per face", 1 / seconds, seconds * 1000, str(count)))

    print(
        f"\nbench_align: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"cv2 {cv2.__version__}, threads cv2={cv2.getNumThreads()}, {len(photos)} photos, repeats {repeats}\n"
    )
    print("| what | size | per second | ms each | faces / items |")
    print("|---|---|---:|---:|---|")
    for what, size, rate, ms, extra in rows:
        print(f"| {what} | {size} | {rate:.1f} | {ms:.2f} | {extra} |")


def _time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
