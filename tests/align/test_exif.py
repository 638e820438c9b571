"""Photo loading: EXIF orientation (checked against OpenCV's own imread), odd formats and broken files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facetrain.align.exif import apply_orientation, decode_image, exif_orientation, read_image
from facetrain.errors import DataError

PIL = pytest.importorskip("PIL.Image")


def _asymmetric_image() -> np.ndarray:
    image = np.zeros((48, 80, 3), dtype=np.uint8)
    image[:16, :24] = (255, 0, 0)  # red block top-left
    image[30:, 60:] = (0, 0, 255)  # blue block bottom-right
    image[:, 40:42] = (0, 255, 0)
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_opencv_imread(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = PIL.Exif()
    exif[0x0112] = orientation
    PIL.fromarray(_asymmetric_image()).save(path, exif=exif.tobytes(), quality=98)
    assert exif_orientation(path.read_bytes()) == orientation
    ours = read_image(path)
    # cv2.imread applies EXIF orientation itself: an independent implementation to compare with
    theirs = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs).max() <= 2


def test_orientation_in_png_exif_chunk(tmp_path):
    path = tmp_path / "rot.png"
    exif = PIL.Exif()
    exif[0x0112] = 6
    PIL.fromarray(_asymmetric_image()).save(path, exif=exif.tobytes())
    assert exif_orientation(path.read_bytes()) == 6
    np.testing.assert_array_equal(read_image(path), apply_orientation(_asymmetric_image(), 6))
    assert read_image(path).shape == (80, 48, 3)


def test_grey_16bit_rgba_and_cmyk_become_rgb_uint8(tmp_path):
    image = _asymmetric_image()
    PIL.fromarray(image).convert("L").save(tmp_path / "grey.png")
    PIL.fromarray(image).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    PIL.fromarray(image).convert("RGBA").save(tmp_path / "rgba.png")
    cv2.imwrite(str(tmp_path / "deep.png"), image[:, :, ::-1].astype(np.uint16) * 257)
    for name in ("grey.png", "cmyk.jpg", "rgba.png", "deep.png"):
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (48, 80, 3), name
        assert got[5, 5, 0] > 200 and got[5, 5, 2] < 60 or name == "grey.png", name  # red stays red
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), image)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), image)


def test_broken_files_raise_one_line_data_errors(tmp_path):
    good = tmp_path / "good.jpg"
    PIL.fromarray(_asymmetric_image()).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"this is not an image")
    for name, match in [
        ("cut.jpg", "truncated"),
        ("empty.jpg", "empty"),
        ("text.png", "cannot decode"),
        ("missing.jpg", "cannot read"),
    ]:
        with pytest.raises(DataError, match=match) as info:
            read_image(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    assert exif_orientation(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00garbage") == 1  # corrupt EXIF: upright
    assert decode_image(data).shape == (48, 80, 3)
