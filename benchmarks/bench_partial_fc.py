"""Partial FC forward+backward cost vs a plain full-softmax ``nn.Linear`` classifier, on one process.

For each class count C and head, one fresh subprocess builds the head, then times forward + backward of a batch of
64 random 512-d embeddings (gradients set to None between steps, as ``zero_grad()`` does). Reported: ms/step (best
of the timed steps after one warm-up: the code's cost on a shared machine), peak RSS of the subprocess, and the RSS
growth caused by the steps (peak minus RSS after building the head: the per-step working memory, including the
dense centre gradient).

Heads: ``linear`` = ``nn.Linear(D, C, bias=False)`` + ``F.cross_entropy`` (the baseline); ``pfc`` = PartialFC with
ArcFace at sample_rate 1.0 and 0.1 (world size 1: every class on this process).

    python benchmarks/bench_partial_fc.py            # C = 10k, 100k, 1M
    python benchmarks/bench_partial_fc.py --quick    # C = 10k, 100k, fewer steps
    python benchmarks/bench_partial_fc.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    """Current RSS in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(head: str, classes: int, rate: float, batch: int, dim: int, steps: int, device: str) -> dict:
    """One configuration, in this process: ms/step and memory."""
    import torch
    import torch.nn.functional as F

    from facetrain.heads import build_margin
    from facetrain.heads.partial_fc import PartialFC

    torch.manual_seed(0)
    if head == "linear":
        module = torch.nn.Linear(dim, classes, bias=False).to(device)

        def step(x, y):
            return F.cross_entropy(module(x), y), classes

    else:
        module = PartialFC(dim, classes, margin=build_margin("arcface"), sample_rate=rate).to(device)

        def step(x, y):
            out = module(x, y)
            return out.loss, out.num_sampled

    embeddings = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_built = _rss_mib()
    times, used = [], classes
    for i in range(steps + 1):  # the first step is a warm-up
        module.zero_grad(set_to_none=True)
        embeddings.grad = None
        t0 = time.perf_counter()
        loss, used = step(embeddings, labels)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    result = {
        "head": head,
        "classes": classes,
        "rate": rate,
        "sampled": used,
        "ms": min(times),
        "peak_rss": _peak_rss_mib(),
        "step_rss": _peak_rss_mib() - rss_built,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        result["gpu_peak"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="C = 10k and 100k only, 3 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10, quick 3)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON args of one measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return

    class_counts = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    steps = args.steps or (3 if args.quick else 10)
    configs = [("linear", 1.0), ("pfc", 1.0), ("pfc", 0.1)]
    rows = []
    for classes in class_counts:
        for head, rate in configs:
            spec = dict(head=head, classes=classes, rate=rate, batch=args.batch, dim=args.dim, steps=steps)
            spec["device"] = args.device
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"measurement failed: {spec}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    gpu = args.device.startswith("cuda")
    print(
        f"Partial FC vs full softmax: batch {args.batch}, D {args.dim}, device {args.device}, "
        f"{rows[0]['threads']} threads, best of {steps} steps (forward + backward)\n"
    )
    header = "| classes | head | sample rate | classes used | ms/step | vs linear | peak RSS MiB | step RSS MiB |"
    header += " GPU peak MiB |" if gpu else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    baseline = {}
    for r in rows:
        if r["head"] == "linear":
            baseline[r["classes"]] = r["ms"]
        name = "nn.Linear + CE" if r["head"] == "linear" else "PartialFC (arcface)"
        line = (
            f"| {r['classes']:,} | {name} | {r['rate']:.1f} | {r['sampled']:,} | {r['ms']:.1f} | "
            f"{baseline[r['classes']] / r['ms']:.2f}x | {r['peak_rss']:.0f} | {r['step_rss']:.0f} |"
        )
        if gpu:
            line += f" {r['gpu_peak']:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
