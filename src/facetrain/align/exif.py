"""Photo loading for detection: any format OpenCV decodes -> (H, W, 3) uint8 RGB, EXIF orientation applied.

Decoding ignores OpenCV's own orientation handling (which differs between OpenCV versions and between ``imread``
and ``imdecode``) and applies the EXIF Orientation tag (0x0112) read here, so the result is the same everywhere.
Grey, 16-bit, RGBA and CMYK JPEG photos become 8-bit RGB; unreadable or truncated files raise a one-line
:class:`~facetrain.errors.DataError`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import DataError

ORIENTATION_TAG = 0x0112
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm", ".pbm")


def read_image(path: str | Path) -> np.ndarray:
    """Load a photo as (H, W, 3) uint8 RGB, upright according to its EXIF orientation.

    Raises:
        DataError: the file is missing, empty, truncated or not an image OpenCV can decode.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    return decode_image(data, source=str(path))


def decode_image(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB with the EXIF orientation applied (see :func:`read_image`)."""
    if not data:
        raise DataError(f"image {source} is empty (0 bytes)")
    if data[:2] == b"\xff\xd8" and _jpeg_truncated(data):
        raise DataError(f"image {source} is a truncated JPEG (no end-of-image marker); re-copy or re-export it")
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # 8-bit BGR for grey / 16-bit / RGBA / CMYK too
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        bgr = None
        detail = str(exc).strip().splitlines()[-1]
    else:
        detail = "not a supported image format, or a damaged file"
    if bgr is None or bgr.size == 0:
        raise DataError(f"cannot decode image {source}: {detail}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return apply_orientation(rgb, exif_orientation(data))


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation value (1..8) of JPEG / PNG (eXIf chunk) / TIFF / WebP bytes; 1 when absent or unreadable."""
    try:
        tiff = _find_exif_block(data)
        return _orientation_from_tiff(tiff) if tiff else 1
    except (struct.error, IndexError, ValueError):
        return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate / flip an image stored with EXIF ``orientation`` so that it displays upright.

    Orientation values (TIFF 6.0 / EXIF 2.3): 1 upright, 2 mirrored, 3 rotated 180, 4 flipped vertically,
    5 transposed, 6 needs 90 degrees clockwise, 7 transversed, 8 needs 90 degrees counter-clockwise.
    """
    if orientation == 2:
        return np.ascontiguousarray(image[:, ::-1])
    if orientation == 3:
        return np.ascontiguousarray(image[::-1, ::-1])
    if orientation == 4:
        return np.ascontiguousarray(image[::-1])
    if orientation == 5:
        return np.ascontiguousarray(image.swapaxes(0, 1))
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return np.ascontiguousarray(image.swapaxes(0, 1)[::-1, ::-1])
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def _jpeg_truncated(data: bytes) -> bool:
    """True when the JPEG has no end-of-image marker after its last start-of-scan (a cut-off download/copy)."""
    start_of_scan = data.rfind(b"\xff\xda")
    return start_of_scan < 0 or data.rfind(b"\xff\xd9") < start_of_scan


def _find_exif_block(data: bytes) -> bytes | None:
    """The TIFF-structured EXIF payload inside a JPEG, PNG, WebP or TIFF file, or None."""
    if data[:2] == b"\xff\xd8":  # JPEG: walk the marker segments up to the image data
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker in (0xDA, 0xD9):
                break
            if marker == 0x01 or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                pos += 1 if marker == 0xFF else 2
                continue
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            segment = data[pos + 4 : pos + 2 + length]
            if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
                return segment[6:]
            pos += 2 + length
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"eXIf":
                return data[pos + 8 : pos + 8 + length]
            if kind == b"IDAT" or kind == b"IEND":
                return None
            pos += 12 + length
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        pos = 12
        while pos + 8 <= len(data):
            kind, length = struct.unpack("<4sI", data[pos : pos + 8])
            if kind == b"EXIF":
                block = data[pos + 8 : pos + 8 + length]
                return block[6:] if block[:6] == b"Exif\x00\x00" else block
            pos += 8 + length + (length & 1)
        return None
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return data
    return None


def _orientation_from_tiff(tiff: bytes) -> int:
    endian = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if endian is None:
        return 1
    (ifd_offset,) = struct.unpack(endian + "I", tiff[4:8])
    (count,) = struct.unpack(endian + "H", tiff[ifd_offset : ifd_offset + 2])
    for k in range(count):
        entry = tiff[ifd_offset + 2 + 12 * k : ifd_offset + 14 + 12 * k]
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag == ORIENTATION_TAG:
            value = struct.unpack(endian + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
            return int(value) if 1 <= value <= 8 else 1
    return 1
