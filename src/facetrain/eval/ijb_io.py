"""IJB-B / IJB-C files: the meta lists, the 1:N csv lists, aligned image embedding, saved image features.

See :mod:`facetrain.eval.ijb` for the layout and the protocol. Every parse error names the file and line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facetrain.errors import EvalError
from facetrain.fileio import atomic_path

if TYPE_CHECKING:
    from facetrain.embed import BaseEmbedder

TARGETS = ("IJBB", "IJBC")


@dataclass
class IJBMeta:
    """The parsed meta files; image arrays are in the file order (row i of the features = image i)."""

    target: str
    names: list[str]
    templates: np.ndarray  # (n,) int64
    medias: np.ndarray  # (n,) int64
    landmarks: np.ndarray  # (n, 5, 2) float32
    faceness: np.ndarray  # (n,) float32
    pair_t1: np.ndarray  # (P,) int64
    pair_t2: np.ndarray  # (P,) int64
    pair_label: np.ndarray  # (P,) bool
    meta_dir: Path | None = None


def read_1n_list(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(unique template ids, their subject ids) from a 1:N csv (header line, then TEMPLATE_ID,SUBJECT_ID,...)."""
    templates: dict[int, int] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 or not line.strip():
                continue
            parts = line.split(",")
            try:
                t, s = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise EvalError(
                    f"{path} line {lineno}: expected TEMPLATE_ID,SUBJECT_ID,..., got {line.strip()!r}"
                ) from None
            if templates.setdefault(t, s) != s:
                raise EvalError(f"{path} line {lineno}: template {t} listed with two subjects")
    ids = np.fromiter(templates.keys(), np.int64, len(templates))
    subjects = np.fromiter(templates.values(), np.int64, len(templates))
    return ids, subjects


# --------------------------------------------------------------------------------------------------------------------
# meta files


def read_ijb_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Parse the three 1:1 meta files of ``root/meta`` (errors name the file and line)."""
    target = normalize_target(target)
    meta_dir = Path(root) / "meta"
    prefix = target.lower()
    tid_path = meta_dir / f"{prefix}_face_tid_mid.txt"
    pts_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    pair_path = meta_dir / f"{prefix}_template_pair_label.txt"
    for path in (tid_path, pts_path, pair_path):
        if not path.is_file():
            raise EvalError(f"IJB meta file not found: {path} (expected the {target} layout: meta/, loose_crop/)")
    names, templates, medias = [], [], []
    for lineno, parts in _lines(tid_path):
        if len(parts) < 3:
            raise EvalError(f"{tid_path} line {lineno}: expected 'image template_id media_id', got {' '.join(parts)!r}")
        try:
            templates.append(int(parts[1]))
            medias.append(int(parts[2]))
        except ValueError:
            raise EvalError(f"{tid_path} line {lineno}: template and media ids must be integers") from None
        names.append(parts[0])
    landmarks = np.empty((len(names), 10), np.float32)
    faceness = np.empty(len(names), np.float32)
    count = 0
    for lineno, parts in _lines(pts_path):
        if len(parts) != 12:
            raise EvalError(
                f"{pts_path} line {lineno}: expected 'image x1 y1 ... x5 y5 score' (12 fields), got {len(parts)}"
            )
        if count >= len(names):
            raise EvalError(f"{pts_path} line {lineno}: more images than the {len(names)} lines of {tid_path.name}")
        if parts[0] != names[count]:
            raise EvalError(
                f"{pts_path} line {lineno}: image {parts[0]!r} but {tid_path.name} line {count + 1} has "
                f"{names[count]!r}; both files must list the images in the same order"
            )
        try:
            landmarks[count] = [float(x) for x in parts[1:11]]
            faceness[count] = float(parts[11])
        except ValueError:
            raise EvalError(f"{pts_path} line {lineno}: landmarks and score must be numbers") from None
        count += 1
    if count != len(names):
        raise EvalError(f"{pts_path} has {count} images but {tid_path.name} has {len(names)}")
    pairs = _read_int_table(pair_path, 3)
    return IJBMeta(
        target=target,
        names=names,
        templates=np.asarray(templates, np.int64),
        medias=np.asarray(medias, np.int64),
        landmarks=landmarks.reshape(-1, 5, 2),
        faceness=faceness,
        pair_t1=pairs[:, 0],
        pair_t2=pairs[:, 1],
        pair_label=pairs[:, 2].astype(bool),
        meta_dir=meta_dir,
    )


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if parts:
                yield lineno, parts


def _read_int_table(path: Path, columns: int) -> np.ndarray:
    """(rows, columns) int64 of a whitespace-separated integer file (millions of lines: parsed in C).

    On any irregularity a line-by-line pass names the first bad line.
    """
    import warnings

    data = path.read_bytes()
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = np.fromstring(data, dtype=np.int64, sep=" ")
        except ValueError:
            values = np.zeros(0, np.int64)
    if values.size == columns * n_lines and b"." not in data:
        return values.reshape(-1, columns)
    rows = []
    for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != columns or not all(_is_int(p) for p in parts):
            raise EvalError(f"{path} line {lineno}: expected {columns} integers, got {line.strip()!r}")
        rows.append([int(p) for p in parts])
    return np.asarray(rows, np.int64).reshape(-1, columns)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def normalize_target(target: str) -> str:
    key = target.upper().replace("-", "")
    if key not in TARGETS:
        raise EvalError(f"IJB target must be one of {', '.join(TARGETS)}, got {target!r}")
    return key


# --------------------------------------------------------------------------------------------------------------------
# embedding images and saved features


def embed_ijb_images(
    embedder: BaseEmbedder, root: str | os.PathLike, meta: IJBMeta, *, chunk: int | None = None, progress: bool = False
) -> np.ndarray:
    """(n, 2D) float32 [f(x), f(flip x)] of every meta image, aligned by its landmarks (decoding overlaps the model)."""
    from tqdm import tqdm

    image_dir = Path(root) / "loose_crop"
    chunk = int(chunk or embedder.batch_size * 4)
    n = len(meta.names)
    out = np.empty((n, 2 * embedder.embedding_size), np.float32)
    bar = tqdm(total=n, desc=f"{meta.target} images", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        starts = list(range(0, n, chunk))
        pending = pool.submit(_aligned_chunk, image_dir, meta, 0, min(chunk, n)) if n else None
        for i, lo in enumerate(starts):
            faces = pending.result()
            hi = min(lo + chunk, n)
            if i + 1 < len(starts):
                pending = pool.submit(_aligned_chunk, image_dir, meta, hi, min(hi + chunk, n))
            a, b = embedder.embed_flip(faces)
            out[lo:hi, : a.shape[1]] = a
            out[lo:hi, a.shape[1] :] = b
            bar.update(hi - lo)
    bar.close()
    return out


def _aligned_chunk(image_dir: Path, meta: IJBMeta, lo: int, hi: int) -> np.ndarray:
    import cv2

    from facetrain.align.template import norm_crop

    faces = np.empty((hi - lo, 112, 112, 3), np.uint8)
    pts_file = meta.meta_dir / f"{meta.target.lower()}_name_5pts_score.txt" if meta.meta_dir else "meta"
    for i in range(lo, hi):
        path = image_dir / meta.names[i]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise EvalError(f"IJB image {path} (listed in {pts_file} line {i + 1}) is missing or unreadable")
        faces[i - lo] = cv2.cvtColor(norm_crop(bgr, meta.landmarks[i], 112), cv2.COLOR_BGR2RGB)
    return faces


def save_image_features(path: str | os.PathLike, img_feats: np.ndarray, meta: IJBMeta) -> None:
    """Save (n, 2D) image features with the image names and faceness scores (``.npz``, atomic)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, img_feats=img_feats, names=np.asarray(meta.names), faceness_scores=meta.faceness)


def load_features(path: str | os.PathLike, meta: IJBMeta) -> np.ndarray:
    """Image features from ``save_image_features`` (.npz) or a plain (n, 2D) ``.npy`` in meta order."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"features file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise EvalError(f"{path}: not a .npz/.npy features file ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        feats = loaded
    else:
        with loaded:
            if "img_feats" not in loaded:
                raise EvalError(f"{path}: no 'img_feats' array (saved by --save-features?)")
            feats = loaded["img_feats"]
            if "names" in loaded:
                names = loaded["names"]
                if len(names) != len(meta.names) or any(a != b for a, b in zip(names[:1000], meta.names[:1000])):
                    raise EvalError(f"{path}: its images are not the {len(meta.names)} images of the meta files")
    if feats.ndim != 2 or feats.shape[0] != len(meta.names):
        raise EvalError(f"{path}: features of shape {feats.shape}, expected ({len(meta.names)}, 2D)")
    return np.asarray(feats, np.float32)
