"""Image-folder datasets: ``root/<identity>/<image>``.

Identities are the sorted names of the sub-folders of ``root`` and get labels ``0..C-1`` in that order; images inside an
identity folder are sorted by name. The mapping is therefore a pure function of the file names, identical on every
rank and every run.

Decisions about odd input (each reported in one line naming the path):

* an identity folder with no image in it is **skipped with a warning and gets no label** (labels stay contiguous,
  ``0..C-1`` over the non-empty identities; :attr:`ImageFolderDataset.skipped_identities` lists the skipped names);
* an image file directly in ``root`` or a folder inside an identity folder is an error (the layout is not
  ``root/<identity>/<image>``);
* a zero-byte file or a file without an image extension inside an identity folder is a bad record: ``DataError``
  with ``on_bad="raise"``, or skipped and listed in :attr:`ImageFolderDataset.bad_records` with ``on_bad="skip"``;
* a file that does not decode is found only when it is read: ``DataError`` with ``on_bad="raise"``; with
  ``on_bad="skip"`` the next good sample is returned instead and the file is added to ``bad_records``;
* hidden entries (names starting with ``.``, e.g. ``.DS_Store``) are ignored everywhere; other non-image files in
  ``root`` (``label_map.json``, ``README``) are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class BadRecord:
    """One record/file that could not be used.

    Attributes:
        where: the file path (folders) or ``"<rec path> key K offset O"`` (RecordIO).
        reason: why, in a few words.
    """

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def is_image_name(name: str) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def looks_like_image_folder(root: str | os.PathLike) -> bool:
    """Cheap test used by ``open_dataset``: some visible sub-folder of ``root`` holds an image file."""
    root = Path(root)
    if not root.is_dir():
        return False
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        for sub in os.scandir(entry.path):
            if sub.is_file() and is_image_name(sub.name):
                return True
    return False


class ImageFolderDataset:
    """A face dataset laid out as ``root/<identity>/<image>``.

    ``dataset[i]`` is ``(rgb, label)`` with ``rgb`` a ``(H, W, 3)`` uint8 RGB array and ``label`` an int in
    ``0..num_classes-1``. Decoding happens in ``__getitem__`` (so in DataLoader workers); construction only lists files.

    Args:
        root: the dataset root.
        on_bad: ``"raise"`` (default) raises :class:`DataError` at the first bad file; ``"skip"`` leaves bad files out
            and lists them in :attr:`bad_records`.

    Attributes:
        root: the root folder.
        samples: ``[(path, label), ...]`` in label order, then file-name order.
        label_map: identity folder name -> label.
        skipped_identities: identity folders without any image (no label given).
        bad_records: :class:`BadRecord` entries for files left out (``on_bad="skip"`` only).
    """

    def __init__(self, root: str | os.PathLike, *, on_bad: str = "raise") -> None:
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.root = Path(root)
        self.on_bad = on_bad
        self.bad_records: list[BadRecord] = []
        self.skipped_identities: list[str] = []
        self.label_map: dict[str, int] = {}
        self.samples: list[tuple[str, int]] = []
        self._scan()

    # -- public surface -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.root}")
        index %= n
        for attempt in range(n):
            path, label = self.samples[(index + attempt) % n]
            try:
                return decode_image_bytes(_read_file(path), where=path), label
            except DataError as exc:
                if self.on_bad == "raise":
                    raise
                self._report_bad(path, str(exc))
        raise DataError(f"{self.root}: no image in the dataset decodes; check the files with: facetrain data verify")

    @property
    def num_classes(self) -> int:
        """Number of identities that have at least one image."""
        return len(self.label_map)

    def labels(self) -> np.ndarray:
        """Labels of all samples, ``(N,)`` int64, without decoding any image."""
        return np.fromiter((label for _, label in self.samples), dtype=np.int64, count=len(self.samples))

    def read_bytes(self, index: int) -> bytes:
        """The encoded bytes of sample ``index`` exactly as stored on disk (no decode, no re-encode)."""
        return _read_file(self.samples[index][0])

    def where(self, index: int) -> str:
        """Human-readable location of sample ``index`` (its path), for error reports."""
        return self.samples[index][0]

    @property
    def identity_names(self) -> list[str]:
        """Identity names indexed by label."""
        return sorted(self.label_map, key=self.label_map.__getitem__)

    def save_label_map(self, path: str | os.PathLike) -> None:
        """Write :attr:`label_map` as JSON (``{"name": label, ...}``), atomically (temp name + rename)."""
        write_json_atomic(path, self.label_map)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, images={len(self)}, identities={self.num_classes})"

    # -- scanning -------------------------------------------------------------------------------------------------

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: not a folder; expected an image-folder root laid out as root/<identity>/<image>"
            )
        identity_dirs = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                identity_dirs.append(entry)
            elif is_image_name(entry.name):
                raise DataError(
                    f"{entry.path}: image file directly in the dataset root; move it into an identity folder "
                    "(layout root/<identity>/<image>)"
                )
        for entry in identity_dirs:
            files = self._scan_identity(Path(entry.path))
            if not files:
                log.warning("%s: identity folder has no images; skipped (it gets no label)", entry.path)
                self.skipped_identities.append(entry.name)
                continue
            label = len(self.label_map)
            self.label_map[entry.name] = label
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise DataError(
                f"{self.root}: no images found; expected root/<identity>/<image> with extensions "
                + "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            )
        if self.skipped_identities:
            skipped = len(self.skipped_identities)
            log.warning("%s: %d identity folder(s) without images were skipped", self.root, skipped)

    def _scan_identity(self, folder: Path) -> list[str]:
        files = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                raise DataError(
                    f"{entry.path}: folder inside an identity folder; the layout must be root/<identity>/<image> "
                    "with no deeper folders (is the root one level too high?)"
                )
            if not is_image_name(entry.name):
                self._bad_or_raise(entry.path, f"not an image file (extension is not {'/'.join(IMAGE_EXTENSIONS)})")
                continue
            if entry.stat().st_size == 0:
                self._bad_or_raise(entry.path, "zero-byte file")
                continue
            files.append(entry.path)
        return files

    def _bad_or_raise(self, path: str, reason: str) -> None:
        if self.on_bad == "raise":
            raise DataError(f"{path}: {reason}; remove it or pass on_bad='skip' (--skip-bad)")
        self._report_bad(path, reason)

    def _report_bad(self, path: str, reason: str) -> None:
        if not any(b.where == path for b in self.bad_records):
            log.warning("skipping bad image %s: %s", path, reason)
            self.bad_records.append(BadRecord(path, reason))


# -- small shared helpers (used by convert.py too) -------------------------------------------------------------------


def decode_image_bytes(data: bytes, *, where: str) -> np.ndarray:
    """Decode encoded image bytes to ``(H, W, 3)`` uint8 RGB, or raise :class:`DataError` naming ``where``."""
    try:
        from facetrain.data.images import decode_image
    except ImportError:  # images.py not there yet: same contract with OpenCV
        decode_image = _decode_with_cv2
    return decode_image(data, where=where)


def _decode_with_cv2(data: bytes, *, where: str) -> np.ndarray:
    import cv2

    if not data:
        raise DataError(f"{where}: empty image data")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{where}: not a decodable image (jpg/png/bmp/webp expected)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
