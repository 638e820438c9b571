"""``train.compile``: the backbone runs through ``torch.compile`` (inductor, CPU here), trains like eager to float
tolerance, checkpoints plain state-dict keys (no ``_orig_mod.``) and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from facetrain.config import load_config

from .conftest import register_tiny_nobn

TINY = "_tiny_nobn_compile"


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_dynamo():
    register_tiny_nobn(TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _config(out: Path, *extra: str):
    return load_config(
        "demo_cpu",
        [
            "data.synthetic.num_identities=6",
            "data.synthetic.images_per_identity=4",
            "data.synthetic.val_identities=0",
            "data.num_workers=0",
            f"model.backbone={TINY}",
            "model.backbone_kwargs={}",
            "model.embedding_size=8",
            "loss.scale=16",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.log_every=1",
            "eval.every_steps=0",
            f"output.dir={out}",
            *extra,
        ],
    )


def _losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"train"' in line]


def test_compile_uses_the_compiled_module_matches_eager_and_resumes(tmp_path, monkeypatch):
    """Fast: the same trainer code path with dynamo + AOTAutograd but no inductor code generation (a cold inductor
    compile takes 20-30 s on one CPU thread; the slow test below runs it)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_compiler

    graphs: list[torch.fx.GraphModule] = []

    def recording_compiler(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=make_boxed_compiler(recording_compiler))
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **{**kw, "backend": backend}))
    _check_compiled_training(tmp_path)
    assert len(graphs) >= 2  # forward and backward graphs of the backbone were compiled and run


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager_and_resumes(tmp_path):
    """The real thing: ``torch.compile`` with its default backend (inductor generates and builds C++ kernels)."""
    from torch._dynamo.utils import counters

    counters.clear()
    _check_compiled_training(tmp_path)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the backbone's forward


def _check_compiled_training(tmp_path: Path) -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    from facetrain.engine.trainer import Trainer, train
    from facetrain.models import load_backbone

    eager = train(_config(tmp_path / "eager"), progress=False)

    trainer = Trainer(_config(tmp_path / "compiled", "train.compile=true"), progress=False)
    assert isinstance(trainer.backbone, OptimizedModule) and trainer.backbone._orig_mod is trainer.raw_backbone
    initial_fc = trainer.raw_backbone.fc.weight.detach().clone()
    compiled = trainer.train()

    assert _losses(compiled.metrics_path) == pytest.approx(_losses(eager.metrics_path), rel=1e-4, abs=1e-5)
    a = torch.load(eager.checkpoint_path, weights_only=True)
    b = torch.load(compiled.checkpoint_path, weights_only=True)
    assert list(b["backbone"]) == list(a["backbone"])  # plain keys, no "_orig_mod." prefix
    for key, value in a["backbone"].items():
        torch.testing.assert_close(b["backbone"][key], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["class_centres"], a["class_centres"], rtol=1e-4, atol=1e-5)
    # Training moved the weights: the comparison is not "nothing happened" on both sides.
    assert float((b["backbone"]["fc.weight"] - initial_fc).abs().max()) > 1e-3
    load_backbone(compiled.checkpoint_path)  # the model contract reads it like any checkpoint

    # Stop after 2 compiled steps, resume compiled to 4: the same weights as the straight compiled run.
    half = train(_config(tmp_path / "resumed", "train.compile=true", "train.stop_after_steps=2"), progress=False)
    assert not half.completed and half.steps == 2
    resumed = train(_config(tmp_path / "resumed", "train.compile=true"), resume="auto", progress=False)
    assert resumed.steps == 4
    c = torch.load(resumed.checkpoint_path, weights_only=True)
    for key, value in b["backbone"].items():
        torch.testing.assert_close(c["backbone"][key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c["class_centres"], b["class_centres"], rtol=1e-5, atol=1e-6)
