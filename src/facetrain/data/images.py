"""Image decoding and encoding helpers: every reader hands out HxWx3 uint8 RGB.

OpenCV works in BGR; these helpers are the one place where the channel order is converted, so the rest of facetrain
only ever sees RGB. EXIF orientation is deliberately ignored (aligned faces have none; photo alignment handles it).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import DataError

__all__ = ["decode_image", "decode_or_reason", "encode_image", "read_image_file"]

_JPEG_SOI = b"\xff\xd8"
# JPEG cannot carry alpha or 16-bit samples, so it can take the direct-to-RGB fast path (no extra cvtColor copy).
_JPEG_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, *, where: str) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG or any format OpenCV reads) to RGB.

    Grayscale becomes 3 identical channels, an alpha channel is dropped, 16-bit samples are scaled to 8 bits
    (``x * 255 / 65535``, rounded) and float images (e.g. EXR) are taken as 0..1 and scaled to 0..255.

    Args:
        data: the encoded bytes, or a 1-D uint8 array holding them.
        where: where the bytes came from, for the error message, e.g. ``"train.rec record 17 at offset 1234"``.

    Returns:
        (H, W, 3) uint8 RGB array, C-contiguous.

    Raises:
        DataError: empty or undecodable data, naming ``where``.
    """
    img, reason = decode_or_reason(data)
    if img is None:
        raise DataError(f"{where}: cannot decode image ({reason}); re-create this record/file from its source image")
    return img


def decode_or_reason(data: bytes | bytearray | memoryview | np.ndarray) -> tuple[np.ndarray | None, str]:
    """:func:`decode_image` without the exception: ``(rgb, "")`` or ``(None, why it failed)``.

    Hot loops (dataset readers) use this so that the error location string is only built on failure.
    """
    if isinstance(data, np.ndarray):
        buf = data.reshape(-1)
        if buf.dtype != np.uint8:
            return None, f"buffer dtype {buf.dtype}, expected uint8 bytes"
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return None, "empty payload"
    if buf.size >= 2 and buf[0] == 0xFF and buf[1] == 0xD8:
        img = cv2.imdecode(buf, _JPEG_FLAGS)
        if img is not None:
            return img, ""
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        return None, f"OpenCV rejected {buf.size} bytes starting {bytes(buf[:8]).hex()}: truncated or not an image"
    return _to_rgb8(img)


def encode_image(rgb: np.ndarray, *, ext: str = ".jpg", quality: int = 95) -> bytes:
    """Encode an RGB image.

    Args:
        rgb: (H, W, 3) uint8 RGB (or (H, W) grayscale) image.
        ext: file extension naming the format, e.g. ``".jpg"`` or ``".png"``.
        quality: JPEG quality 0..100 (ignored by other formats).

    Returns:
        The encoded bytes.

    Raises:
        DataError: the array is not an 8-bit image or OpenCV cannot encode it.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise DataError(f"encode_image: expected (H, W, 3) uint8 RGB, got shape {arr.shape} dtype {arr.dtype}")
    bgr = arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ext = ext if ext.startswith(".") else "." + ext
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext.lower() in (".jpg", ".jpeg") else []
    try:
        ok, buf = cv2.imencode(ext, bgr, params)
    except cv2.error as exc:
        raise DataError(f"encode_image: OpenCV cannot encode '{ext}' ({str(exc).strip().splitlines()[-1]})") from exc
    if not ok:
        raise DataError(f"encode_image: OpenCV cannot encode '{ext}'; use .jpg or .png")
    return buf.tobytes()


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (no EXIF rotation).

    Raises:
        DataError: the file is missing, unreadable or not an image.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file ({exc.strerror or exc})") from exc
    return decode_image(data, where=str(path))


def _to_rgb8(img: np.ndarray) -> tuple[np.ndarray | None, str]:
    """OpenCV's IMREAD_UNCHANGED output (gray, BGR, BGRA; 8/16-bit or float) -> (H, W, 3) uint8 RGB, or a reason."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        return None, f"unsupported sample type {img.dtype}"
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2RGB), ""
    channels = img.shape[2]
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), ""
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB), ""
    return None, f"{channels} channels; expected 1, 3 or 4"
