"""TensorBoard events from the trainer's metrics records, read back with TensorBoard's own EventAccumulator; without
the package a run still trains and says so in one info line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

from facetrain.config import load_config


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs torch on one thread (tests/engine/conftest.py)."""


def _config(out: Path, *extra: str):
    return load_config(
        "demo_cpu",
        [
            "data.synthetic.num_identities=6",
            "data.synthetic.images_per_identity=4",
            "data.synthetic.val_identities=6",
            "data.synthetic.val_pairs=20",
            "data.num_workers=0",
            "model.backbone_kwargs={width: 4}",
            "model.embedding_size=16",
            "loss.scale=16",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.log_every=1",
            "eval.every_steps=2",
            "eval.n_folds=2",
            f"output.dir={out}",
            *extra,
        ],
    )


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every numeric field of every JSONL record, as TensorBoard tag -> [(step, value)]."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("kind", "step"):
                tags.setdefault(f"{record['kind']}/{key}", []).append((record["step"], value))
    return tags


def _assert_same(scalars: dict, expected: dict) -> None:
    assert sorted(scalars) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_training_writes_tensorboard_scalars_matching_the_metrics_file(tmp_path):
    pytest.importorskip("tensorboard")
    from facetrain.engine.trainer import train

    result = train(_config(tmp_path / "run"), progress=False)
    tb = result.output_dir / "tb"
    assert list(tb.glob("events.out.tfevents.*"))
    scalars = _scalars(tb)
    expected = _expected(_records(result.metrics_path))
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/epoch", "eval/synthetic_val"} == set(expected)
    _assert_same(scalars, expected)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4] and [s for s, _ in scalars["eval/synthetic_val"]] == [
        2,
        4,
    ]


def test_resume_and_rerun_keep_one_uninterrupted_tensorboard_log(tmp_path):
    """A resume hides the events past the checkpoint (a run killed after it); a fresh run in the same folder hides
    the old run's events; what TensorBoard shows equals metrics.jsonl each time."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from facetrain.engine.trainer import train

    out = tmp_path / "run"
    train(_config(out, "train.stop_after_steps=2", "output.save_every_steps=0"), progress=False)
    # Events of steps 3-4 from a run that died before its next checkpoint: the resume from step 2 redoes them.
    # (TensorBoard reads event files in name order, which starts with the creation second: sleep between files.)
    time.sleep(1.05)
    lost = SummaryWriter(str(out / "tb"))
    for step in (3, 4):
        lost.add_scalar("train/loss", 1000.0 + step, step)
    lost.close()
    time.sleep(1.05)
    resumed = train(_config(out), resume="auto", progress=False)
    _assert_same(_scalars(out / "tb"), _expected(_records(resumed.metrics_path)))

    time.sleep(1.05)
    fresh = train(_config(out, "train.max_steps=3", "eval.every_steps=0"), progress=False)
    scalars = _scalars(out / "tb")
    _assert_same(scalars, _expected(_records(fresh.metrics_path)))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]


def test_without_tensorboard_training_runs_and_logs_one_info_line(tmp_path, monkeypatch, caplog):
    from facetrain.engine.trainer import train

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with caplog.at_level(logging.INFO, logger="facetrain.engine.hooks"):
        result = train(_config(tmp_path / "run", "eval.every_steps=0"), progress=False)
    assert result.steps == 4 and result.checkpoint_path.is_file()
    assert [r["step"] for r in _records(result.metrics_path) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert not (result.output_dir / "tb").exists()
    lines = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], lines
