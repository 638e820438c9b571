"""decode_image / encode_image / read_image_file: channel order, bit depths, alpha, grayscale, errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facetrain.data.images import decode_image, encode_image, read_image_file
from facetrain.errors import DataError


def _rgb(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_roundtrip_is_exact_and_rgb_ordered():
    rgb = _rgb()
    rgb[0, 0] = (255, 0, 0)  # pure red in RGB
    out = decode_image(encode_image(rgb, ext=".png"), where="t")
    assert out.dtype == np.uint8 and out.shape == rgb.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)
    # Independent check of the channel order: OpenCV's own BGR decode, reversed.
    bgr = cv2.imdecode(np.frombuffer(encode_image(rgb, ext=".png"), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(out, bgr[:, :, ::-1])


def test_jpeg_decode_matches_bgr_decode_reversed():
    rgb = cv2.GaussianBlur(_rgb(112, 112), (0, 0), 3)
    data = encode_image(rgb, ext=".jpg", quality=95)
    out = decode_image(data, where="t")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(out, bgr[:, :, ::-1])
    assert np.abs(out.astype(int) - rgb).mean() < 3  # q95 on a smooth image is close to the source


def test_grayscale_png_and_jpeg_become_three_equal_channels():
    gray = _rgb()[:, :, 0]
    for ext in (".png", ".jpg"):
        ok, buf = cv2.imencode(ext, gray)
        out = decode_image(buf.tobytes(), where="t")
        assert out.shape == (*gray.shape, 3)
        np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
        np.testing.assert_array_equal(out[:, :, 1], out[:, :, 2])
        if ext == ".png":
            np.testing.assert_array_equal(out[:, :, 0], gray)


def test_alpha_is_dropped():
    rgb = _rgb()
    alpha = np.full(rgb.shape[:2], 7, np.uint8)
    bgra = np.dstack([rgb[:, :, ::-1], alpha])
    ok, buf = cv2.imencode(".png", bgra)
    np.testing.assert_array_equal(decode_image(buf, where="t"), rgb)


def test_16bit_png_scaled_to_8bit():
    rng = np.random.default_rng(1)
    bgr16 = rng.integers(0, 65536, (8, 9, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", bgr16)
    out = decode_image(buf.tobytes(), where="t")
    expected = np.rint(bgr16[:, :, ::-1].astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_other_formats_decode():
    rgb = _rgb()
    np.testing.assert_array_equal(decode_image(encode_image(rgb, ext=".bmp"), where="t"), rgb)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty payload"), (b"\xff\xd8\xff\xe0 not really a jpeg", "OpenCV rejected"), (b"hello", "OpenCV rejected")],
)
def test_undecodable_raises_one_line_with_where(data, reason):
    with pytest.raises(DataError) as info:
        decode_image(data, where="train.rec record 17 at offset 1234")
    msg = str(info.value)
    assert msg.startswith("train.rec record 17 at offset 1234: cannot decode image (")
    assert reason in msg and "\n" not in msg


def test_jpeg_cut_inside_its_header_raises():
    data = encode_image(_rgb(64, 64), ext=".jpg")
    with pytest.raises(DataError):
        decode_image(data[:20], where="x")


def test_encode_rejects_bad_arrays():
    with pytest.raises(DataError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(DataError, match="shape"):
        encode_image(np.zeros((4, 4, 4), np.uint8))


def test_read_image_file(tmp_path):
    rgb = _rgb()
    path = tmp_path / "a.png"
    path.write_bytes(encode_image(rgb, ext=".png"))
    np.testing.assert_array_equal(read_image_file(path), rgb)
    with pytest.raises(DataError, match="cannot read image file"):
        read_image_file(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image"):
        read_image_file(tmp_path / "bad.jpg")


@pytest.mark.realdata
def test_real_photos_decode(assets_dir):
    img = read_image_file(assets_dir / "images" / "grace_hopper.jpg")
    assert img.shape == (600, 512, 3) and img.dtype == np.uint8
    crop = next(iter(sorted((assets_dir / "aligned112").rglob("*.png"))))
    face = read_image_file(crop)
    assert face.shape == (112, 112, 3)
