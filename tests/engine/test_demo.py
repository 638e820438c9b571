"""`facetrain demo` end to end (quick mode) and the minimal trainer's pieces."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from facetrain.config import load_config


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One in-process `facetrain demo --quick` run shared by the tests below (~20 s on one core)."""
    import contextlib
    import io

    from facetrain.cli import main

    out_dir = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exc:
        main(["demo", "--quick", "--out", str(out_dir)])
    assert exc.value.code == 0
    return out_dir, stdout.getvalue()


def _evaluations(metrics: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def test_quick_demo_learns_and_writes_outputs(quick_demo):
    out_dir, stdout = quick_demo
    for rel in (
        "data/train.rec",
        "data/train.idx",
        "data/property",
        "data/synthetic_val.bin",
        "run/checkpoint.pt",
        "run/metrics.jsonl",
        "run/config.yaml",
    ):
        assert (out_dir / rel).is_file(), rel
    evals = _evaluations(out_dir / "run/metrics.jsonl")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    before, after = evals[0]["synthetic_val"], evals[-1]["synthetic_val"]
    # Held-out identities: non-trivial at step 0 (a random net is far from perfect) and clearly better after.
    assert before < 0.8, before
    assert after > before + 0.08, (before, after)
    # The table prints the measured numbers, not fixed ones.
    assert re.search(rf"step 0\s*\|\s*{before:.4f}", stdout), stdout
    assert re.search(rf"step 60\s*\|\s*{after:.4f}", stdout), stdout
    assert str(out_dir / "run" / "checkpoint.pt") in stdout


def test_quick_demo_checkpoint_reproduces_final_accuracy(quick_demo):
    from facetrain.data import read_bin
    from facetrain.engine.trainer import evaluate_pairs
    from facetrain.models import build_backbone

    out_dir, _ = quick_demo
    ckpt = torch.load(out_dir / "run/checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 60 and ckpt["num_classes"] == 40
    assert ckpt["class_centres"].shape == (40, ckpt["embedding_size"])
    model = build_backbone(ckpt["backbone_name"], embedding_size=ckpt["embedding_size"], **ckpt["backbone_kwargs"])
    model.load_state_dict(ckpt["backbone"])
    images, issame = read_bin(out_dir / "data/synthetic_val.bin")
    result = evaluate_pairs(model, images, issame)
    final = _evaluations(out_dir / "run/metrics.jsonl")[-1]["synthetic_val"]
    assert result.accuracy_mean == pytest.approx(final, abs=1e-9)
    # The saved config is the resolved one and loads back unchanged.
    saved = load_config(out_dir / "run/config.yaml")
    assert saved.data.path == str(out_dir / "data") and saved.train.max_steps == 60
    assert saved.to_dict() == ckpt["config"]


def test_train_on_synthetic_identities_directly(tmp_path):
    from facetrain.engine.trainer import train

    config = load_config(
        "demo_cpu",
        [
            "data.synthetic.num_identities=6",
            "data.synthetic.images_per_identity=4",
            "data.synthetic.val_identities=4",
            "data.synthetic.val_pairs=20",
            "train.batch_size=8",
            "train.max_steps=3",
            "train.log_every=1",
            "eval.every_steps=2",
            f"output.dir={tmp_path}",
            "loss.margin=arcface",
            "loss.scale=16",
            "loss.angular_margin=0.3",
            "loss.additive_margin=0.0",
            "optim.name=adamw",
            "optim.lr=0.001",
            "schedule.name=cosine",
        ],
    )
    result = train(config, progress=False)
    assert result.steps == 3 and result.num_classes == 6 and result.num_images == 24
    assert math.isfinite(result.final_loss) and result.images_per_sec > 0
    assert [e["step"] for e in result.evaluations] == [2, 3]
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_margin_loss_matches_float64_cosface():
    from facetrain.engine.trainer import ClassCentres, build_loss_margin, margin_loss

    config = load_config("demo_cpu", ["loss.scale=30", "loss.additive_margin=0.35"])
    torch.manual_seed(1)
    centres = ClassCentres(7, 5)
    emb = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 6, 3])
    loss = margin_loss(emb, labels, centres, build_loss_margin(config))
    # Independent CosFace (Wang et al. 2018): logit_y = s (cos_y - m), logit_j = s cos_j; mean softmax CE.
    e = emb.double().numpy()
    w = centres.weight.detach().double().numpy()
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    logits = 30 * cos
    logits[np.arange(4), labels.numpy()] -= 30 * 0.35
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected = np.mean(logz - logits[np.arange(4), labels.numpy()])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["poly", "cosine", "step", "constant"])
def test_lr_factor_against_formulas(name):
    from facetrain.engine.trainer import lr_factor

    config = load_config(
        None,
        [
            f"schedule.name={name}",
            "schedule.power=2",
            "schedule.milestones=[2,3]",
            "schedule.gamma=0.5",
            "schedule.warmup_epochs=1",
        ],
    )
    total, warmup, per_epoch = 40, 10, 10
    for step in range(total):
        got = lr_factor(step, total, warmup, per_epoch, config)
        if step < warmup:
            want = (step + 1) / warmup
        else:
            t = (step - warmup) / (total - warmup)
            want = {
                "poly": (1 - t) ** 2,
                "cosine": 0.5 * (1 + math.cos(math.pi * t)),
                "step": 0.5 ** ((step >= 20) + (step >= 30)),
                "constant": 1.0,
            }[name]
        assert got == pytest.approx(want, abs=1e-12), step


def test_embed_images_flip_sums_raw_embeddings():
    from facetrain.engine.trainer import embed_images, normalize_images

    class Affine(torch.nn.Module):  # a linear "backbone": f(x) = A vec(x) + b
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    model = Affine()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(3)]
    got = embed_images(model, images, batch_size=2)
    x = normalize_images(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    with torch.no_grad():
        raw = model(x) + model(torch.flip(x, dims=[3]))
    np.testing.assert_allclose(got, torch.nn.functional.normalize(raw, dim=1).numpy(), rtol=1e-5, atol=1e-6)


def test_demo_preset_is_valid_and_uses_a_registered_backbone():
    from facetrain.models import build_backbone

    config = load_config("demo_cpu")
    model = build_backbone(
        config.model.backbone, embedding_size=config.model.embedding_size, **config.model.backbone_kwargs
    )
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, config.model.embedding_size)


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """The default `facetrain demo` (a few minutes on 2 cores): clear learning on held-out identities."""
    from facetrain.engine.demo import run_demo

    result = run_demo(tmp_path, progress=False)
    assert result.accuracy_before < 0.75, result
    assert result.accuracy_after > 0.85, result
    assert result.accuracy_after > result.accuracy_before + 0.15, result


@pytest.mark.parametrize(
    "name", ["arcface", "cosface", "combined", "sphereface", "curricularface", "adaface", "magface", "softmax"]
)
def test_every_config_margin_trains_one_loss(name):
    from facetrain.engine.trainer import ClassCentres, build_loss_margin, margin_loss

    margin = build_loss_margin(load_config(None, [f"loss.margin={name}"]))
    centres = ClassCentres(5, 8)
    emb = (torch.randn(4, 8) * 20).requires_grad_(True)  # norms inside MagFace's [10, 110] band
    loss = margin_loss(emb, torch.tensor([0, 1, 2, 3]), centres, margin)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and centres.weight.grad.abs().sum() > 0
