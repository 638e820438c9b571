"""facetrain.engine.comm: world-size-1 fallbacks, torchrun env initialization, 2 Gloo ranks."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facetrain.engine import comm

WORKER_DIR = str(Path(__file__).resolve().parents[1] / "heads")


def test_world_size_one_fallbacks():
    assert not comm.is_distributed()
    assert comm.get_world_size() == 1 and comm.get_rank() == 0 and comm.is_main_process()
    comm.barrier()
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    assert comm.all_gather_with_grad(x) is x
    assert comm.all_gather_tensor(x) is x
    summed = comm.all_reduce_sum(x)
    torch.testing.assert_close(summed, x.detach())
    assert summed is not x
    torch.testing.assert_close(comm.all_reduce_max(x), x.detach())
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object("hello") == "hello"
    assert comm.gather_sizes(5) == [5]


def test_free_port_can_be_bound():
    port = comm.free_port()
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_init_distributed_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert comm.init_distributed_from_env() is False
    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(comm.free_port()))
    assert comm.init_distributed_from_env(backend="gloo") is True
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert comm.get_world_size() == 1 and comm.is_main_process()
    assert comm.init_distributed_from_env() is True  # already initialized: a no-op
    x = torch.ones(3, requires_grad=True)
    y = comm.all_gather_with_grad(x)
    assert y is x  # world size 1 under a real process group too
    # the conftest fixture destroys the process group


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("comm") / "results"
    sys.path.insert(0, WORKER_DIR)  # spawn children inherit sys.path and import the worker module by name
    try:
        import _pfc_worker

        mp.spawn(_pfc_worker.comm_checks, args=(2, comm.free_port(), str(out)), nprocs=2, join=True)
        sizes = _pfc_worker.SIZES
    finally:
        sys.path.remove(WORKER_DIR)
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for r in results:
        r["sizes"] = sizes
    return results


def test_two_ranks_reductions_and_objects(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert (r["world"], r["rank"], r["main"]) == (2, rank, rank == 0)
        torch.testing.assert_close(r["sum"], torch.tensor([3.0, 7.0], dtype=torch.float64))
        torch.testing.assert_close(r["max"], torch.tensor([2.0, 5.0], dtype=torch.float64))
        torch.testing.assert_close(r["input_after"], torch.tensor([1.0 + rank, 5.0 - 3 * rank], dtype=torch.float64))
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast"] == "from 1"
        sizes = r["sizes"]
        expected = torch.cat([torch.arange(sizes[0]), torch.arange(sizes[1]) + 10])
        assert torch.equal(r["labels"], expected)


def test_all_gather_with_grad_matches_one_process(two_ranks):
    """Rank r's loss is sum(c_r * X^2) of the gathered rows X: one process computing sum_r of those losses gets
    dX = sum_r 2 c_r X; each rank must receive its own rows of exactly that (unequal row counts per rank)."""
    sizes = two_ranks[0]["sizes"]
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)
    coeffs = torch.randn(2, sum(sizes), 4, generator=g, dtype=torch.float64)
    x = rows.clone().requires_grad_(True)
    sum((coeffs[r] * x.pow(2)).sum() for r in range(2)).backward()
    start = 0
    for rank, r in enumerate(two_ranks):
        torch.testing.assert_close(r["gathered"], rows, rtol=0, atol=0)
        torch.testing.assert_close(r["grad"], x.grad[start : start + sizes[rank]], rtol=1e-12, atol=1e-12)
        start += sizes[rank]
