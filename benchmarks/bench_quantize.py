"""Why ``facetrain export`` / ``quantize`` write the graphs they write: onnxruntime CPU speed of graph variants.

For each backbone (random weights; speed does not depend on them), one onnxruntime session per variant, one intra-op
thread, the same (B, 3, 112, 112) batch; the figure is images per second of *thread CPU time* (best of the
interleaved repeats), which a busy shared machine disturbs much less than wall time. Variants:

- fp32 ``native PRelu`` (what arcface_torch's torch2onnx writes) vs ``decomposed`` (facetrain's default export:
  ``Relu(x) + slope * Min(x, 0)``, bit-exact);
- static INT8, QDQ, MinMax calibration on 32 synthetic faces:
  ``s8 act, native PRelu`` (the previous default), ``u8 act, exact form`` (Min stays float),
  ``u8 act, affine form`` (``facetrain export quantize``'s default), and the same with depthwise convolutions
  quantized too (``--quantize-depthwise``; MobileFaceNet only).

Ratios are against the decomposed fp32 graph. Usage: python benchmarks/bench_quantize.py [--quick] [--models r18,mbf]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_rate(paths: dict[str, Path], batch: int, repeats: int) -> dict[str, float]:
    """Images per second of thread CPU time for each model, one intra-op thread, best of interleaved repeats."""
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
    sessions = {}
    for label, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, {"data": x})
        sessions[label] = session
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for label, session in sessions.items():
            start = time.thread_time()  # intra_op_num_threads=1: the whole run is on this thread
            session.run(None, {"data": x})
            best[label] = min(best[label], time.thread_time() - start)
    return {label: batch / seconds for label, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mbf only, batch 8, 2 repeats")
    parser.add_argument("--models", default="r18,r50,mbf")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    models = ["mbf"] if args.quick else args.models.split(",")
    batch = 8 if args.quick else args.batch_size
    repeats = 2 if args.quick else args.repeats

    import onnxruntime

    from facetrain.export import export_onnx, load_model_for_export, quantize, random_faces

    calibration = random_faces(32, seed=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        tmp = Path(tmp)
        for name in models:
            module, _, _ = load_model_for_export(None, backbone=name)
            native, exact = tmp / f"{name}_native.onnx", tmp / f"{name}.onnx"
            export_onnx(module, native, name=name, prelu="native")
            export_onnx(module, exact, name=name)

            def q(label: str, src: Path, name: str = name, **kwargs) -> Path:
                return quantize(src, tmp / f"{name}_{label}.onnx", mode="static", calibration=calibration, **kwargs)

            paths = {
                "fp32, native PRelu": native,
                "fp32, decomposed (export default)": exact,
                "int8 s8 act, native PRelu": q("s8", native, activations="int8", prelu="native"),
                "int8 u8 act, exact form (Min float)": q("u8exact", exact, prelu="native"),
                "int8 u8 act, affine form (quantize default)": q("u8", exact),
            }
            if name == "mbf":
                paths["int8 u8 act, affine, depthwise too"] = q("u8dw", exact, quantize_depthwise=True)
            rates = cpu_rate(paths, batch, repeats)
            base = rates["fp32, decomposed (export default)"]
            rows += [(name, label, rate, rate / base) for label, rate in rates.items()]

    print(f"\n### onnxruntime CPU speed of graph variants (1 thread, batch {batch}, best of {repeats}, CPU time)\n")
    versions = f"python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}"
    print(f"cpu: {os.cpu_count()} logical cores, {versions}\n")
    print("| model | graph | img/s (CPU time) | vs fp32 decomposed |")
    print("|---|---|---:|---:|")
    for name, label, rate, ratio in rows:
        print(f"| {name} | {label} | {rate:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
