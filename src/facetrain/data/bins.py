"""Verification ``.bin`` files (LFW, CFP-FP, AgeDB-30, ...): read safely, write compatibly.

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of 2P encoded images (JPEG/PNG bytes; pair ``i``
is images ``2i`` and ``2i + 1``), ``issame`` a list of P bools. The published files were written by Python 2, so the
images are py2 ``str`` objects (loaded here as ``bytes``); files written by Python 3 scripts hold ``bytes`` (pickled
with ``_codecs.encode`` under protocol 2) or numpy uint8 arrays.

Loading never executes pickle code: :class:`_BinUnpickler` admits only the few globals those files need
(``_codecs.encode``, numpy's ``_reconstruct``/``scalar``/``ndarray``/``dtype``) and refuses everything else with a
DataError naming the file and the refused global.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from facetrain.data.images import decode_image, encode_image
from facetrain.errors import DataError

__all__ = ["iter_bin_pairs", "load_bin_encoded", "read_bin", "write_bin"]


def read_bin(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """Read a verification ``.bin`` and decode its images.

    Returns:
        ``(images, issame)``: 2P (H, W, 3) uint8 RGB arrays and a (P,) bool array; pair ``i`` is images ``2i``,
        ``2i + 1``.

    Raises:
        DataError: unreadable, malicious or malformed file, or an undecodable image (naming the file and image).
    """
    encoded, issame = load_bin_encoded(path)
    images = [decode_image(data, where=f"{path} image {i}") for i, data in enumerate(encoded)]
    return images, issame


def load_bin_encoded(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read a verification ``.bin`` without decoding the images.

    Returns:
        ``(encoded, issame)``: 2P image byte strings and a (P,) bool array.

    Raises:
        DataError: missing, truncated, malicious or malformed file (naming the file).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read verification bin ({exc.strerror or exc})") from exc
    try:
        obj = _BinUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except _PICKLE_ERRORS as exc:
        what = "truncated" if isinstance(exc, EOFError) else "not a valid pickle"
        detail = " ".join(str(exc).split())[:200]
        raise DataError(
            f"{path}: {what} ({type(exc).__name__}: {detail}); a verification .bin is a pickle of (images, issame)"
        ) from None
    return _validate(obj, path)


def iter_bin_pairs(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
    """Yield ``(rgb1, rgb2, issame)`` per pair, decoding lazily (bounded memory for large sets)."""
    encoded, issame = load_bin_encoded(path)
    for i, same in enumerate(issame.tolist()):
        a = decode_image(encoded[2 * i], where=f"{path} image {2 * i}")
        b = decode_image(encoded[2 * i + 1], where=f"{path} image {2 * i + 1}")
        yield a, b, bool(same)


def write_bin(
    path: str | os.PathLike,
    images: Sequence[bytes | np.ndarray],
    issame: Sequence[bool] | np.ndarray,
    *,
    ext: str = ".jpg",
    quality: int = 95,
) -> None:
    """Write a verification ``.bin`` readable by facetrain, arcface_torch (whose loader unpickles it with
    ``encoding='bytes'``), Python 2 and MXNet-era scripts.

    The pickle is written as Python 2 would (protocol 2, images as py2 ``str`` opcodes, which Python 3 reads as
    ``bytes``), atomically (temp name + rename).

    Args:
        path: the ``.bin`` to write.
        images: 2P images: encoded bytes (kept as they are) or (H, W, 3) uint8 RGB arrays (encoded with ``ext``).
        issame: P bools; pair ``i`` is images ``2i`` and ``2i + 1``.
        ext: encoding of array images, ``".jpg"`` (default, quality ``quality``) or ``".png"``.
        quality: JPEG quality.

    Raises:
        DataError: odd image count, ``issame`` of the wrong length, or an image that is neither bytes nor an array.
    """
    path = Path(path)
    flags = np.asarray(issame).reshape(-1)
    if len(images) % 2:
        raise DataError(f"{path}: {len(images)} images is odd; a .bin holds pairs (images 2i and 2i+1)")
    if flags.size != len(images) // 2:
        raise DataError(f"{path}: issame has {flags.size} entries for {len(images) // 2} pairs; give one per pair")
    encoded = []
    for i, img in enumerate(images):
        if isinstance(img, (bytes, bytearray, memoryview)):
            data = bytes(img)
            if not data:
                raise DataError(f"{path}: image {i} is empty")
        elif isinstance(img, np.ndarray):
            data = encode_image(img, ext=ext, quality=quality)
        else:
            raise DataError(f"{path}: image {i} is a {type(img).__name__}; give encoded bytes or a uint8 RGB array")
        encoded.append(data)
    blob = _py2_pickle(encoded, [bool(f) for f in flags.tolist()])
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write verification bin ({exc.strerror or exc})") from exc


# ----------------------------------------------------------------------------------------------------------------------
# Restricted unpickler
# ----------------------------------------------------------------------------------------------------------------------


_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
    MemoryError,
    UnicodeDecodeError,
    OverflowError,
    RecursionError,
)


def _numpy_global(name: str):
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    return getattr(core.multiarray, name)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` restricted to str -> bytes (how Python 3 pickles bytes under protocol 2)."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or not isinstance(errors, str):
        raise pickle.UnpicklingError("_codecs.encode called with unexpected argument types")
    return obj.encode(encoding, errors)


_ALLOWED = {
    ("_codecs", "encode"): lambda: _codecs_encode,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals verification bins need; py2 ``str`` is loaded as ``bytes``."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise DataError(
                f"{self._path}: refused to load global '{module}.{name}' (a verification .bin needs only images and "
                "bools; this file may be malicious or not a .bin)"
            )
        return factory()

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refused persistent id in pickle; not a verification .bin")


def _validate(obj, path: Path) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(
            f"{path}: pickle holds a {type(obj).__name__}, expected a pair (images, issame); not a verification .bin"
        )
    images, issame = obj
    if not isinstance(images, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: images is a {type(images).__name__}, expected a list of encoded images")
    encoded = []
    for i, img in enumerate(images):
        if isinstance(img, (bytes, bytearray)):
            encoded.append(bytes(img))
        elif isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 1:
            encoded.append(img.tobytes())
        elif isinstance(img, str):  # py2 str loaded without encoding="bytes" would land here; never expected
            encoded.append(img.encode("latin-1"))
        else:
            shape = f" {img.dtype}{img.shape}" if isinstance(img, np.ndarray) else ""
            raise DataError(f"{path}: image {i} is a {type(img).__name__}{shape}, expected encoded bytes")
    if len(encoded) % 2:
        raise DataError(f"{path}: {len(encoded)} images is odd; pairs are images 2i and 2i+1")
    try:
        flags = np.asarray(issame)
    except Exception as exc:
        raise DataError(f"{path}: issame is not a list of bools ({exc})") from None
    if flags.ndim != 1 or not (flags.dtype == np.bool_ or np.issubdtype(flags.dtype, np.integer)):
        raise DataError(f"{path}: issame is {flags.dtype}{flags.shape}, expected a list of bools")
    if flags.dtype != np.bool_:
        if not np.isin(flags, (0, 1)).all():
            raise DataError(f"{path}: issame holds values other than 0/1/True/False")
        flags = flags.astype(bool)
    if flags.size != len(encoded) // 2:
        raise DataError(f"{path}: issame has {flags.size} entries for {len(encoded) // 2} image pairs")
    return encoded, flags


# ----------------------------------------------------------------------------------------------------------------------
# Writing as Python 2 did
# ----------------------------------------------------------------------------------------------------------------------


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Protocol-2 pickle of ``(list of str, list of bool)`` using py2 string opcodes (SHORT_BINSTRING/BINSTRING).

    Python 3's pickler would write ``bytes`` via ``_codecs.encode`` under protocol 2, which Python 2 cannot load
    as ``str``; these opcodes load as ``str`` in Python 2 and as ``bytes`` in Python 3 with ``encoding="bytes"``.
    """
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_LIST]
    for start in range(0, len(images), 1000):  # APPENDS in batches of 1000, as the pickler does
        out.append(pickle.MARK)
        for data in images[start : start + 1000]:
            if len(data) < 256:
                out.append(pickle.SHORT_BINSTRING + bytes([len(data)]))
            else:
                if len(data) >= 2**31:
                    raise DataError("an image of 2 GiB or more cannot be stored in a .bin")
                out.append(pickle.BINSTRING + struct.pack("<i", len(data)))
            out.append(data)
        out.append(pickle.APPENDS)
    out.append(pickle.EMPTY_LIST)
    for start in range(0, len(issame), 1000):
        out.append(pickle.MARK)
        out.extend(pickle.NEWTRUE if f else pickle.NEWFALSE for f in issame[start : start + 1000])
        out.append(pickle.APPENDS)
    out.append(pickle.TUPLE2 + pickle.STOP)
    return b"".join(out)
