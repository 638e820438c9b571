"""ONNX / TorchScript export: parity with PyTorch, graph conventions InsightFace relies on, metadata, bad input."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from facetrain.errors import ModelError  # noqa: E402
from facetrain.export import (  # noqa: E402
    check_mfr,
    check_parity,
    deployment_problems,
    export_onnx,
    export_torchscript,
    inspect_onnx,
    load_model_for_export,
    random_faces,
    read_torchscript_metadata,
)
from facetrain.models import build_backbone, list_backbones, save_backbone  # noqa: E402

SMALL_MBF = {"blocks": (1, 1, 1, 1), "scale": 1}


def _torch_embed_float64(model, rgb: np.ndarray) -> np.ndarray:
    """Reference: arcface_torch preprocessing written out here, ((x / 255) - 0.5) / 0.5, NCHW."""
    x = torch.from_numpy(rgb.astype(np.float64) / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        return model(x.permute(0, 3, 1, 2).float().contiguous()).double().numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnxruntime_matches_pytorch(small_model, exported, record_property):
    faces = random_faces(6)
    expected = _torch_embed_float64(small_model, faces)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    x = ((faces.astype(np.float64) - 127.5) / 127.5).transpose(0, 3, 1, 2).astype(np.float32)
    got = session.run(None, {"data": x})[0].astype(np.float64)
    max_diff = float(np.abs(got - expected).max())
    record_property("max_abs_diff", max_diff)
    assert got.shape == (6, 128)
    assert _cosines(got, expected).min() > 0.9999
    assert max_diff < 1e-3

    report = check_parity(small_model, exported, faces)
    assert report.n_images == 6 and report.passed()
    assert report.max_abs_diff == pytest.approx(max_diff, abs=1e-4)


def test_graph_has_static_hw_symbolic_batch_and_one_output(exported):
    proto = onnx.load(str(exported))
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "data"
    assert [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert not dims[0].HasField("dim_value") and dims[0].dim_param
    assert len(proto.graph.output) == 1
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        out = session.run(None, {"data": np.zeros((batch, 3, 112, 112), np.float32)})[0]
        assert out.shape == (batch, 128)
    # No normalization inside the graph: the graph holds no Sub node and no Div by 127.5 before the first Conv.
    first_conv = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Conv")
    assert not any(n.op_type in ("Sub", "Div") for n in proto.graph.node[:first_conv])


def test_first_node_names_do_not_trigger_insightface_normalization_guess(exported):
    names = [n.name for n in onnx.load(str(exported)).graph.node[:8]]
    assert not any(n.startswith(("Sub", "_minus", "Mul", "_mul")) for n in names)


def test_misleading_node_names_are_renamed():
    """A graph whose first nodes are called Sub/Mul (mxnet style) gets them renamed; the graph still runs."""
    from onnx import TensorProto, helper

    from facetrain.export.onnx import _fix_graph

    nodes = [
        helper.make_node("Sub", ["x", "c"], ["a"], name="Sub_0"),
        helper.make_node("Mul", ["a", "c"], ["b"], name="_mul1"),
        helper.make_node("Flatten", ["b"], ["y"], name="Flatten_2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])],
        [helper.make_tensor("c", TensorProto.FLOAT, [1], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _fix_graph(model, embedding_size=3 * 112 * 112)
    names = [n.name for n in model.graph.node]
    assert not any(n.startswith(("Sub", "_minus", "Mul", "_mul")) for n in names)
    assert names[2] == "Flatten_2"
    onnx.checker.check_model(model)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((1, 3, 112, 112), np.float32)}
    )[0]
    assert np.allclose(out, (1.0 - 2.0) * 2.0)


def test_metadata_records_source_checkpoint(small_model, tmp_path):
    ckpt = save_backbone(small_model, tmp_path / "small.pt", "mbf", embedding_size=128, **SMALL_MBF)
    module, sha, name = load_model_for_export(ckpt)
    assert sha == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    info = export_onnx(module, tmp_path / "m.onnx", source_sha256=sha, name=name)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta == info.metadata
    assert meta["facetrain.embedding_size"] == "128"
    assert meta["facetrain.source_sha256"] == sha
    assert float(meta["facetrain.input_mean"]) == 127.5 and float(meta["facetrain.input_std"]) == 127.5
    assert "NCHW" in meta["facetrain.input_layout"] and "RGB" in meta["facetrain.input_layout"]
    from facetrain import __version__

    assert meta["facetrain.version"] == __version__


# -- InsightFace's loader, re-implemented from its documented behaviour (REFERENCE section 8) ------------------------


def _insightface_route(path) -> str | None:
    """ModelRouter.get_model's rules, first match wins."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape
    if len(outputs) >= 5:
        return "detection"
    if shape[2] == 192 and shape[3] == 192:
        return "landmark"
    if shape[2] == 96 and shape[3] == 96:
        return "attribute"
    if len(inputs) == 2 and shape[2] == 128 and shape[3] == 128:
        return "inswapper"
    if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
        raise TypeError(f"'>=' not supported for symbolic H/W {shape[2:]}")  # what upstream's comparison does
    if shape[2] == shape[3] and shape[2] >= 112 and shape[2] % 16 == 0:
        return "recognition"
    return None


def _arcface_onnx_get_feat(path, bgr_faces: list[np.ndarray]) -> np.ndarray:
    """ArcFaceONNX: mean/std from the first 8 node names, then cv2.dnn.blobFromImages with swapRB."""
    graph = onnx.load(str(path)).graph
    names = [n.name for n in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    mean, std = (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    size = (inp.shape[3], inp.shape[2])
    blob = cv2.dnn.blobFromImages(bgr_faces, 1.0 / std, size, (mean, mean, mean), swapRB=True)
    return session.run([session.get_outputs()[0].name], {inp.name: blob})[0]


def test_reimplemented_insightface_router_loads_it_as_recognition(small_model, exported):
    assert _insightface_route(exported) == "recognition"
    rgb = random_faces(3, seed=4)
    feats = _arcface_onnx_get_feat(exported, [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in rgb]).astype(np.float64)
    assert _cosines(feats, _torch_embed_float64(small_model, rgb)).min() > 0.9999


def test_router_rejects_symbolic_height(exported, tmp_path):
    """Why H and W must stay static: with symbolic H/W the router's comparison fails."""
    proto = onnx.load(str(exported))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    bad = tmp_path / "symbolic.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(TypeError):
        _insightface_route(bad)
    assert any("static" in p for p in deployment_problems(inspect_onnx(bad)))


def test_real_insightface_package_loads_it(small_model, exported, assets_dir):
    model_zoo = pytest.importorskip(
        "insightface.model_zoo", reason="insightface not installed (pip install --no-deps insightface==0.7.3)"
    )
    model = model_zoo.get_model(str(exported), providers=["CPUExecutionProvider"])
    assert type(model).__name__ == "ArcFaceONNX" and model.taskname == "recognition"
    assert (model.input_mean, model.input_std) == (127.5, 127.5)
    bgr = cv2.imread(
        str(
            assets_dir
            / "aligned112"
            / "grace_hopper"
            / sorted(p.name for p in (assets_dir / "aligned112" / "grace_hopper").iterdir())[0]
        )
    )
    feat = model.get_feat(bgr).astype(np.float64)
    ours = _torch_embed_float64(small_model, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[None])
    assert _cosines(feat, ours)[0] > 0.9999


# -- MFR rules -------------------------------------------------------------------------------------------------------


def test_mfr_rules_pass_for_the_export_and_catch_violations(exported, tmp_path):
    rules = {r.name: r for r in check_mfr(exported, max_latency_ms=1e9, runs=2)}
    assert all(r.passed for r in rules.values()), [r for r in rules.values() if not r.passed]
    assert rules["feature dim"].value == "128"

    proto = onnx.load(str(exported))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # fixed batch
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    rules = {r.name: r for r in check_mfr(fixed, max_latency_ms=1e9, runs=2)}
    assert not rules["symbolic batch dimension"].passed
    assert not rules["finite batch outputs"].passed  # a batch of 32 cannot run
    assert rules["fp32 weights (no fp16/int8)"].passed

    strict = {r.name: r for r in check_mfr(exported, max_latency_ms=1e-6, runs=2)}
    assert not strict["single-image latency (CPU here; GPU upstream)"].passed


# -- TorchScript -----------------------------------------------------------------------------------------------------


def test_torchscript_roundtrip(small_model, tmp_path):
    path = export_torchscript(small_model, tmp_path / "m.pt", source_sha256="cd" * 32)
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded(x), small_model(x), atol=1e-5)
    meta = read_torchscript_metadata(path)
    assert meta["embedding_size"] == 128 and meta["source_sha256"] == "cd" * 32
    # facetrain's own loader takes the TorchScript file too.
    module, sha, _ = load_model_for_export(path)
    with torch.no_grad():
        assert torch.allclose(module(x), small_model(x), atol=1e-5)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


# -- CLI and bad input -----------------------------------------------------------------------------------------------


def test_cli_export_and_check_from_checkpoint(small_model, tmp_path, run_cli):
    ckpt = save_backbone(small_model, tmp_path / "small.pt", "mbf", embedding_size=128, **SMALL_MBF)
    out = tmp_path / "cli.onnx"
    code, stdout, err = run_cli("export", "onnx", ckpt, out)
    assert code == 0, err
    assert "['batch', 3, 112, 112]" in stdout
    code, stdout, err = run_cli("export", "check", ckpt, out, "--limit", "4", "--track", "mfr")
    assert code == 0, err
    assert "PASS" in stdout and "| exactly one output | 1 | 1 | pass |" in stdout
    code, stdout, err = run_cli("export", "torchscript", ckpt, tmp_path / "cli.pt")
    assert code == 0, err
    assert torch.jit.load(str(tmp_path / "cli.pt")) is not None


def test_check_fails_loudly_on_a_different_model(small_model, exported, tmp_path, run_cli):
    other = build_backbone("mbf", embedding_size=128, **SMALL_MBF)
    ckpt = save_backbone(other, tmp_path / "other.pt", "mbf", embedding_size=128, **SMALL_MBF)
    code, stdout, err = run_cli("export", "check", ckpt, exported, "--limit", "4")
    assert code == 1
    assert "FAIL" in stdout and err.count("\n") == 1 and "min cosine" in err


def test_bad_files_give_one_line_errors(tmp_path, run_cli):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ModelError, match="not an ONNX model"):
        inspect_onnx(junk)
    code, _out, err = run_cli("export", "quantize", junk, tmp_path / "q.onnx", "--mode", "dynamic")
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1
    code, _out, err = run_cli("export", "onnx", tmp_path / "missing.pt", tmp_path / "x.onnx")
    assert code == 1 and "no such model file" in err
    with pytest.raises(ModelError, match="multiple of 16"):
        export_onnx(build_backbone("mbf", **SMALL_MBF), tmp_path / "x.onnx", input_size=100)


def test_check_reports_accuracy_of_both_models_on_a_bin(small_model, exported, tmp_path, run_cli):
    from facetrain.data import write_bin
    from facetrain.data.images import encode_image

    ckpt = save_backbone(small_model, tmp_path / "small.pt", "mbf", embedding_size=128, **SMALL_MBF)
    faces = random_faces(20, seed=6)
    write_bin(tmp_path / "p.bin", [encode_image(f, ext=".png") for f in faces], [i % 2 == 0 for i in range(10)])
    report = check_parity(small_model, exported, faces, bin_path=tmp_path / "p.bin")
    assert report.torch_accuracy is not None and report.torch_accuracy == pytest.approx(report.onnx_accuracy)
    code, stdout, err = run_cli("export", "check", ckpt, exported, "--bin", tmp_path / "p.bin", "--limit", "6")
    assert code == 0, err
    assert "faces: 6 faces from" in stdout and f"torch {report.torch_accuracy:.4%}" in stdout


@pytest.mark.realdata
def test_parity_on_real_aligned_faces(small_model, exported, assets_dir, run_cli, tmp_path):
    from facetrain.export import load_faces

    faces, description = load_faces(assets_dir / "aligned112", limit=28)
    assert faces.shape == (28, 112, 112, 3) and "28 faces" in description
    report = check_parity(small_model, exported, faces, faces=description)
    assert report.min_cosine > 0.9999, report


def test_cli_random_init_export_then_check_agree(tmp_path, run_cli):
    """--backbone NAME without a file: the same (seeded) random weights in export and in check."""
    out = tmp_path / "rand.onnx"
    code, stdout, err = run_cli("export", "onnx", "--backbone", "mbf", "--embedding-size", "64", out)
    assert code == 0, err
    assert inspect_onnx(out).metadata["facetrain.source_sha256"] == "random-init"
    code, stdout, err = run_cli("export", "check", "--backbone", "mbf", "--embedding-size", "64", out, "--limit", "2")
    assert code == 0, err
    assert "PASS" in stdout
    code, _stdout, err = run_cli("export", "onnx", "--backbone", "mbf")
    assert code == 2 and "--backbone NAME and OUT" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_exports_with_parity(name, tmp_path):
    kwargs = {"zero_init_residual": True} if name.startswith("iresnet") else {}
    module, _, _ = load_model_for_export(None, backbone=name, **kwargs)
    # Random deep IResNets overflow float32 (r100: inf); small, non-zero residual scales keep them finite.
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d) and not bn.weight.any():
                bn.weight.uniform_(0.01, 0.05)
    info = export_onnx(module, tmp_path / f"{name}.onnx", name=name)
    assert info.static_hw and info.dynamic_batch and not deployment_problems(info)
    report = check_parity(module, tmp_path / f"{name}.onnx", random_faces(3))
    assert report.min_cosine > 0.9999, report


def test_parity_refuses_a_model_that_overflows(tmp_path):
    class Overflow(torch.nn.Module):
        def forward(self, x):
            return (torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) + 2.0) * 1e39  # inf in float32

    model = Overflow().eval()
    export_onnx(model, tmp_path / "inf.onnx")
    with pytest.raises(ModelError, match="NaN/Inf"):
        check_parity(model, tmp_path / "inf.onnx", random_faces(2))
