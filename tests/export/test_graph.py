"""The exact PReLU rewrite (facetrain.export.graph): numerics against float64, export / quantize / session wiring."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from facetrain.export.graph import (  # noqa: E402
    count_ops,
    cpu_session_model,
    decompose_prelu,
    restore_prelu,
    session_model,
)


def _prelu_model(slope: np.ndarray, dtype=np.float32) -> onnx.ModelProto:
    """x (2, 4, 5, 5) -> PRelu(x, slope) -> PRelu(., slope) -> y; the slope an initializer of the given shape."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    nodes = [
        helper.make_node("PRelu", ["x", "slope"], ["h"], name="/block/PRelu"),
        helper.make_node("PRelu", ["h", "slope"], ["y"], name="Mul_looking_prelu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [2, 4, 5, 5])],
        [helper.make_tensor_value_info("y", elem, [2, 4, 5, 5])],
        initializer=[numpy_helper.from_array(slope.astype(dtype), "slope")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "slope",
    [
        np.array([0.25, -0.5, 1.5, 0.0]).reshape(4, 1, 1),  # per channel, incl. negative and > 1 slopes
        np.array([0.1]),  # one shared slope
        np.linspace(-1, 2, 20).reshape(4, 1, 5),  # per channel and column: any unidirectional broadcast
    ],
)
def test_decomposed_prelu_equals_the_float64_formula_and_native_prelu(slope):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -0.0, 1e-30]
    native = _prelu_model(slope)
    rewritten = _prelu_model(slope)
    assert decompose_prelu(rewritten) == 2
    onnx.checker.check_model(rewritten)
    ops = count_ops(rewritten)
    assert "PRelu" not in ops and ops == {"Relu": 2, "Min": 2, "Mul": 2, "Add": 2}
    # InsightFace's router must not mistake the new nodes for in-graph normalization
    assert not any(n.name.startswith(("Sub", "_minus", "Mul", "_mul")) for n in rewritten.graph.node[1:])

    x64 = x.astype(np.float64)
    s64 = slope.astype(np.float32).astype(np.float64)
    h = np.where(x64 >= 0, x64, s64 * x64)
    expected = np.where(h >= 0, h, s64 * h)
    got = _run(rewritten, x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)
    np.testing.assert_array_equal(got, _run(native, x))  # bit-exact against onnxruntime's own PRelu


def test_affine_form_and_restoring_the_exact_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    slope = np.array([0.25, -0.5, 1.5, 0.0]).reshape(4, 1, 1)
    native = _run(_prelu_model(slope), x)

    affine = _prelu_model(slope)
    assert decompose_prelu(affine, "affine") == 2
    assert count_ops(affine) == {"Relu": 2, "Mul": 4, "Add": 2}  # no Min: every op has an INT8 kernel
    np.testing.assert_allclose(_run(affine, x), native, rtol=1e-6, atol=1e-6)  # equal up to float rounding

    exact = _prelu_model(slope)
    decompose_prelu(exact)
    assert restore_prelu(exact) == 2 and count_ops(exact) == {"PRelu": 2}
    assert [init.name for init in exact.graph.initializer] == ["slope"]  # the zero constant went with the Min nodes
    onnx.checker.check_model(exact)
    np.testing.assert_array_equal(_run(exact, x), native)

    shared = _prelu_model(slope)  # an intermediate read elsewhere too: that decomposition must stay
    decompose_prelu(shared)
    relu_out = next(n.output[0] for n in shared.graph.node if n.op_type == "Relu")
    shared.graph.output.append(helper.make_tensor_value_info(relu_out, TensorProto.FLOAT, [2, 4, 5, 5]))
    assert restore_prelu(shared) == 1
    with pytest.raises(ValueError, match="unknown PReLU form"):
        decompose_prelu(_prelu_model(slope), "fast")


def test_rewrite_keeps_double_precision_and_leaves_computed_slopes_alone():
    x = np.random.default_rng(1).normal(size=(2, 4, 5, 5))
    double = _prelu_model(np.full((4, 1, 1), 0.3), dtype=np.float64)
    native = _run(double, x)
    assert decompose_prelu(double) == 2
    np.testing.assert_array_equal(_run(double, x), native)

    computed = _prelu_model(np.full((4, 1, 1), 0.3))
    computed.graph.node.insert(0, helper.make_node("Neg", ["slope"], ["slope_neg"], name="neg"))
    computed.graph.node[1].input[1] = "slope_neg"  # the first PRelu's slope is now computed, not stored
    assert decompose_prelu(computed) == 1
    assert count_ops(computed)["PRelu"] == 1

    # the TorchScript exporter shares equal slopes through Identity nodes: still a constant, rewritten
    shared = _prelu_model(np.full((4, 1, 1), -0.7))
    x32 = x.astype(np.float32)
    native = _run(shared, x32)
    shared.graph.node.insert(0, helper.make_node("Identity", ["slope"], ["slope_copy"], name="copy"))
    shared.graph.node[2].input[1] = "slope_copy"
    assert decompose_prelu(shared) == 2 and "PRelu" not in count_ops(shared)
    np.testing.assert_array_equal(_run(shared, x32), native)


def test_session_model_rewrites_only_for_the_cpu_provider(tmp_path):
    path = tmp_path / "p.onnx"
    onnx.save(_prelu_model(np.full((4, 1, 1), 0.2)), str(path))
    data = cpu_session_model(path)
    assert isinstance(data, bytes) and "PRelu" not in count_ops(onnx.load_from_string(data))
    assert session_model(path, ["CPUExecutionProvider"]) == data
    assert session_model(path, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == str(path)
    plain = tmp_path / "plain.onnx"
    model = _prelu_model(np.full((4, 1, 1), 0.2))
    decompose_prelu(model)
    onnx.save(model, str(plain))
    assert cpu_session_model(plain) == str(plain)  # nothing to rewrite: onnxruntime reads the file itself
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert cpu_session_model(junk) == str(junk)  # onnxruntime's loader reports it, with the file name


def test_export_decomposes_by_default_and_native_keeps_prelu(small_model, exported, tmp_path):
    import torch

    from facetrain.embed import OnnxEmbedder
    from facetrain.export import export_onnx, inspect_onnx, random_faces

    native_path = tmp_path / "native.onnx"
    export_onnx(small_model, native_path, prelu="native")
    assert count_ops(onnx.load(str(native_path)))["PRelu"] > 0
    assert "PRelu" not in count_ops(onnx.load(str(exported)))
    assert inspect_onnx(exported).metadata["facetrain.prelu"] == "decomposed"
    assert inspect_onnx(native_path).metadata["facetrain.prelu"] == "native"

    faces = random_faces(6, seed=3)
    x = torch.from_numpy((faces.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5)
    with torch.no_grad():
        reference = small_model(x).numpy()
    for path in (exported, native_path):
        emb = OnnxEmbedder(path, providers=["CPUExecutionProvider"]).embed(faces)
        np.testing.assert_allclose(emb, reference, rtol=1e-4, atol=1e-4)

    with pytest.raises(Exception, match="unknown prelu mode 'fast'"):
        export_onnx(small_model, tmp_path / "x.onnx", prelu="fast")


def test_quantize_rewrites_native_prelu_and_uses_unsigned_activations(small_model, tmp_path):
    from facetrain.export import export_onnx, quantize, random_faces

    native = tmp_path / "native.onnx"
    export_onnx(small_model, native, prelu="native")
    calib = random_faces(16, seed=1)
    fast = quantize(native, tmp_path / "u8.onnx", mode="static", calibration=calib)
    kept = quantize(native, tmp_path / "s8.onnx", mode="static", calibration=calib, activations="int8", prelu="native")

    def zero_point_types(path):
        model = onnx.load(str(path))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        return {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}

    assert not {"PRelu", "Min"} & set(count_ops(onnx.load(str(fast))))
    assert count_ops(onnx.load(str(kept)))["PRelu"] > 0
    # facetrain's own export holds the exact form (with Min): quantize turns it into the INT8-friendly one too
    exported_exact = tmp_path / "exact.onnx"
    export_onnx(small_model, exported_exact)
    assert "Min" in count_ops(onnx.load(str(exported_exact)))
    from_export = quantize(exported_exact, tmp_path / "from_export.onnx", mode="static", calibration=calib)
    assert not {"PRelu", "Min"} & set(count_ops(onnx.load(str(from_export))))
    assert zero_point_types(fast) == {TensorProto.UINT8}
    assert zero_point_types(kept) == {TensorProto.INT8}
    with pytest.raises(Exception, match="unknown activation type"):
        quantize(native, tmp_path / "x.onnx", mode="static", calibration=calib, activations="int4")
