"""facetrain.data: datasets (RecordIO, image folders, synthetic), verification bins, conversions.

Import-light on purpose: nothing here imports torch, and the readers are imported when first used.

:func:`open_dataset` is the one entry point training, evaluation and the CLI use to read a face dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from facetrain.errors import DataError

__all__ = ["open_dataset", "detect_format", "read_bin", "write_bin"]

_EXPECTED = (
    "expected a folder holding train.rec/train.idx (+ property), a .rec file, a folder of rec parts "
    "(part-00000.rec/.idx ...), or an image folder laid out as root/<identity>/<image>"
)


def detect_format(path: str | os.PathLike) -> str:
    """What kind of dataset ``path`` is, without reading any image.

    Returns:
        ``"rec"`` (``train.rec`` folder or a ``.rec`` file), ``"rec-parts"`` (folder of ``part-NNNNN.rec``),
        or ``"folder"`` (image-folder root).

    Raises:
        DataError: the path is missing, empty or none of the above.
    """
    from facetrain.data.folders import looks_like_image_folder

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; {_EXPECTED}")
    if p.is_file():
        if p.suffix == ".rec":
            return "rec"
        if p.suffix == ".bin":
            raise DataError(f"{p}: a verification .bin holds image pairs, not a training dataset; use read_bin")
        raise DataError(f"{p}: not a dataset file; {_EXPECTED}")
    if (p / "train.rec").is_file():
        return "rec"
    if (p / "part-00000.rec").is_file():
        return "rec-parts"
    if looks_like_image_folder(p):
        return "folder"
    if not any(True for e in os.scandir(p) if not e.name.startswith(".")):
        raise DataError(f"{p}: empty folder; {_EXPECTED}")
    recs = sorted(e.name for e in os.scandir(p) if e.name.endswith(".rec"))
    if len(recs) == 1:
        raise DataError(f"{p}: found {recs[0]} but no train.rec; pass the .rec file itself ({p / recs[0]})")
    raise DataError(f"{p}: not a dataset; {_EXPECTED}")


def open_dataset(path: str | os.PathLike, on_bad: str = "raise") -> Any:
    """Open a face-recognition training dataset.

    Args:
        path: a folder with ``train.rec``/``train.idx`` (+ optional ``property``), a ``.rec`` path, a folder of rec
            parts ``part-00000.rec/.idx ...`` (+ ``property``), or an image-folder root ``root/<identity>/<image>``.
        on_bad: ``"raise"`` or ``"skip"`` (skip undecodable records/files and list them in ``bad_records``).

    Returns:
        A dataset with ``__len__``, ``__getitem__(i) -> (uint8 (H, W, 3) RGB, int label)``, ``num_classes``,
        ``labels() -> (N,) int64`` and ``bad_records``.

    Raises:
        DataError: unknown, missing or empty path (the message says what was expected).
    """
    if on_bad not in ("raise", "skip"):
        raise DataError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    kind = detect_format(path)
    if kind == "folder":
        from facetrain.data.folders import ImageFolderDataset

        return ImageFolderDataset(path, on_bad=on_bad)
    from facetrain.data.recordio import RecordDataset

    return RecordDataset(path, on_bad=on_bad)


def read_bin(path: str | os.PathLike):
    """Read a verification ``.bin``: ``(list of (112, 112, 3) uint8 RGB, (P,) bool issame)``; see :mod:`.bins`."""
    from facetrain.data.bins import read_bin as _read_bin

    return _read_bin(path)


def write_bin(path: str | os.PathLike, images, issame) -> None:
    """Write a verification ``.bin`` (pair i = images 2i, 2i+1); see :mod:`.bins`."""
    from facetrain.data.bins import write_bin as _write_bin

    return _write_bin(path, images, issame)
