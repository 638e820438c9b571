"""Teacher embeddings for knowledge distillation (``facetrain distill-dataset``).

Writes ``FILE.npy`` of shape ``(N, D)`` in dataset index order (``open_dataset(path)[i]``), float32 or float16, and
the sidecar ``FILE.json`` = ``{"dataset", "num_images", "embedding_size", "teacher", "teacher_sha256", "flip",
"normalized"}`` that the trainer's ``loss.distill.embeddings`` reads. The array is filled through a ``.npy`` memmap
under a temporary name (only one batch of images in memory) and renamed when complete; the sidecar is written last.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from facetrain.clean.common import atomic_write_json, embed_dataset
from facetrain.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["write_teacher_embeddings", "read_teacher_embeddings", "sidecar_path"]


def sidecar_path(path: str | os.PathLike) -> Path:
    """``FILE.npy`` -> ``FILE.json``."""
    return Path(path).with_suffix(".json")


def write_teacher_embeddings(
    teacher: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fp16: bool = False,
    flip: bool = False,
    normalize: bool = True,
    batch_size: int = 256,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Embed every image of ``data`` with ``teacher`` and write the distillation file pair.

    Args:
        teacher: any model file :func:`facetrain.embed.load_embedder` opens.
        data: the training dataset (any path ``open_dataset`` accepts).
        out: ``FILE.npy``; the sidecar is ``FILE.json``.
        fp16: store float16 (half the size; cosine error ~1e-3).
        flip: ``f(x) + f(flip x)`` (before the normalization).
        normalize: L2-normalize the rows.
        batch_size, device: embedding.
        overwrite: replace existing files.
        progress: tqdm bar on a TTY.

    Returns:
        The sidecar dict.
    """
    from facetrain.data import open_dataset
    from facetrain.embed import load_embedder

    out = Path(out)
    if out.suffix != ".npy":
        raise DataError(f"{out}: the teacher embeddings file must end in .npy")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    dataset = open_dataset(data)
    if len(dataset) == 0:
        raise DataError(f"{data}: the dataset has no image")
    embedder = load_embedder(teacher, device=device, batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.npy")
    dtype = np.float16 if fp16 else np.float32
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(dataset), embedder.embedding_size))
        embed_dataset(
            embedder, dataset, batch_size=batch_size, flip=flip, normalize=normalize, out=array, progress=progress
        )
        array.flush()
        del array
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sidecar = {
        "dataset": str(Path(data).resolve()),
        "num_images": len(dataset),
        "embedding_size": int(embedder.embedding_size),
        "teacher": str(Path(teacher).resolve()),
        "teacher_sha256": _sha256(teacher),
        "flip": bool(flip),
        "normalized": bool(normalize),
        "dtype": np.dtype(dtype).name,
    }
    atomic_write_json(sidecar_path(out), sidecar)
    return sidecar


def read_teacher_embeddings(path: str | os.PathLike, *, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """Open a teacher-embeddings file and check it against its sidecar.

    Returns:
        ``(embeddings (N, D), sidecar dict)``.
    """
    import json

    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise DataError(f"{path}: teacher embeddings need both {path.name} and {side.name}; run distill-dataset")
    meta = json.loads(side.read_text(encoding="utf-8"))
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if array.shape != (meta["num_images"], meta["embedding_size"]):
        raise DataError(
            f"{path}: shape {array.shape} does not match its sidecar ({meta['num_images']}, {meta['embedding_size']})"
        )
    return array, meta


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
