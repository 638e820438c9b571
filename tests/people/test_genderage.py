"""Gender and age from an InsightFace pack's genderage.onnx: a synthetic model of the same interface (no real file is
shipped) whose answer is a known function of the crop, checked against a crop made independently (skimage)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from facetrain.people.annotate import photo_records
from facetrain.people.library import Library
from facetrain.people.scan import scan

pytestmark = pytest.mark.realdata

SIZE = 96


def _synthetic_genderage(path: Path) -> None:
    """(1, 3, 96, 96) -> (1, 3): [mean R, mean B, mean G + 1] of the normalized input, i.e. "man" when the crop is
    bluer than red, age = 100 * (mean G + 1)."""
    import onnx
    from onnx import TensorProto, helper

    mix = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], np.float32)  # rows: input channel, cols: output
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["data", "axes"], ["pooled"], keepdims=0, name="pool"),
            helper.make_node("MatMul", ["pooled", "mix"], ["mixed"], name="mix_channels"),
            helper.make_node("Add", ["mixed", "shift"], ["fc1"], name="shift_age"),
        ],
        "genderage",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("mix", TensorProto.FLOAT, [3, 3], mix.ravel().tolist()),
            helper.make_tensor("shift", TensorProto.FLOAT, [3], [0.0, 0.0, 1.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _reference(image: np.ndarray, box) -> tuple[float, float, float]:
    """InsightFace attribute.py's crop (skimage similarity transforms), then the synthetic model in numpy."""
    import cv2
    from skimage import transform as trans

    x1, y1, x2, y2 = box
    scale = SIZE / (max(x2 - x1, y2 - y1) * 1.5)
    t = (
        trans.SimilarityTransform(scale=scale)
        + trans.SimilarityTransform(translation=(-(x1 + x2) / 2 * scale, -(y1 + y2) / 2 * scale))
        + trans.SimilarityTransform(translation=(SIZE / 2, SIZE / 2))
    )
    crop = cv2.warpAffine(image, t.params[:2], (SIZE, SIZE), borderValue=0.0)
    x = (crop.astype(np.float64) - 127.5) / 128.0
    r, g, b = x.mean(axis=(0, 1))
    return r, b, g + 1.0


def test_pack_genderage_gives_gender_and_age(tmp_path, assets_dir, sface):
    pack = tmp_path / "pack"
    pack.mkdir()
    shutil.copy(sface, pack / sface.name)
    _synthetic_genderage(pack / "genderage.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "faceapi_sample5.jpg", "grace_hopper.jpg"):
        shutil.copy(assets_dir / "images" / name, photos / name)
    yunet = assets_dir / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
    with Library.create(tmp_path / "lib.db", model=pack, detector=f"yunet:{yunet}") as lib:
        scan(lib, photos, progress=False)
        records = photo_records(lib)
    from facetrain.align import decode_image

    checked = 0
    for record in records:
        image = decode_image(Path(record["path"]).read_bytes(), source=record["path"])
        for face in record["faces"]:
            female, male, age = _reference(image, face["box"])
            assert face["age"] == pytest.approx(age * 100, abs=1.5)
            if abs(male - female) > 0.02:  # the box is stored to 0.1 px: skip near ties
                assert face["gender"] == ("man" if male > female else "woman")
                checked += 1
            assert f'a "{face["gender"]}" aged about {face["age"]}' in record["description"]
    assert checked >= 4


def test_genderage_of_the_wrong_shape_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from facetrain.errors import ModelError
    from facetrain.people.attributes import GenderAge

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "genderage.onnx"))
    with pytest.raises(ModelError, match="genderage.onnx is not an InsightFace genderage model"):
        GenderAge(tmp_path / "genderage.onnx")
