"""load_backbone / save_backbone for every format: facetrain checkpoints, backbone.pth, TorchScript, ONNX."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from facetrain.errors import ModelError
from facetrain.models import build_backbone, infer_architecture, load_backbone, save_backbone

SMALL_MBF = {"blocks": (1, 2, 2, 1), "scale": 1}
LARGE = (2, 8, 12, 4)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give BatchNorm non-trivial running statistics (as in a trained model), then switch to eval."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 112, 112))
    return model.eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(3))


def test_save_and_load_facetrain_checkpoint(tmp_path):
    model = _trained_like(build_backbone("mbf", embedding_size=64, **SMALL_MBF))
    path = save_backbone(model, tmp_path / "sub" / "mbf.pt", "mbf", **SMALL_MBF)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, weights_only=True)
    assert raw["backbone_name"] == "mobilefacenet" and raw["embedding_size"] == 64
    loaded = load_backbone(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("r18", {}, ("iresnet18", {"embedding_size": 512})),
        ("r18", {"embedding_size": 128, "head": "gdc"}, ("iresnet18", {"embedding_size": 128, "head": "gdc"})),
        ("mbf", {}, ("mobilefacenet", {"embedding_size": 512, "blocks": (1, 4, 6, 2), "scale": 2})),
        ("mbf_large", {"embedding_size": 256}, ("mobilefacenet", {"embedding_size": 256, "blocks": LARGE, "scale": 4})),
        ("mbf", {**SMALL_MBF, "head": "e"}, ("mobilefacenet", {"embedding_size": 512, "head": "e", **SMALL_MBF})),
        ("vit_t", {"embedding_size": 256}, ("vit_t", {"embedding_size": 256})),
        ("vit_l", {}, ("vit_l", {"embedding_size": 512})),
    ],
)  # fmt: skip
def test_infer_architecture_from_keys(name, kwargs, expected):
    with torch.device("meta"):
        state = build_backbone(name, **kwargs).state_dict()
    assert infer_architecture(state) == expected


def test_arcface_state_dict_file_with_explicit_name(tmp_path):
    model = _trained_like(build_backbone("mbf", embedding_size=128, **SMALL_MBF))
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    for loaded in (load_backbone(path), load_backbone(path, name="mbf", embedding_size=128, **SMALL_MBF)):
        with torch.no_grad():
            assert torch.equal(loaded(_x()), model(_x()))


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save(build_backbone("r18", embedding_size=128).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_backbone(path, name="r34", embedding_size=128)
    msg = str(info.value)
    assert "missing" in msg and "layer1.2.bn1.weight" in msg and "more)" in msg and "\n" not in msg
    assert "unexpected 0 keys" in msg
    with pytest.raises(ModelError) as info:
        load_backbone(path, name="r18", embedding_size=512)
    assert "shape mismatch" in str(info.value) and "fc.weight" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(ModelError, match="no such weights file"):
        load_backbone(tmp_path / "nope.pth")
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"\x80not a pickle at all")
    with pytest.raises(ModelError, match="not a readable"):
        load_backbone(bad)
    odd = tmp_path / "odd.pth"
    torch.save({"step": 3}, odd)
    with pytest.raises(ModelError, match="neither a facetrain checkpoint"):
        load_backbone(odd)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* are deprecated in favour of torch.export
def test_torchscript_file(tmp_path):
    model = _trained_like(build_backbone("mbf", embedding_size=64, **SMALL_MBF))
    path = tmp_path / "mbf.torchscript.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 112, 112)), str(path))
    loaded = load_backbone(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "fold"),
    [
        ("r18", {"embedding_size": 128}, True),  # TorchScript exporter default: Conv+BN folded, weights renamed
        ("r18", {"embedding_size": 128}, False),  # BN kept, Linear weights transposed in-graph
        ("mbf", SMALL_MBF, True),
        ("r18", {"head": "gdc"}, True),
        ("mbf", {**SMALL_MBF, "head": "e"}, True),
    ],
)
def test_onnx_round_trip(name, kwargs, fold, tmp_path):
    pytest.importorskip("onnx")
    model = _trained_like(build_backbone(name, **kwargs))
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, do_constant_folding=fold,
            input_names=["input"], output_names=["embedding"], dynamic_axes={"input": {0: "batch"}},
        )  # fmt: skip
    imported = load_backbone(path)  # architecture inferred from the graph; checked against onnxruntime inside
    assert type(imported) is type(model)
    with torch.no_grad():
        ref, got = model(_x()), imported(_x())
    diff = (F.normalize(got, dim=1) - F.normalize(ref, dim=1)).abs().max().item()
    assert diff < 1e-5, f"normalized embeddings differ by {diff:.3g}"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_onnx_wrong_architecture_is_reported(tmp_path):
    pytest.importorskip("onnx")
    model = build_backbone("mbf", **SMALL_MBF).eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), dynamo=False)
    with pytest.raises(ModelError, match="do not fit|left over"):
        load_backbone(path, name="mbf", blocks=(1, 2, 2, 2), scale=1)


class _Scaled(torch.nn.Module):
    """A backbone with an extra unweighted op after it: structurally identical, numerically not."""

    def __init__(self, inner: torch.nn.Module, pre: bool):
        super().__init__()
        self.inner, self.pre = inner, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - 0.5) * 2.0) if self.pre else self.inner(x) * 2.0


@pytest.mark.parametrize(("pre", "message"), [(False, "do not reproduce"), (True, "preprocesses its input")])
def test_onnx_import_checks_numerics_and_input(pre, message, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = _Scaled(_trained_like(build_backbone("mbf", embedding_size=32, **SMALL_MBF)), pre).eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), dynamo=False)
    with pytest.raises(ModelError, match=message):
        load_backbone(path, name="mbf", embedding_size=32, **SMALL_MBF)
