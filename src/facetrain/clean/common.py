"""Plumbing shared by the data-quality tools: streamed embedding of a dataset, subset writing, atomic outputs.

Datasets are read through :func:`facetrain.data.open_dataset` (images) and
:func:`facetrain.data.convert.open_source` (raw encoded bytes, so a cleaned dataset copies the original bytes without
re-encoding). Nothing here holds more than one batch of images in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from facetrain import fileio
from facetrain.errors import DataError, ModelError

log = logging.getLogger(__name__)

__all__ = [
    "iter_image_batches",
    "embed_dataset",
    "write_subset",
    "atomic_write_text",
    "atomic_save_npy",
    "load_training_checkpoint",
    "progress_bar",
]

OUTPUT_FORMATS = ("rec", "folder", "list")


def default_device(device: str | None) -> str:
    """``device``, or ``"cuda"`` when available, else ``"cpu"``."""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar that only draws on a TTY."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()), leave=False)


def iter_image_batches(
    dataset, batch_size: int, indices: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode a dataset batch by batch.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__(i) -> (uint8 (H, W, 3) RGB, label)``.
        batch_size: images per batch.
        indices: which images (default: all, in index order).

    Yields:
        ``(indices (B,) int64, images (B, H, W, 3) uint8, labels (B,) int64)``.
    """
    order = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        items = [dataset[int(i)] for i in idx]
        shapes = {img.shape for img, _ in items}
        if len(shapes) != 1:
            raise DataError(f"images {idx[0]}..{idx[-1]} have different shapes {sorted(shapes)}; align them first")
        yield idx, np.stack([img for img, _ in items]), np.array([int(lab) for _, lab in items], np.int64)


def embed_dataset(
    embedder,
    dataset,
    *,
    batch_size: int = 256,
    flip: bool = False,
    normalize: bool = True,
    out: np.ndarray | None = None,
    dtype=np.float32,
    progress: bool = True,
    on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Embed every image of a dataset, streamed in batches (only one batch of images in memory).

    Args:
        embedder: a :class:`facetrain.embed.Embedder`.
        dataset: see :func:`iter_image_batches`.
        batch_size: images decoded and embedded at once.
        flip: flip test, ``f(x) + f(flip x)`` before the normalization.
        normalize: L2-normalize every row.
        out: optional preallocated ``(N, D)`` array (e.g. a ``.npy`` memmap) to write into.
        dtype: dtype of the returned array when ``out`` is None.
        progress: tqdm bar on a TTY.
        on_batch: called with ``(indices, embeddings (B, D) float32, labels)`` after every batch.

    Returns:
        ``(N, D)`` embeddings in dataset index order.

    Raises:
        ModelError: the model returned NaN or Inf.
    """
    n = len(dataset)
    if out is None:
        out = np.zeros((n, embedder.embedding_size), dtype=dtype)
    bar = progress_bar(n, "embed", progress)
    try:
        for idx, images, labels in iter_image_batches(dataset, batch_size):
            if flip:
                a, b = embedder.embed_flip(images)
                emb = a + b
            else:
                emb = embedder.embed(images)
            if not np.all(np.isfinite(emb)):
                raise ModelError(f"{embedder.name}: NaN/Inf embeddings for images {idx[0]}..{idx[-1]}")
            if normalize:
                emb = l2_normalize(emb)
            out[idx] = emb
            if on_batch is not None:
                on_batch(idx, emb, labels)
            bar.update(len(idx))
    finally:
        bar.close()
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def check_embeddings(embeddings: np.ndarray, what: str) -> np.ndarray:
    """A finite float32 ``(N, D)`` array, or DataError naming ``what``."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise DataError(f"{what}: expected embeddings of shape (N, D) with N > 0, got {emb.shape}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(
            f"{what}: {len(rows)} embedding rows contain NaN or Inf (first row {rows[0]}); re-embed those images"
        )
    return emb.astype(np.float32, copy=False)


def write_subset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    keep: np.ndarray,
    new_labels: np.ndarray,
    *,
    fmt: str = "rec",
    overwrite: bool = False,
) -> int:
    """Write the kept images of a dataset with new labels, copying the encoded bytes (no re-encode), atomically.

    Args:
        src: the source dataset (any path ``open_dataset`` accepts).
        dst: output folder (``rec``, ``folder``) or file (``list``: ``index<TAB>label<TAB>source location`` lines).
        keep: ``(M,)`` source indices to write, in output order.
        new_labels: ``(M,)`` contiguous labels ``0..C'-1`` of the kept images.
        fmt: ``"rec"``, ``"folder"`` or ``"list"``.
        overwrite: replace an existing ``dst``.

    Returns:
        Number of images written.
    """
    from facetrain.data.convert import _image_ext, open_source
    from facetrain.data.recordio import write_rec_dataset

    if fmt not in OUTPUT_FORMATS:
        raise DataError(f"unknown output format {fmt!r}; use one of {list(OUTPUT_FORMATS)}")
    keep = np.asarray(keep, dtype=np.int64)
    new_labels = np.asarray(new_labels, dtype=np.int64)
    if keep.shape != new_labels.shape:
        raise DataError(f"keep {keep.shape} and new_labels {new_labels.shape} differ in shape")
    if len(keep) == 0:
        raise DataError(f"{src}: no image kept; nothing to write to {dst} (loosen the threshold)")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: already exists; pass --overwrite to replace it")
    if Path(src).resolve() == dst.resolve():
        raise DataError(f"{dst}: the destination is the source; write the cleaned dataset somewhere else")
    source = open_source(src)
    num_classes = int(new_labels.max()) + 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        if fmt == "rec":
            tmp.mkdir()
            size = getattr(source, "image_size", None) or (112, 112)
            write_rec_dataset(
                tmp,
                ((source.read(int(i)), int(lab)) for i, lab in zip(keep, new_labels)),
                image_size=tuple(size),
                num_classes=num_classes,
            )
        elif fmt == "folder":
            tmp.mkdir()
            width = len(str(max(num_classes - 1, 0)))
            for i, lab in zip(keep, new_labels):
                folder = tmp / f"{int(lab):0{width}d}"
                folder.mkdir(exist_ok=True)
                data = source.read(int(i))
                (folder / f"{source.key(int(i))}{_image_ext(data)}").write_bytes(data)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for n, (i, lab) in enumerate(zip(keep, new_labels)):
                    f.write(f"{n}\t{int(lab)}\t{source.where(int(i))}\n")
        _replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise
    return len(keep)


def relabel(keep_mask: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous labels for the kept images; classes with no kept image disappear.

    Returns:
        ``(kept indices (M,), new labels (M,), old label of each new class (C',))``.
    """
    keep = np.flatnonzero(keep_mask)
    old = np.asarray(labels)[keep]
    classes, new = np.unique(old, return_inverse=True)
    return keep, new.astype(np.int64), classes


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temp name and rename it."""
    fileio.atomic_write_text(path, text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """JSON (indented, sorted keys) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` under a temp name and rename."""
    with fileio.atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (PNG) and close it."""
    import matplotlib.pyplot as plt

    try:
        with fileio.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot with the Agg backend (imported lazily)."""
    from facetrain.errors import require

    matplotlib = require("matplotlib", "report", "plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def load_training_checkpoint(path: str | os.PathLike, *, need_centres: bool = True) -> dict:
    """Read a trainer checkpoint (``weights_only=True``) and check the keys the cleaning tools use.

    Returns:
        The checkpoint dict; ``class_centres`` is a float32 numpy ``(C*K, D)`` array when present.

    Raises:
        ModelError: unreadable file, or ``class_centres``/``subcenter_k``/``num_classes`` missing or inconsistent.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "backbone" not in ckpt:
        raise ModelError(f"{path}: not a facetrain training checkpoint (no 'backbone' key)")
    if not need_centres:
        return ckpt
    centres = ckpt.get("class_centres")
    if centres is None:
        raise ModelError(
            f"{path}: the checkpoint has no 'class_centres'; pass a training checkpoint written by 'facetrain train'"
        )
    centres = centres.detach().float().cpu().numpy() if hasattr(centres, "detach") else np.asarray(centres, np.float32)
    k = int(ckpt.get("subcenter_k", 1) or 1)
    c = int(ckpt.get("num_classes", centres.shape[0] // max(k, 1)))
    if centres.ndim != 2 or centres.shape[0] != c * k:
        raise ModelError(
            f"{path}: class_centres has shape {tuple(centres.shape)} but num_classes={c} x subcenter_k={k} rows "
            "are expected"
        )
    ckpt["class_centres"] = centres
    ckpt["subcenter_k"] = k
    ckpt["num_classes"] = c
    return ckpt


def _replace(tmp: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
