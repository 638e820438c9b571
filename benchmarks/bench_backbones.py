"""Backbone throughput: forward and forward+backward images/s per backbone, eager vs channels_last vs torch.compile.

    python benchmarks/bench_backbones.py --quick          # CPU, batch 8, r18 + mbf, eager + channels_last (< 1 min)
    python benchmarks/bench_backbones.py                  # CPU batch 32, all CNNs + vit_t/vit_s, + torch.compile
    python benchmarks/bench_backbones.py --names r50 mbf --batch 64

On a CUDA device it also measures bf16 autocast at batch 256. Prints one Markdown table. Params and FLOPs come from
facetrain.models.info (FlopCounterMode, 1x3x112x112, multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import argparse
import time

import torch

DEFAULT_NAMES = ["r18", "r34", "r50", "r100", "mbf", "vit_t", "vit_s"]
QUICK_NAMES = ["r18", "mbf"]


def _time(fn, iters: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def bench_one(
    name: str, mode: str, batch: int, device: str, iters: int, warmup: int, dtype=None
) -> tuple[float, float]:
    """(forward img/s, forward+backward img/s) for one backbone and mode ('eager' | 'channels_last' | 'compile')."""
    from facetrain.models import build_backbone

    model = build_backbone(name).to(device)
    x = torch.randn(batch, 3, 112, 112, device=device)
    if mode in ("channels_last", "compile"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if mode == "compile" else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device, dtype=dtype) if dtype is not None else torch.autocast(device, enabled=False)

    def fwd():
        with torch.no_grad(), autocast:
            run(x)

    def fwd_bwd():
        with autocast:
            out = run(x)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    t_fwd = _time(fwd, iters, warmup, sync)
    model.train()
    t_train = _time(fwd_bwd, iters, warmup, sync)
    return batch / t_fwd, batch / t_train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8, r18 + mbf, no torch.compile, 1 timed iteration")
    parser.add_argument("--names", nargs="+", help="backbones to run (default: a CNN + small ViT selection)")
    parser.add_argument("--batch", type=int, help="CPU batch size (default 32; 8 with --quick)")
    parser.add_argument("--iters", type=int, help="timed iterations (default 5; 2 with --quick)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = parser.parse_args(argv)
    names = args.names or (QUICK_NAMES if args.quick else DEFAULT_NAMES)
    batch = args.batch or (8 if args.quick else 32)
    iters = args.iters or (1 if args.quick else 5)
    use_compile = (not args.quick) if args.compile is None else args.compile

    from facetrain.models.info import backbone_summary

    runs = [("cpu", m, batch, None) for m in ("eager", "channels_last") + (("compile",) if use_compile else ())]
    if torch.cuda.is_available():
        runs += [("cuda", "channels_last", 256, torch.bfloat16)]
        if use_compile:
            runs += [("cuda", "compile", 256, torch.bfloat16)]

    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    print()
    print("| backbone | params (M) | GFLOPs | device | mode | dtype | batch | fwd img/s | fwd+bwd img/s |")
    print("|---|---:|---:|---|---|---|---:|---:|---:|")
    for name in names:
        s = backbone_summary(name)
        for device, mode, b, dtype in runs:
            dtype_name = "bf16" if dtype is torch.bfloat16 else "fp32"
            try:
                fwd, train = bench_one(name, mode, b, device, iters, 1, dtype)
                cells = f"{fwd:.1f} | {train:.1f}"
            except Exception as exc:  # torch.compile without a compiler, out of memory, ...
                cells = f"n/a ({type(exc).__name__}) | n/a"
            cost = f"{s.params / 1e6:.2f} | {s.gflops:.2f}"
            print(f"| {s.name} | {cost} | {device} | {mode} | {dtype_name} | {b} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
