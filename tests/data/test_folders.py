"""ImageFolderDataset: deterministic labels, layout errors, bad files with raise/skip, label map."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.data.folders import ImageFolderDataset
from facetrain.errors import DataError


def _write_image(path: Path, seed: int, *, size: int = 16) -> np.ndarray:
    """A small random RGB image written losslessly (PNG) or as JPEG by extension; returns the RGB written."""
    rgb = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix if path.suffix.lower() != ".jpeg" else ".jpg", rgb[:, :, ::-1])
    assert ok
    path.write_bytes(buf.tobytes())
    return rgb


def _make_tree(root: Path, layout: dict[str, list[str]]) -> None:
    for k, (identity, files) in enumerate(layout.items()):
        (root / identity).mkdir(parents=True, exist_ok=True)
        for j, name in enumerate(files):
            _write_image(root / identity / name, seed=100 * k + j)


def test_labels_follow_sorted_identity_names_and_images_are_sorted(tmp_path):
    _make_tree(tmp_path, {"zoe": ["b.png", "a.PNG"], "adam": ["x.jpg"], "Mia": ["2.bmp", "10.jpeg", "1.webp"]})
    ds = ImageFolderDataset(tmp_path)
    # Python string order: uppercase before lowercase.
    assert ds.label_map == {"Mia": 0, "adam": 1, "zoe": 2}
    assert ds.num_classes == 3
    names = [(Path(p).parent.name, Path(p).name) for p, _ in ds.samples]
    assert names == [
        ("Mia", "1.webp"),
        ("Mia", "10.jpeg"),
        ("Mia", "2.bmp"),
        ("adam", "x.jpg"),
        ("zoe", "a.PNG"),
        ("zoe", "b.png"),
    ]
    np.testing.assert_array_equal(ds.labels(), [0, 0, 0, 1, 2, 2])
    assert ds.labels().dtype == np.int64
    # Deterministic: a second scan gives the same mapping.
    assert ImageFolderDataset(tmp_path).samples == ds.samples


def test_getitem_returns_rgb_uint8_matching_the_written_pixels(tmp_path):
    written = _write_image(tmp_path / "a" / "0.png", seed=7)
    ds = ImageFolderDataset(tmp_path)
    rgb, label = ds[0]
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb, written)  # PNG is lossless and channel order is RGB
    assert label == 0
    assert ds.read_bytes(0) == (tmp_path / "a" / "0.png").read_bytes()
    with pytest.raises(IndexError):
        ds[1]


def test_empty_identity_folder_is_skipped_with_a_warning_and_gets_no_label(tmp_path, caplog):
    _make_tree(tmp_path, {"a": ["0.png"], "b": [], "c": ["0.png"]})
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path)
    assert ds.label_map == {"a": 0, "c": 1}  # no hole at "b"
    assert ds.skipped_identities == ["b"]
    assert any("no images" in r.message for r in caplog.records)


def test_image_directly_in_root_is_a_clear_error(tmp_path):
    _make_tree(tmp_path, {"a": ["0.png"]})
    _write_image(tmp_path / "stray.jpg", seed=1)
    with pytest.raises(DataError, match=r"stray\.jpg.*directly in the dataset root"):
        ImageFolderDataset(tmp_path)


def test_nested_folder_inside_identity_is_a_clear_error(tmp_path):
    _make_tree(tmp_path, {"a": ["0.png"]})
    _write_image(tmp_path / "a" / "deeper" / "1.png", seed=1)
    with pytest.raises(DataError, match=r"deeper.*folder inside an identity folder"):
        ImageFolderDataset(tmp_path)


def test_empty_dataset_and_missing_root(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images found"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderDataset(tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [("empty.jpg", b"", "zero-byte"), ("notes.txt", b"hello", "not an image file")],
)
def test_zero_byte_and_non_image_files_raise_or_are_skipped(tmp_path, name, content, reason):
    _make_tree(tmp_path, {"a": ["0.png", "1.png"]})
    (tmp_path / "a" / name).write_bytes(content)
    with pytest.raises(DataError, match=reason) as info:
        ImageFolderDataset(tmp_path)
    assert name in str(info.value) and "\n" not in str(info.value)
    ds = ImageFolderDataset(tmp_path, on_bad="skip")
    assert len(ds) == 2
    assert [Path(b.where).name for b in ds.bad_records] == [name]
    assert reason in ds.bad_records[0].reason


def test_undecodable_image_raises_on_read_or_is_replaced_and_reported(tmp_path):
    _make_tree(tmp_path, {"a": ["0.png", "2.png"]})
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3  # found only when read
    with pytest.raises(DataError, match=r"1\.png"):
        ds[1]
    ds = ImageFolderDataset(tmp_path, on_bad="skip")
    rgb, label = ds[1]
    np.testing.assert_array_equal(rgb, ds[2][0])  # the next good sample stands in
    assert [Path(b.where).name for b in ds.bad_records] == ["1.png"]


def test_hidden_files_and_root_side_files_are_ignored(tmp_path):
    _make_tree(tmp_path, {"a": ["0.png"]})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "label_map.json").write_text("{}")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 1 and ds.bad_records == []


def test_save_label_map_writes_json_atomically(tmp_path):
    root = tmp_path / "root"
    _make_tree(root, {"bob": ["0.png"], "al": ["0.png"]})
    ds = ImageFolderDataset(root)
    out = tmp_path / "labels.json"
    ds.save_label_map(out)
    assert json.loads(out.read_text()) == {"al": 0, "bob": 1}
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


@pytest.mark.realdata
def test_reads_the_aligned_asset_folder(assets_dir):
    ds = ImageFolderDataset(assets_dir / "aligned112")
    assert ds.label_map == {"barack_obama": 0, "eileen_collins": 1, "grace_hopper": 2, "joe_biden": 3, "unlabeled": 4}
    assert len(ds) == 28
    rgb, label = ds[0]
    assert rgb.shape == (112, 112, 3) and label == 0
