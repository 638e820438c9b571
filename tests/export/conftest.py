"""Fixtures of the export tests: one small random MobileFaceNet and its ONNX export, shared by the session."""

from __future__ import annotations

import pytest

SMALL_MBF = {"blocks": (1, 1, 1, 1), "scale": 1}


@pytest.fixture(scope="session")
def small_model():
    """mbf with blocks (1, 1, 1, 1), scale 1, D=128 and non-trivial BatchNorm statistics, in eval mode."""
    torch = pytest.importorskip("torch")
    from facetrain.models import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_backbone("mbf", embedding_size=128, **SMALL_MBF).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def exported(small_model, tmp_path_factory):
    """``small_model`` exported to ONNX (source sha256 'abab...')."""
    pytest.importorskip("onnx")
    from facetrain.export import export_onnx

    path = tmp_path_factory.mktemp("export") / "small.onnx"
    export_onnx(small_model, path, source_sha256="ab" * 32, name="small-mbf")
    return path
