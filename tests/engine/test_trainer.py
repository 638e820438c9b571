"""The full trainer: gradient accumulation, clipping, stages, frozen backbone, fine-tuning, checkpoints, best model,
AMP, distillation and the `facetrain train` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facetrain.config import load_config

from .conftest import register_tiny_nobn

TINY = "_tiny_nobn_trainer"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs torch on one thread (tests/engine/conftest.py)."""


def _config(out: Path, *extra: str):
    return load_config(
        "demo_cpu",
        [
            "data.synthetic.num_identities=6",
            "data.synthetic.images_per_identity=4",
            "data.synthetic.val_identities=0",
            "data.num_workers=0",
            "model.backbone_kwargs={width: 4}",
            "model.embedding_size=16",
            "loss.scale=16",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.log_every=1",
            "eval.every_steps=0",
            f"output.dir={out}",
            *extra,
        ],
    )


class Recorder:
    """A hook that records a value after every step."""

    def __init__(self, fn):
        self.fn, self.values = fn, []

    def before_train(self, trainer):
        self.initial = self.fn(trainer)

    def after_step(self, trainer):
        self.values.append(self.fn(trainer))

    def after_train(self, trainer):
        pass

    def write(self, record):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _backbone_copy(trainer):
    return {k: v.detach().clone() for k, v in trainer.raw_backbone.state_dict().items()}


def test_grad_accumulation_2x4_equals_batch_8(tmp_path):
    from facetrain.engine.trainer import train

    register_tiny_nobn(TINY)
    common = [
        f"model.backbone={TINY}",
        "model.backbone_kwargs={}",
        "model.channels_last=false",
        "optim.clip_grad_norm=1",
    ]
    whole = train(_config(tmp_path / "b8", *common, "train.batch_size=8"), progress=False)
    accum = train(_config(tmp_path / "b4x2", *common, "train.batch_size=4", "train.grad_accum=2"), progress=False)
    a = torch.load(whole.checkpoint_path, weights_only=True)
    b = torch.load(accum.checkpoint_path, weights_only=True)
    for key, value in a["backbone"].items():
        torch.testing.assert_close(b["backbone"][key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["class_centres"], a["class_centres"], rtol=1e-5, atol=1e-6)
    losses = [
        [json.loads(line)["loss"] for line in run.metrics_path.read_text().splitlines()] for run in (whole, accum)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_clip_global_grad_norm_against_formula():
    from facetrain.engine.trainer import clip_global_grad_norm

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(6, 2))]
    grads = [torch.randn_like(p) * 3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = clip_global_grad_norm(params[:2], params[2:], max_norm=2.0)
    expected = np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert float(total) == pytest.approx(expected, rel=1e-6)
    for p, g in zip(params, grads):  # every gradient, replicated and sharded, scaled by max_norm / norm
        np.testing.assert_allclose(p.grad.numpy(), g.numpy() * 2.0 / (expected + 1e-6), rtol=1e-5)


def test_stages_change_margin_scale_and_lr(tmp_path):
    from facetrain.engine.trainer import Trainer

    recorder = Recorder(lambda t: (t.step, t.head.margin.scale, t.current_lr))
    stages = "schedule.stages=[{until_step: 2, loss: {scale: 4}}, {until_step: 4, loss: {scale: 8}, lr_scale: 0.5}]"
    config = _config(tmp_path, "train.max_steps=6", "schedule.name=constant", "optim.lr=0.1", stages)
    Trainer(config, extra_hooks=[recorder]).train()
    assert [v[1] for v in recorder.values] == [4.0, 4.0, 8.0, 8.0, 16.0, 16.0]  # past the last stage: the config's
    assert [v[2] for v in recorder.values] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.1, 0.1])


def test_stage_with_a_setting_the_margin_lacks_is_a_config_error(tmp_path):
    from facetrain.engine.trainer import train
    from facetrain.errors import ConfigError

    config = _config(tmp_path, "schedule.stages=[{until_step: 2, loss: {angular_margin: 0.3}}]")  # cosface
    with pytest.raises(ConfigError, match=r"schedule.stages\[0\].loss.angular_margin"):
        train(config, progress=False)


def test_frozen_backbone_steps_train_only_the_centres(tmp_path):
    from facetrain.engine.trainer import Trainer

    backbone = Recorder(_backbone_copy)
    centres = Recorder(lambda t: t.head.weight.detach().clone())
    config = _config(tmp_path, "train.max_steps=3", "train.freeze_backbone_steps=2")
    Trainer(config, extra_hooks=[backbone, centres]).train()
    for snapshot in backbone.values[:2]:  # weights and BN statistics untouched while frozen
        assert all(torch.equal(snapshot[k], v) for k, v in backbone.initial.items())
    assert not torch.equal(backbone.values[2]["fc.weight"], backbone.initial["fc.weight"])
    assert not torch.equal(centres.values[0], centres.initial)


def test_checkpoint_contract_and_load_backbone(tmp_path):
    from facetrain.engine.trainer import train
    from facetrain.models import load_backbone

    result = train(_config(tmp_path, "train.max_steps=2", "loss.subcenter_k=2"), progress=False)
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    for key in ("format", "step", "backbone_name", "backbone_kwargs", "embedding_size", "num_classes", "config"):
        assert key in ckpt, key
    assert ckpt["step"] == 2 and ckpt["num_classes"] == 6 and ckpt["subcenter_k"] == 2
    assert ckpt["class_centres"].shape == (12, 16)  # C*K rows, class-major
    model = load_backbone(result.checkpoint_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["backbone"][key]), key


def test_fine_tune_from_checkpoint_and_backbone_pth_with_new_centres(tmp_path):
    from facetrain.engine.trainer import Trainer, train

    first = train(_config(tmp_path / "a", "train.max_steps=2"), progress=False)
    source = torch.load(first.checkpoint_path, weights_only=True)["backbone"]
    pth = tmp_path / "backbone.pth"
    torch.save(source, pth)  # arcface_torch's format: a bare state dict
    for init in (first.checkpoint_path, pth):
        seen = Recorder(_backbone_copy)
        config = _config(tmp_path / f"ft_{init.stem}", "train.max_steps=1", f"model.init_from={init}")
        config.data.synthetic.num_identities = 5
        trainer = Trainer(config, extra_hooks=[seen])
        assert trainer.head.num_classes == 5
        trainer.train()
        assert all(torch.equal(seen.initial[k], v) for k, v in source.items())


def test_verification_history_best_checkpoint_and_metrics(tmp_path):
    from facetrain.engine.trainer import train

    config = _config(
        tmp_path,
        "data.synthetic.val_identities=6",
        "data.synthetic.val_pairs=40",
        "eval.every_steps=1",
        "train.max_steps=3",
    )
    result = train(config, progress=False)
    assert [e["step"] for e in result.evaluations] == [1, 2, 3]
    scores = [e["synthetic_val"] for e in result.evaluations]
    best = torch.load(result.best_path, weights_only=True)
    assert best["step"] == [1, 2, 3][int(np.argmax(scores))]  # first step reaching the maximum
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 2, 3]


def test_stop_after_steps_then_resume_equals_straight_adamw_run(tmp_path):
    from facetrain.engine.trainer import Trainer, train

    adamw = ["train.max_steps=4", "optim.name=adamw", "optim.lr=0.01", "loss.sample_rate=0.5"]
    split = _config(tmp_path / "split", *adamw, "train.stop_after_steps=2")
    partial = Trainer(split).train()
    assert partial.steps == 2 and not partial.completed
    assert torch.load(partial.checkpoint_path, weights_only=True)["step"] == 2
    final = Trainer(split, resume="auto").train()  # stop_after counts this process's steps: 2 more, the end
    assert final.steps == 4 and final.completed
    straight = train(_config(tmp_path / "straight", *adamw), progress=False)
    a = torch.load(straight.checkpoint_path, weights_only=True)
    b = torch.load(final.checkpoint_path, weights_only=True)
    assert all(torch.equal(v, b["backbone"][k]) for k, v in a["backbone"].items())
    assert torch.equal(a["class_centres"], b["class_centres"])
    centre_state = a["optimizer"]["state"][len(a["optimizer"]["state"]) - 1]  # Adam moments of all centres
    assert centre_state["exp_avg"].shape == (6, 16)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_trains(tmp_path, amp):
    from facetrain.engine.trainer import train

    result = train(_config(tmp_path, f"train.amp={amp}", "train.max_steps=2"), progress=False)
    assert np.isfinite(result.final_loss)
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    assert bool(ckpt["scaler"]) == (amp == "fp16")  # a GradScaler only for fp16
    assert all(v.dtype != torch.float16 for v in ckpt["backbone"].values())  # master weights stay fp32


def test_adamw_without_decay_on_norms_and_biases(tmp_path):
    from facetrain.engine.trainer import Trainer

    trainer = Trainer(_config(tmp_path, "optim.name=adamw", "optim.no_decay_norm_bias=true", "optim.lr=0.001"))
    groups = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert no_decay and all(p.ndim <= 1 for g in no_decay for p in g["params"])
    assert any(p is trainer.head.weight for g in groups if g["weight_decay"] > 0 for p in g["params"])
    trainer.train()


def _distill_config(tmp_path, weight: float, teacher_path: Path):
    return _config(
        tmp_path, f"loss.distill.weight={weight}", f"loss.distill.embeddings={teacher_path}", "loss.distill.kind=cosine"
    )


def test_distillation_loss_is_margin_loss_plus_weighted_cosine_distance(tmp_path):
    from facetrain.engine.trainer import Trainer, normalize_images

    teacher = np.random.default_rng(0).standard_normal((24, 6)).astype(np.float32)
    np.save(tmp_path / "teacher.npy", teacher)
    (tmp_path / "teacher.json").write_text(json.dumps({"num_images": 24, "embedding_size": 6}))
    trainer = Trainer(_distill_config(tmp_path / "run", 0.7, tmp_path / "teacher.npy"))
    images, labels, indices = next(iter(trainer.loader))  # the loader returns dataset indices for the teacher rows
    torch.manual_seed(0)
    state = _backbone_copy(trainer)
    with torch.no_grad():
        got = float(trainer.forward_loss((images, labels, indices)))
        trainer.raw_backbone.load_state_dict(state)  # undo the BN statistics update of that forward
        emb = trainer.raw_backbone(normalize_images(images))
        margin_loss = float(trainer.head(emb, labels).loss)
    projected = emb.double().numpy() @ trainer.distill.projection.weight.detach().double().numpy().T
    target = teacher[indices.numpy()].astype(np.float64)
    cos = (projected * target).sum(1) / np.linalg.norm(projected, axis=1) / np.linalg.norm(target, axis=1)
    assert got == pytest.approx(margin_loss + 0.7 * np.mean(1 - cos), rel=1e-5)
    result = trainer.train()
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    assert ckpt["distill"]["projection.weight"].shape == (6, 16)  # learned projection 16 -> 6, saved for resume


def test_distillation_rejects_a_teacher_file_of_other_data(tmp_path):
    from facetrain.engine.trainer import Trainer
    from facetrain.errors import ConfigError

    np.save(tmp_path / "teacher.npy", np.zeros((23, 6), dtype=np.float32))
    with pytest.raises(ConfigError, match="expected \\(24, D\\)"):
        Trainer(_distill_config(tmp_path / "run", 1.0, tmp_path / "teacher.npy"))


def test_cli_train_runs_and_reports(run_cli, tmp_path):
    from facetrain.engine.hooks import TensorBoardWriter

    code, out, err = run_cli(
        "train",
        "demo_cpu",
        "data.synthetic.num_identities=6",
        "data.synthetic.images_per_identity=4",
        "data.synthetic.val_identities=4",
        "data.synthetic.val_pairs=20",
        "model.backbone_kwargs={width: 4}",
        "train.batch_size=8",
        "train.max_steps=2",
        f"output.dir={tmp_path}",
        "--no-progress",
    )
    assert code == 0, err
    assert "trained 2 steps on 24 images of 6 identities" in out
    assert str(tmp_path / "checkpoint.pt") in out and "verification at step 2: synthetic_val" in out
    if TensorBoardWriter.available():
        assert f"tensorboard --logdir {tmp_path / 'tb'}" in out
    code, _, err = run_cli("train", "demo_cpu", "train.max_stepz=2")
    assert code == 1 and "train.max_steps" in err  # did-you-mean from the config loader
