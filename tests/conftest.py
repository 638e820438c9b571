"""Shared fixtures: real-data assets, RNG reset, process-group cleanup, in-process CLI runner."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` the N workers already fill the cores: one intra-op thread each avoids oversubscription
    # (2 workers x 2 torch threads on 2 cores ran several times slower).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """../shared/assets (or $FACETRAIN_ASSETS); skips with a reason when absent."""
    root = Path(os.environ.get("FACETRAIN_ASSETS", REPO_ROOT.parent / "shared" / "assets"))
    if not (root / "sha256sums.txt").is_file():
        pytest.skip(f"real-data assets not found at {root} (set FACETRAIN_ASSETS)")
    return root


@pytest.fixture(autouse=True)
def _reset_state():
    """Every test starts from the same RNG state and default dtype, and leaves no process group behind."""
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        yield
        return
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def run_cli():
    """Run ``facetrain ARGS`` in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from facetrain.cli import main

    def _run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return code, out.getvalue(), err.getvalue()

    return _run
