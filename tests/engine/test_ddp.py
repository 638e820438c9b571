"""Distributed training: 2 Gloo ranks under torchrun train exactly like one process with the same global batch, and a
checkpoint written by 2 ranks resumes on 1.

This file is also the torchrun worker: ``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/engine/test_ddp.py OUT overrides...`` runs the same trainer on each rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

TINY = "_tiny_nobn_ddp"


class TinyNoBN(nn.Module):
    """A backbone without batch statistics (BatchNorm would differ between a batch of 8 and two of 4).

    A copy of tests/engine/conftest.py's: torchrun runs this file as a script, where the conftest is not importable.
    """

    def __init__(self, embedding_size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _register() -> None:
    from facetrain.models import list_backbones
    from facetrain.models.registry import register_backbone

    if TINY not in list_backbones():
        register_backbone(lambda embedding_size=8, **kw: TinyNoBN(embedding_size), name=TINY)


def _overrides(out: Path, steps: int) -> list[str]:
    return [
        "data.synthetic.num_identities=6",
        "data.synthetic.images_per_identity=4",  # 24 images: 3 global batches of 8 per epoch
        "data.synthetic.val_identities=6",  # verification at the end: each rank embeds half of the images
        "data.synthetic.val_pairs=40",
        "data.augment=flip",
        "data.num_workers=0",
        f"model.backbone={TINY}",
        "model.embedding_size=8",
        "model.channels_last=false",
        "loss.margin=cosface",
        "loss.scale=16",
        "optim.name=sgd",
        "optim.lr=0.2",
        "optim.clip_grad_norm=0.5",  # small enough to clip: the norm spans both ranks' centres
        "schedule.name=constant",
        "train.amp=none",
        "train.device=cpu",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "eval.every_steps=0",
        f"output.dir={out}",
    ]


def _worker(argv: list[str]) -> None:
    """Run on every rank: 4 steps into OUT/full, 2 steps into OUT/half (for the 2 -> 1 resume), and 4 steps of 2
    micro-batches of 2 per rank into OUT/accum."""
    from facetrain.config import load_config
    from facetrain.engine.trainer import train

    torch.set_num_threads(1)
    _register()
    out = Path(argv[0])
    if argv[1:] == ["compile"]:  # DDP wrapped first, then torch.compile; no_sync on the first micro-step
        compiled = ["train.batch_size=2", "train.grad_accum=2", "data.synthetic.val_identities=0", "train.compile=true"]
        train(load_config(None, _overrides(out / "compiled_accum", 4) + compiled), progress=False)
        torch.distributed.destroy_process_group()
        return
    train(load_config(None, _overrides(out / "full", 4) + ["train.batch_size=4"]), progress=False)
    train(load_config(None, _overrides(out / "half", 2) + ["train.batch_size=4"]), progress=False)
    accum = ["train.batch_size=2", "train.grad_accum=2", "data.synthetic.val_identities=0"]
    train(load_config(None, _overrides(out / "accum", 4) + accum), progress=False)
    torch.distributed.destroy_process_group()


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    return _torchrun(tmp_path_factory.mktemp("ddp"))


def _torchrun(out: Path, *args: str, timeout: float = 240) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, batch 8 (the global batch of the 2-rank runs), 4 steps."""
    return _one_process(tmp_path_factory.mktemp("single"), 4)


def _one_process(out: Path, steps: int, resume: str | None = None):
    from facetrain.config import load_config
    from facetrain.engine.trainer import train

    _register()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(None, _overrides(out, steps) + ["train.batch_size=8"]), resume=resume, progress=False)
    finally:
        torch.set_num_threads(threads)


def _assert_same_state(a: dict, b: dict, tol: float) -> None:
    for key, value in a["backbone"].items():
        torch.testing.assert_close(b["backbone"][key], value, rtol=tol, atol=tol, msg=key)
    torch.testing.assert_close(b["class_centres"], a["class_centres"], rtol=tol, atol=tol)
    for index, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(
            b["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"], rtol=tol, atol=tol
        )


def test_two_gloo_ranks_equal_one_process_with_the_global_batch(two_rank_runs, single_run):
    single = single_run
    two = two_rank_runs / "full"
    assert _losses(two) == pytest.approx(_losses(single.output_dir), rel=1e-5, abs=1e-6)
    ckpt_two = torch.load(two / "checkpoint.pt", weights_only=True)
    ckpt_one = torch.load(single.checkpoint_path, weights_only=True)
    assert ckpt_two["world_size"] == 2 and ckpt_one["world_size"] == 1
    assert ckpt_two["class_centres"].shape == (6, 8)  # both ranks' centres, gathered in class order
    _assert_same_state(ckpt_one, ckpt_two, 1e-5)
    # Training moved the weights: equality is not the trivial "nothing happened".
    assert ckpt_one["step"] == 4 and float((ckpt_one["class_centres"] - _initial_centres()).abs().max()) > 1e-3


def test_two_ranks_with_grad_accumulation_equal_one_process(two_rank_runs, single_run):
    single = single_run
    accum = two_rank_runs / "accum"
    assert _losses(accum) == pytest.approx(_losses(single.output_dir), rel=1e-5, abs=1e-6)
    _assert_same_state(
        torch.load(single.checkpoint_path, weights_only=True),
        torch.load(accum / "checkpoint.pt", weights_only=True),
        1e-5,
    )


def test_verification_split_over_two_ranks_matches_one_process(two_rank_runs):
    from facetrain.config import load_config
    from facetrain.engine.trainer import evaluate_pairs, load_val_sets
    from facetrain.models import load_backbone

    _register()
    run = two_rank_runs / "full"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recorded = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in recorded] == [4]
    images, issame = load_val_sets(load_config(run / "config.yaml"))["synthetic_val"]
    model = load_backbone(run / "checkpoint.pt")
    assert evaluate_pairs(model, images, issame).accuracy_mean == pytest.approx(recorded[0]["synthetic_val"], abs=1e-9)


def test_checkpoint_of_two_ranks_resumes_on_one(two_rank_runs, single_run, tmp_path):
    straight = single_run
    half = torch.load(two_rank_runs / "half" / "checkpoint.pt", weights_only=True)
    assert half["step"] == 2 and half["world_size"] == 2
    resumed_dir = tmp_path / "resumed"
    resumed = _one_process(resumed_dir, 4, resume=str(two_rank_runs / "half" / "checkpoint.pt"))
    assert resumed.steps == 4
    _assert_same_state(
        torch.load(straight.checkpoint_path, weights_only=True),
        torch.load(resumed.checkpoint_path, weights_only=True),
        1e-5,
    )


@pytest.mark.slow
def test_two_ranks_ddp_then_compile_with_no_sync_equal_one_process(single_run, tmp_path):
    """``train.compile`` on 2 Gloo ranks: DDP wraps the backbone, then torch.compile (inductor) wraps DDP, and the
    accumulation micro-step under ``no_sync`` still gives the global-batch gradient."""
    out = _torchrun(tmp_path, "compile", timeout=420)
    run = out / "compiled_accum"
    assert _losses(run) == pytest.approx(_losses(single_run.output_dir), rel=1e-4, abs=1e-5)
    _assert_same_state(
        torch.load(single_run.checkpoint_path, weights_only=True),
        torch.load(run / "checkpoint.pt", weights_only=True),
        1e-4,
    )


def _initial_centres() -> torch.Tensor:
    from facetrain.heads.partial_fc import _initial_centres as init

    return init(torch.arange(6), 1, 8, 0.01, 0)


if __name__ == "__main__":
    _worker(sys.argv[1:])
