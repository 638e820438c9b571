"""Embedder: torch module, TorchScript and ONNX give the same raw embeddings of the documented preprocessing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from facetrain.embed import OnnxEmbedder, TorchEmbedder, load_embedder
from facetrain.errors import DataError, ModelError


class TinyNet(nn.Module):
    """(B, 3, 112, 112) -> (B, 8): pooled conv features, asymmetric so a flip changes the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.fc = nn.Linear(4 * 27 * 27, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _reference(module, images):
    x = torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2)
    x = (x / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        return copy.deepcopy(module).double()(x).numpy()


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)


def test_torch_embedder_batches_and_preprocessing(images):
    net = TinyNet()
    emb = TorchEmbedder(net, device="cpu", batch_size=2)
    out = emb.embed(images)
    assert out.shape == (5, 8) and out.dtype == np.float32 and emb.embedding_size == 8
    ref = _reference(net, images)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    plain, flipped = emb.embed_flip(images)
    np.testing.assert_allclose(flipped, _reference(net, images[:, :, ::-1].copy()), rtol=1e-4, atol=1e-4)
    assert not np.allclose(plain, flipped)


def test_identity_depends_on_weights_only():
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    ea, eb = TorchEmbedder(a, "cpu"), TorchEmbedder(b, "cpu", name="other")
    assert ea.identity == eb.identity and len(ea.identity) == 16
    with torch.no_grad():
        b.fc.bias[0] += 1e-3
    assert TorchEmbedder(b, "cpu").identity != ea.identity


def test_torchscript_file_and_channels_last(tmp_path, images):
    net = TinyNet().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(net).save(str(path))
    emb = load_embedder(path, device="cpu", batch_size=3, channels_last=True)
    assert emb.name == "tiny"
    np.testing.assert_allclose(emb.embed(images), _reference(net, images), rtol=1e-4, atol=1e-4)


def test_onnx_export_dynamic_and_fixed_batch(tmp_path, images):
    pytest.importorskip("onnxruntime")
    net = TinyNet().eval()
    dynamic = tmp_path / "dyn.onnx"
    fixed = tmp_path / "fixed.onnx"
    dummy = torch.zeros(1, 3, 112, 112)
    torch.onnx.export(
        net,
        dummy,
        str(dynamic),
        input_names=["data"],
        dynamic_axes={"data": {0: "None"}},
        opset_version=17,
        dynamo=False,
    )
    torch.onnx.export(net, torch.zeros(2, 3, 112, 112), str(fixed), opset_version=17, dynamo=False)
    ref = _reference(net, images)
    dyn = load_embedder(dynamic, batch_size=4)
    assert isinstance(dyn, OnnxEmbedder) and dyn.embedding_size == 8 and dyn.fixed_batch is None
    np.testing.assert_allclose(dyn.embed(images), ref, rtol=1e-4, atol=1e-4)
    fix = OnnxEmbedder(fixed)
    assert fix.fixed_batch == 2
    np.testing.assert_allclose(fix.embed(images), ref, rtol=1e-4, atol=1e-4)  # 5 images: last chunk padded
    assert dyn.identity != fix.identity


def test_bad_inputs(tmp_path):
    emb = TorchEmbedder(TinyNet(), "cpu")
    with pytest.raises(DataError, match="uint8"):
        emb.embed(np.zeros((1, 112, 112, 3), np.float32))
    with pytest.raises(DataError, match="112x112"):
        emb.embed(np.zeros((1, 100, 100, 3), np.uint8))
    assert emb.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 8)
    with pytest.raises(ModelError, match="not found"):
        load_embedder(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_embedder(junk)


def test_arcface_state_dict_loads_through_load_backbone(tmp_path, images):
    from facetrain.models import build_backbone

    net = build_backbone("mbf", embedding_size=512).eval()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    emb = load_embedder(path, device="cpu", batch_size=4)
    direct = TorchEmbedder(net, "cpu")
    assert emb.embedding_size == 512 and emb.identity == direct.identity
    np.testing.assert_allclose(emb.embed(images[:2]), direct.embed(images[:2]), rtol=1e-4, atol=1e-4)
