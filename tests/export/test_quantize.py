"""onnxruntime INT8 (dynamic, static QDQ) and fp16 quantization: loadable models, bounded error, the report table."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")

from facetrain.data import write_bin  # noqa: E402
from facetrain.data.images import encode_image  # noqa: E402
from facetrain.errors import DataError  # noqa: E402
from facetrain.export import FaceCalibrationReader, compare_models, quantize, random_faces  # noqa: E402

# Minimum cosine to the float model's embedding on smooth random faces (random-init weights, so a loose bound).
MIN_COSINE = {"dynamic": 0.95, "static": 0.95, "fp16": 0.999}


def _run(path, faces: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = ((faces.astype(np.float64) - 127.5) / 127.5).transpose(0, 3, 1, 2).astype(np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    calibration = random_faces(16, seed=3)
    return {mode: quantize(exported, root / f"{mode}.onnx", mode=mode, calibration=calibration) for mode in MIN_COSINE}


@pytest.mark.parametrize("mode", sorted(MIN_COSINE))
def test_quantized_model_loads_and_stays_close(mode, exported, quantized, record_property):
    faces = random_faces(6, seed=9)
    reference, got = _run(exported, faces), _run(quantized[mode], faces)
    assert got.shape == reference.shape == (6, 128)
    cos = np.sum(got * reference, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    record_property("min_cosine", float(cos.min()))
    assert cos.min() > MIN_COSINE[mode]
    assert cos.min() < 1.0 - 1e-9  # it really changed the arithmetic

    proto = onnx.load(str(quantized[mode]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["facetrain.quantization"] == mode
    assert meta["facetrain.embedding_size"] == "128"  # the float model's metadata survives
    dtypes = {init.data_type for init in proto.graph.initializer}
    ops = {node.op_type for node in proto.graph.node}
    size_ratio = quantized[mode].stat().st_size / exported.stat().st_size
    if mode == "fp16":
        assert onnx.TensorProto.FLOAT16 in dtypes and size_ratio < 0.6
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    else:
        assert onnx.TensorProto.INT8 in dtypes and size_ratio < 0.45
    if mode == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    # The batch dimension stays symbolic.
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def test_static_needs_calibration(exported, tmp_path):
    with pytest.raises(DataError, match="calibration"):
        quantize(exported, tmp_path / "s.onnx", mode="static")


def test_calibration_reader_covers_every_face_once():
    faces = random_faces(5)
    reader = FaceCalibrationReader(faces, "data", batch_size=2)
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item["data"])
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    joined = np.concatenate(batches)
    assert joined.dtype == np.float32 and joined.shape == (5, 3, 112, 112)
    np.testing.assert_allclose(joined, (faces.transpose(0, 3, 1, 2).astype(np.float64) - 127.5) / 127.5, atol=1e-6)
    reader.rewind()
    assert reader.get_next()["data"].shape[0] == 2


def _pairs_bin(path, n_pairs: int = 20) -> None:
    """Genuine pairs: a face and a brightened copy; impostor pairs: two different random faces."""
    faces = random_faces(2 * n_pairs, seed=5)
    images, issame = [], []
    for i in range(n_pairs):
        a = faces[2 * i]
        b = np.clip(a.astype(np.int16) + 12, 0, 255).astype(np.uint8) if i % 2 == 0 else faces[2 * i + 1]
        images += [encode_image(a, ext=".png"), encode_image(b, ext=".png")]
        issame.append(i % 2 == 0)
    write_bin(path, images, issame)


def test_compare_models_reports_accuracy(exported, quantized, tmp_path):
    bin_path = tmp_path / "pairs.bin"
    _pairs_bin(bin_path)
    rows = compare_models(
        [("fp32", exported), ("fp16", quantized["fp16"])],
        random_faces(4),
        bin_path=bin_path,
        batch_size=2,
        timing_runs=1,
    )
    assert [r.label for r in rows] == ["fp32", "fp16"]
    assert rows[0].min_cosine == pytest.approx(1.0)
    assert rows[0].accuracy is not None and 0.5 <= rows[0].accuracy <= 1.0
    assert abs(rows[0].accuracy - rows[1].accuracy) <= 0.05
    assert rows[1].size_mb < rows[0].size_mb and rows[0].latency_ms > 0


def test_cli_quantize_prints_one_table_and_enforces_the_budget(exported, tmp_path, run_cli):
    bin_path = tmp_path / "pairs.bin"
    _pairs_bin(bin_path)
    out = tmp_path / "dyn.onnx"
    args = ("export", "quantize", exported, out, "--mode", "dynamic", "--bin", bin_path, "--batch-size", "2")
    # A budget no model can meet (-101 points): the table is printed, then a loud non-zero exit.
    code, stdout, err = run_cli(*args, "--accuracy-budget", "-101")
    assert code == 1 and "loses" in err and "--allow-loss" in err
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table] == ["| model", "| fp32", "| dynamic"]
    assert all(row.rstrip(" |").endswith("%") for row in table[1:])  # accuracy column filled from the .bin
    assert onnx.load(str(out)).graph.node  # the quantized model is kept for inspection
    code, stdout, err = run_cli(*args, "--accuracy-budget", "-101", "--allow-loss")
    assert code == 0 and "WARNING" in err and "| dynamic |" in stdout
