"""Exact resume: N steps straight == k steps + kill -9 + resume to N (bitwise, CPU, one thread); SIGTERM writes a
checkpoint and exits 130; a non-finite loss stops the run naming the step and the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from facetrain.config import load_config

STEPS = 24


def _overrides(out: Path) -> list[str]:
    return [
        "data.synthetic.num_identities=8",
        "data.synthetic.images_per_identity=4",  # 32 images, 4 steps per epoch: the resume crosses epochs
        "data.synthetic.val_identities=0",
        "data.augment=flip",
        "data.num_workers=0",
        "model.backbone_kwargs={width: 4}",
        "model.embedding_size=16",
        "loss.margin=curricularface",  # a margin with a running buffer (t) that must resume too
        "loss.scale=16",
        "loss.sample_rate=0.5",  # Partial FC sampling: its step counter must resume
        "optim.name=sgd",
        "optim.lr=0.05",
        "schedule.name=poly",
        "schedule.epochs=10",
        "schedule.warmup_epochs=1",
        "train.batch_size=8",
        f"train.max_steps={STEPS}",
        "train.deterministic=true",
        "train.log_every=1",
        "eval.every_steps=0",
        "output.save_every_steps=3",
        f"output.dir={out}",
    ]


def _train_in_process(out: Path, resume: str | None = None):
    from facetrain.engine.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config("demo_cpu", _overrides(out)), resume=resume, progress=False)
    finally:
        torch.set_num_threads(threads)


def _start_cli(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Two loader workers here, none in the reference: augmentation is seeded per sample, so the data are the same.
    overrides = [*_overrides(out), "data.num_workers=2"]
    cmd = [sys.executable, "-m", "facetrain", "train", "demo_cpu", *overrides, "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.002)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["backbone"].items():
        assert torch.equal(value, b["backbone"][key]), key
    assert torch.equal(a["class_centres"], b["class_centres"])
    for key, value in a["margin"].items():
        assert torch.equal(value, b["margin"][key]), key
    assert a["head_sample_step"] == b["head_sample_step"]
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"]), index


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    result = _train_in_process(tmp_path_factory.mktemp("straight"))
    return torch.load(result.checkpoint_path, weights_only=True), result


def test_kill9_then_resume_is_bitwise_equal_to_a_straight_run(straight_run, tmp_path):
    reference, _ = straight_run
    ckpt = tmp_path / "checkpoint.pt"
    proc = _start_cli(tmp_path)
    _wait_for(ckpt.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < STEPS and killed_at % 3 == 0
    result = _train_in_process(tmp_path, resume="auto")
    assert result.steps == STEPS
    _assert_bitwise_equal(reference, torch.load(ckpt, weights_only=True))
    # The metrics file reads as one run: one train record per step, the resumed ones included.
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_exits_130_and_resumes_exactly(straight_run, tmp_path):
    reference, _ = straight_run
    metrics = tmp_path / "metrics.jsonl"
    proc = _start_cli(tmp_path)
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= stopped < STEPS, stopped
    assert "interrupted" in err
    result = _train_in_process(tmp_path, resume="auto")
    _assert_bitwise_equal(reference, torch.load(result.checkpoint_path, weights_only=True))


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    from facetrain.engine.hooks import HookBase
    from facetrain.engine.trainer import TrainingDiverged, train

    class Explode(HookBase):  # what a diverging run looks like: the logits overflow from step 4 on
        def after_step(self, trainer):
            if trainer.step == 3:
                trainer.head.margin.scale = 1e39

    config = load_config("demo_cpu", _overrides(tmp_path) + ["output.save_every_steps=1", "loss.sample_rate=1"])
    with pytest.raises(TrainingDiverged) as exc:
        train(config, progress=False, extra_hooks=[Explode()])
    message = str(exc.value)
    assert "at step 4 of 24" in message and f"{tmp_path / 'checkpoint.pt'} (step 3)" in message, message
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and all(torch.isfinite(v).all() for v in saved["backbone"].values())
    assert not torch.are_deterministic_algorithms_enabled()  # the trainer restored the global setting


def test_resume_rejects_a_checkpoint_of_another_run(straight_run, tmp_path):
    from facetrain.engine.trainer import train
    from facetrain.errors import ConfigError

    _, result = straight_run
    other = load_config("demo_cpu", _overrides(tmp_path) + ["data.synthetic.num_identities=9"])
    with pytest.raises(ConfigError, match="num_classes=8"):
        train(other, resume=str(result.checkpoint_path), progress=False)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from facetrain.engine.checkpoint import capture_rng_state, restore_rng_state, write_checkpoint

    write_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_resume_errors_name_the_file(tmp_path, run_cli):
    from facetrain.engine.checkpoint import find_resume_checkpoint, read_checkpoint
    from facetrain.errors import FacetrainError

    assert find_resume_checkpoint("auto", tmp_path) is None  # nothing to resume: a fresh run
    assert find_resume_checkpoint(str(tmp_path), tmp_path) == tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(FacetrainError, match="not a facetrain training checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    code, _, err = run_cli("train", "demo_cpu", f"output.dir={tmp_path}", "--resume", str(tmp_path / "missing.pt"))
    assert code == 1 and "missing.pt" in err


def test_resume_on_another_rank_count_derives_repeatable_streams(tmp_path):
    """A checkpoint of another world size cannot give each new rank a saved stream; each rank's torch / numpy /
    python streams restart from (train.seed, step, rank), so resuming it twice gives bitwise-identical runs."""
    from facetrain.engine.trainer import train

    def config(out: Path, *extra: str):
        # Dropout draws from the global torch stream: the one randomness the derived seed governs in this loop.
        return load_config("demo_cpu", [*_overrides(out), "model.dropout=0.5", "train.max_steps=4", *extra])

    # A 2-rank checkpoint at step 2: a 1-rank checkpoint relabelled (its state is world-size independent).
    half = train(config(tmp_path / "half", "train.stop_after_steps=2"), progress=False)
    saved = torch.load(half.checkpoint_path, weights_only=True)
    same = tmp_path / "same_world.pt"
    torch.save(saved, same)
    saved["world_size"], saved["rng"] = 2, saved["rng"] * 2
    other = tmp_path / "two_ranks.pt"
    torch.save(saved, other)

    runs = [
        train(config(tmp_path / name), resume=str(path), progress=False)
        for name, path in (("a", other), ("b", other), ("c", same))
    ]
    a, b, c = (torch.load(r.checkpoint_path, weights_only=True) for r in runs)
    _assert_bitwise_equal(a, b)
    assert any(not torch.equal(v, c["backbone"][k]) for k, v in a["backbone"].items())  # another stream than saved
