"""The GPU part of benchmarks/bench_train.py has pieces that must not surprise a GPU session: the class-count search
stays bounded and brackets the limit, an out-of-memory step is caught and reported as such, and the CPU stand-in for
peak memory counts what grows with the class count."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    name = "bench_train_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs torch on one thread (tests/engine/conftest.py)."""


@pytest.mark.parametrize("capacity", [1, 2_999_999, 10_345_678, 63_999_999])
def test_search_brackets_the_largest_fitting_count(bench, capacity):
    probed: list[int] = []

    def fits(classes: int) -> bool:
        probed.append(classes)
        return classes <= capacity

    result = bench.largest_class_count(fits, start=2_000_000, limit=64_000_000, tolerance=250_000, seconds=60)
    assert result.largest_fit <= capacity < (result.smallest_oom or 0)
    assert result.smallest_oom - result.largest_fit <= 250_000 or result.largest_fit == 0
    assert len(probed) == len(set(probed)) <= 5 + 8  # doublings + bisection steps, nothing probed twice


def test_search_reports_the_limit_and_stops_at_its_time_limit(bench):
    everything = bench.largest_class_count(lambda c: True, start=1_000, limit=5_000, tolerance=10, seconds=60)
    assert everything.largest_fit == 5_000 and everything.smallest_oom is None and "limit" in everything.stopped

    def slow(classes: int) -> bool:
        time.sleep(0.05)
        return classes < 10**9

    started = time.perf_counter()
    bounded = bench.largest_class_count(slow, start=1, limit=10**12, tolerance=1, seconds=0.2)
    assert bounded.stopped == "time limit" and time.perf_counter() - started < 0.2 + 0.05 + 0.1
    assert bounded.largest_fit == bounded.probes[-1][0]


def test_a_step_over_the_memory_limit_is_caught_and_cpu_state_bytes_match_the_formula(bench, tmp_path):
    device = torch.device("cpu")
    classes, dim = 300, 512
    config = bench.bench_config(device, "demo_cnn", classes, 0.1, "bf16", 2, compile_model=False, out_dir=str(tmp_path))
    assert bench.try_measure(config, steps=1, warmup=1, memory_limit=1) is None  # simulated OOM, caught
    result = bench.try_measure(config, steps=1, warmup=1)
    from facetrain.models import build_backbone

    backbone_params = sum(p.numel() for p in build_backbone("demo_cnn", embedding_size=dim).parameters())
    # SGD with momentum: every parameter has a gradient and a momentum buffer, all float32 (bf16 is autocast only).
    assert result.peak_gib * bench.GIB == 3 * 4 * (backbone_params + classes * dim)
    assert result.images_per_sec > 0


@pytest.mark.parametrize(
    ("error", "caught"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_out_of_memory_errors_are_swallowed(bench, monkeypatch, error, caught):
    def measure(config, **kwargs):
        raise error

    monkeypatch.setattr(bench, "measure_steps", measure)
    config = bench.bench_config(torch.device("cpu"), "mbf", 10, 1.0, "none", 2, compile_model=False, out_dir="unused")
    if caught:
        assert bench.try_measure(config, steps=1, warmup=1) is None
    else:
        with pytest.raises(type(error)):
            bench.try_measure(config, steps=1, warmup=1)


@pytest.mark.slow
def test_dry_run_of_the_gpu_part_prints_every_section():
    """``--gpu-only --device cpu --dry-run --no-compile``: every code path of part (b) at toy sizes (~3 min)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--gpu-only", "--device", "cpu", "--dry-run", "--no-compile"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| r50, 1,000 classes, sample_rate 1.0 | 1,450 | >= 2,900 |" in out
    assert "| r50, 20,000 classes, sample_rate 0.1 | 1,000 | >= 2,000 |" in out
    assert "Largest class count that trains" in out and "OOM at" in out  # the simulated cap was hit and caught
    assert "| 2 worker(s) |" in out and "Feeding 2,900 img/s takes about" in out
    grid = [line for line in out.splitlines() if line.startswith(("| r50 | 1,000 |", "| mbf | 1,000 |"))]
    assert len(grid) == 12 and not any("OOM" in line or "skipped" in line for line in grid), grid


def test_without_cuda_the_gpu_part_is_skipped_with_one_line(bench, monkeypatch, capsys):
    """`python benchmarks/bench_train.py` on a machine without CUDA: part (b) is skipped, not a crash."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--gpu-only"])
    bench.main()
    out = capsys.readouterr().out
    assert "no CUDA device: part (b) skipped" in out
