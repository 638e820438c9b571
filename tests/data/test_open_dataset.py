"""open_dataset: one entry point for rec folders, .rec files, rec parts and image folders; clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.data import detect_format, open_dataset
from facetrain.errors import DataError


def _folder_dataset(root: Path, counts: list[int], *, size: int = 12) -> list[tuple[np.ndarray, int]]:
    """root/id<k>/<j>.png with random pixels; returns the (rgb, label) written, in dataset order."""
    rng = np.random.default_rng(3)
    written = []
    for label, n in enumerate(counts):
        folder = root / f"id{label}"
        folder.mkdir(parents=True)
        for j in range(n):
            rgb = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
            assert ok
            (folder / f"{j}.png").write_bytes(buf.tobytes())
            written.append((rgb, label))
    return written


def _rec_dataset(out: Path, written: list[tuple[np.ndarray, int]], num_classes: int) -> None:
    from facetrain.data.recordio import write_rec_dataset

    samples = [(cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes(), label) for rgb, label in written]
    write_rec_dataset(out, samples, image_size=written[0][0].shape[:2], num_classes=num_classes)


def test_image_folder_is_opened_with_the_dataset_contract(tmp_path):
    written = _folder_dataset(tmp_path, [2, 3])
    ds = open_dataset(tmp_path)
    assert detect_format(tmp_path) == "folder"
    assert len(ds) == 5 and ds.num_classes == 2
    np.testing.assert_array_equal(ds.labels(), [label for _, label in written])
    for i, (rgb, label) in enumerate(written):
        got, got_label = ds[i]
        assert got.dtype == np.uint8 and got.shape == rgb.shape
        np.testing.assert_array_equal(got, rgb)
        assert got_label == label and isinstance(got_label, int)


def test_rec_folder_and_rec_file_give_the_same_dataset(tmp_path):
    written = _folder_dataset(tmp_path / "src", [3, 1, 2])
    _rec_dataset(tmp_path / "rec", written, num_classes=3)
    for path in (tmp_path / "rec", tmp_path / "rec" / "train.rec"):
        ds = open_dataset(path)
        assert detect_format(path) == "rec"
        assert len(ds) == 6 and ds.num_classes == 3
        np.testing.assert_array_equal(np.asarray(ds.labels(), dtype=np.int64), [lab for _, lab in written])
        for i, (rgb, label) in enumerate(written):
            got, got_label = ds[i]
            np.testing.assert_array_equal(got, rgb)
            assert int(got_label) == label


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: p, "empty folder"),
        (lambda p: _touch(p / "notes.txt"), "not a dataset file"),
        (lambda p: _touch(p / "lfw.bin"), "verification .bin"),
        (lambda p: _touch(p / "sub" / "readme.txt").parent.parent, "not a dataset"),
        (lambda p: _touch(p / "faces.rec").parent, r"faces\.rec but no train\.rec"),
    ],
)
def test_unknown_or_empty_paths_say_what_was_expected(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DataError, match=match) as info:
        open_dataset(path)
    assert "\n" not in str(info.value)


def test_on_bad_is_validated(tmp_path):
    _folder_dataset(tmp_path, [1])
    with pytest.raises(DataError, match="on_bad"):
        open_dataset(tmp_path, on_bad="ignore")
    assert open_dataset(tmp_path, on_bad="skip").on_bad == "skip"


def test_data_package_import_does_not_import_torch():
    code = "import sys, facetrain.data, facetrain.data.folders, facetrain.data.convert;print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path
