"""Dataset conversion, verification and inspection: rec <-> image folder <-> list file, shuffle, shards.

Every conversion streams the source once, never holds more than a bounded amount of image data in memory, writes its
output under a temporary name next to the destination (``DST.tmp-<pid>``) and renames it at the very end, so an
interrupted run never leaves a complete-looking output. Image bytes are copied as they are (no re-encode); every image
is decoded once on the way (in a process pool when ``workers > 1``) so that a bad record is found now, not in epoch 7.

Full shuffle with bounded memory (Rao-Sandelius two-pass shuffle): pass 1 sends each record to one of ``K`` temporary
bucket files chosen uniformly at random from a seeded generator; pass 2 loads one bucket at a time, permutes it in
memory and writes it out. The concatenation is a uniformly random permutation of the input, and memory is about
``total_bytes / K`` (one bucket), so a WebFace42M-size set (~1 TB of JPEG) shuffles on one machine with ``K`` in the
hundreds.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facetrain.data.folders import BadRecord, ImageFolderDataset, decode_image_bytes, write_json_atomic
from facetrain.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_MEMORY = 1 << 30  # bytes of image data held in memory by the external shuffle (one bucket)
_CHUNK = 256  # records per task sent to a worker process
_MAX_BUCKETS = 4096


# ---------------------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class ConvertReport:
    """What :func:`convert_dataset` wrote.

    Attributes:
        src, dst: source and destination paths.
        to: ``"rec"``, ``"folder"`` or ``"list"``.
        images: records written.
        identities: number of classes of the output.
        parts: rec files written (1 = ``train.rec``).
        shuffled: whether the output order is a seeded full shuffle.
        shuffle_buckets: temporary buckets used by the external shuffle (0 when not shuffled).
        max_bucket_bytes: largest bucket held in memory by the shuffle.
        bad_records: records left out (``on_bad="skip"``).
        seconds: wall time.
    """

    src: str
    dst: str
    to: str
    images: int = 0
    identities: int = 0
    parts: int = 1
    shuffled: bool = False
    shuffle_buckets: int = 0
    max_bucket_bytes: int = 0
    bad_records: list[BadRecord] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`: every record decoded, the bad ones listed.

    Attributes:
        path: the dataset.
        format: ``"rec"``, ``"rec-parts"`` or ``"folder"``.
        records: records checked (good + bad).
        bad_records: one :class:`BadRecord` per record that is unreadable or does not decode.
    """

    path: str
    format: str
    records: int
    bad_records: list[BadRecord]

    @property
    def ok(self) -> bool:
        return not self.bad_records


@dataclass
class DatasetInfo:
    """Facts about a dataset (:func:`dataset_info`).

    Attributes:
        path, format: the dataset and its kind (``"rec"``, ``"rec-parts"``, ``"folder"``).
        images: number of images.
        identities: number of classes (the property file's, else the distinct labels).
        min_per_identity, median_per_identity, max_per_identity: images per identity over labels that occur.
        image_size: ``(height, width)`` from the property file or the first image.
        parts: number of rec parts (1 for a single rec or a folder).
    """

    path: str
    format: str
    images: int
    identities: int
    min_per_identity: int
    median_per_identity: float
    max_per_identity: int
    image_size: tuple[int, int]
    parts: int = 1


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def convert_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str = "rec",
    shuffle: bool = False,
    seed: int = 0,
    parts: int = 1,
    workers: int = 0,
    overwrite: bool = False,
    on_bad: str = "raise",
    shuffle_memory: int = DEFAULT_SHUFFLE_MEMORY,
    layout: str = "insightface",
    progress: bool = True,
) -> ConvertReport:
    """Convert a dataset between RecordIO, image folders and list files.

    Args:
        src: any dataset :func:`facetrain.data.open_dataset` accepts.
        dst: output folder (``to="rec"``/``"folder"``) or file (``to="list"``); must not exist unless ``overwrite``.
        to: ``"rec"`` (``train.rec/.idx`` + ``property``, or ``part-NNNNN.rec/.idx`` + ``property`` when ``parts > 1``),
            ``"folder"`` (``dst/<identity name or zero-padded label>/<key>.<ext>``, original bytes) or ``"list"``
            (MXNet ``.lst``: ``index<TAB>label<TAB>absolute path`` per line; image-folder sources only).
        shuffle: full seeded shuffle of the record order (``to="rec"`` only), with bounded memory.
        seed: shuffle seed; the same seed and source give the same output.
        parts: number of rec shards; each holds a contiguous slice of the (shuffled) order.
        workers: decode-check processes (0 or 1 = in this process).
        overwrite: replace an existing ``dst``.
        on_bad: ``"raise"`` at the first bad record, or ``"skip"`` it (listed in the report).
        shuffle_memory: bytes of image data the shuffle may hold at once; sets the number of buckets.
        layout: rec layout, ``"insightface"`` (header record 0 + identity ranges when grouped) or ``"plain"``.
        progress: show a tqdm bar (only on a TTY).

    Returns:
        A :class:`ConvertReport`.

    Raises:
        DataError: bad source, existing ``dst`` without ``overwrite``, bad record with ``on_bad="raise"``, or an
            option that does not apply to the output kind.
    """
    started = time.perf_counter()
    if to not in ("rec", "folder", "list"):
        raise DataError(f"unknown output kind {to!r}; use one of: rec, folder, list")
    if on_bad not in ("raise", "skip"):
        raise DataError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    if parts < 1:
        raise DataError(f"parts must be >= 1, got {parts}")
    if to != "rec" and (shuffle or parts > 1):
        raise DataError(
            f"--shuffle and --parts apply to rec output only (got --to {to}); the order of a {to} is by name"
        )
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if dst_path == src_path or (src_path.is_dir() and src_path in dst_path.parents):
        raise DataError(f"{dst}: the destination is the source or inside it; write the output somewhere else")
    source = open_source(src, on_bad=on_bad)
    if len(source) < parts:
        raise DataError(f"{src}: {len(source)} images cannot be split into {parts} parts")
    report = ConvertReport(src=str(src), dst=str(dst), to=to, parts=parts if to == "rec" else 1, shuffled=shuffle)
    if to == "list" and not isinstance(source, _FolderSource):
        raise DataError(f"{src}: list output needs an image-folder source; convert to a folder first (--to folder)")
    report.bad_records = list(source.bad_records)
    with _atomic_output(dst, overwrite=overwrite, is_dir=to != "list") as tmp:
        bar = _progress(len(source), "convert", progress)
        checked = _checked_records(source, workers=workers, on_bad=on_bad, bad=report.bad_records, bar=bar)
        records: Iterable[tuple[int, bytes, int]] = checked
        try:
            if to == "list":
                report.images = _write_list(tmp, source, records)
            elif to == "folder":
                report.images = _write_folder(tmp, source, records)
            else:
                expected = len(source)
                if shuffle:
                    stats: dict[str, int] = {}
                    records = external_shuffle(
                        records,
                        seed=seed,
                        tmp_dir=tmp / ".shuffle",
                        num_buckets=_num_buckets(source.total_bytes, shuffle_memory),
                        stats=stats,
                    )
                    expected = stats["records"]
                    report.shuffle_buckets = stats["buckets"]
                    report.max_bucket_bytes = stats["max_bucket_bytes"]
                report.images = _write_rec(tmp, source, records, parts=parts, layout=layout, expected=expected)
        finally:
            checked.close()  # stops the worker pool now, also when writing failed
            bar.close()
    report.identities = source.num_classes
    report.seconds = time.perf_counter() - started
    return report


def external_shuffle(
    records: Iterable[tuple[int, bytes, int]],
    *,
    seed: int,
    tmp_dir: str | os.PathLike,
    num_buckets: int,
    stats: dict | None = None,
) -> Iterator[tuple[int, bytes, int]]:
    """Full random permutation of a stream of records with memory bounded by one bucket.

    Rao-Sandelius two-pass shuffle: each record goes to bucket ``b ~ U{0..K-1}`` (one seeded generator, drawn in input
    order); then each bucket, in order, is read back and permuted in memory. Every permutation of the input is equally
    likely, and the peak memory is the largest bucket (about ``total / K``).

    Pass 1 runs when this function is called (the input is consumed); pass 2 runs as the result is iterated.

    Args:
        records: ``(index, image_bytes, label)`` in any order; consumed once.
        seed: permutation seed.
        tmp_dir: folder for the bucket files (created; removed when the iterator is exhausted or closed).
        num_buckets: ``K``.
        stats: optional dict that receives ``"max_bucket_bytes"``, ``"buckets"`` and ``"records"``.

    Returns:
        An iterator over the same ``(index, image_bytes, label)`` tuples in shuffled order.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x5EED])
    paths = [tmp_dir / f"bucket-{b:05d}" for b in range(num_buckets)]
    sizes = [0] * num_buckets
    count = 0
    files = [open(p, "wb", buffering=1 << 16) for p in paths]  # noqa: SIM115 - closed below
    try:
        draws = np.empty(0, dtype=np.int64)
        for index, data, label in records:
            if count % 65536 == 0:  # draw bucket choices in blocks: same sequence, fewer calls
                draws = rng.integers(num_buckets, size=65536)
            b = int(draws[count % 65536])
            files[b].write(_BUCKET_HEAD.pack(index, label, len(data)))
            files[b].write(data)
            sizes[b] += _BUCKET_HEAD.size + len(data)
            count += 1
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        for f in files:
            f.close()
    if stats is not None:
        stats.update(max_bucket_bytes=max(sizes, default=0), buckets=num_buckets, records=count)
    return _drain_buckets(paths, seed, tmp_dir)


def _drain_buckets(paths: list[Path], seed: int, tmp_dir: Path) -> Iterator[tuple[int, bytes, int]]:
    try:
        for b, path in enumerate(paths):
            bucket = _read_bucket(path)
            path.unlink()
            for j in np.random.default_rng([seed, 0xB0C7, b]).permutation(len(bucket)):
                yield bucket[j]
            del bucket
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def verify_dataset(
    path: str | os.PathLike, *, workers: int = 0, on_bad: str = "skip", progress: bool = True
) -> VerifyReport:
    """Decode every record of a dataset (in parallel) and list every bad one.

    Args:
        path: any dataset :func:`facetrain.data.open_dataset` accepts.
        workers: decode processes (0 or 1 = this process).
        on_bad: only affects the image-folder scan: ``"raise"`` stops at the first zero-byte / non-image file,
            ``"skip"`` (default) lists those too.
        progress: tqdm bar on a TTY.

    Returns:
        A :class:`VerifyReport`; bad records named by path (folders) or ``rec key K offset O`` (RecordIO).
    """
    source = open_source(path, on_bad=on_bad)
    bad: list[BadRecord] = []
    bar = _progress(len(source), "verify", progress)
    try:
        good = sum(1 for _ in _checked_records(source, workers=workers, on_bad="skip", bad=bad, bar=bar))
    finally:
        bar.close()
    bad = list(source.bad_records) + bad
    return VerifyReport(path=str(path), format=source.format, records=good + len(bad), bad_records=bad)


def dataset_info(path: str | os.PathLike) -> DatasetInfo:
    """Count images and identities and find the image size, decoding at most one image.

    Args:
        path: any dataset :func:`facetrain.data.open_dataset` accepts.
    """
    source = open_source(path, on_bad="skip")
    labels = source.labels()
    counts = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    present = counts[counts > 0]
    size = source.image_size
    if size is None:
        for i in range(len(source)):
            try:
                rgb = decode_image_bytes(source.read(i), where=source.where(i))
            except DataError:
                continue
            size = (int(rgb.shape[0]), int(rgb.shape[1]))
            break
    return DatasetInfo(
        path=str(path),
        format=source.format,
        images=len(source),
        identities=max(source.num_classes, int(present.size)),
        min_per_identity=int(present.min()) if present.size else 0,
        median_per_identity=float(np.median(present)) if present.size else 0.0,
        max_per_identity=int(present.max()) if present.size else 0,
        image_size=size or (0, 0),
        parts=source.num_parts,
    )


def make_bin(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    num_pairs: int,
    seed: int = 0,
    overwrite: bool = False,
) -> np.ndarray:
    """Write a verification ``.bin`` with ``num_pairs`` genuine and ``num_pairs`` impostor pairs drawn from ``src``.

    Genuine pairs: an identity with >= 2 images, two different images of it. Impostor pairs: two different identities,
    one image each. Pairs are distinct and their order is shuffled (seeded). Use identities held out of training.
    Images are stored with their original encoded bytes (checked to decode; no re-encode).

    Args:
        src: image folder or rec dataset.
        dst: the ``.bin`` path (written atomically).
        num_pairs: pairs of EACH kind (the file holds ``2 * num_pairs`` pairs).
        seed: sampling seed.
        overwrite: replace an existing ``dst``.

    Returns:
        ``issame``, ``(2 * num_pairs,)`` bool.

    Raises:
        DataError: too few identities / images for the requested pairs, or ``dst`` exists.
    """
    from facetrain.data.bins import write_bin

    if num_pairs < 1:
        raise DataError(f"--pairs must be >= 1, got {num_pairs}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: already exists; pass --overwrite to replace it")
    source = open_source(src, on_bad="raise")
    pairs, issame = sample_pairs(source.labels(), num_pairs=num_pairs, seed=seed, where=str(src))
    images = []
    for i in pairs.reshape(-1).tolist():
        data = source.read(i)
        decode_image_bytes(data, where=source.where(i))  # a bad image fails here, naming its record
        images.append(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_bin(dst, images, issame)
    return issame


def sample_pairs(
    labels: np.ndarray, *, num_pairs: int, seed: int, where: str = "dataset"
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num_pairs`` genuine and ``num_pairs`` impostor index pairs from per-image labels.

    Returns:
        ``(pairs (2P, 2) int64 indices, issame (2P,) bool)`` in a seeded random order.
    """
    rng = np.random.default_rng([seed, 0xB1])
    labels = np.asarray(labels, dtype=np.int64)
    by_label: dict[int, np.ndarray] = {}
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    for k, lab in enumerate(uniq):
        end = starts[k + 1] if k + 1 < len(starts) else len(order)
        by_label[int(lab)] = order[starts[k] : end]
    multi = [lab for lab, idx in by_label.items() if len(idx) >= 2]
    if not multi:
        raise DataError(f"{where}: no identity has 2 or more images; genuine pairs need them")
    if len(by_label) < 2:
        raise DataError(f"{where}: only one identity; impostor pairs need at least 2")
    genuine_pool = sum(len(by_label[lab]) * (len(by_label[lab]) - 1) // 2 for lab in multi)
    n = len(labels)
    impostor_pool = (n * n - sum(len(v) ** 2 for v in by_label.values())) // 2
    if num_pairs > genuine_pool or num_pairs > impostor_pool:
        raise DataError(
            f"{where}: asked for {num_pairs} pairs of each kind but only {genuine_pool} genuine / {impostor_pool} "
            "impostor distinct pairs exist; lower --pairs or add identities"
        )
    label_keys = np.array(sorted(by_label))
    multi_keys = np.array(sorted(multi))
    seen: set[tuple[int, int]] = set()
    genuine, impostor = [], []
    budget = 50 * num_pairs + 1000  # rejection sampling; only a request close to every possible pair runs out
    while len(genuine) < num_pairs:
        budget -= 1
        if budget < 0:
            raise DataError(f"{where}: could not draw {num_pairs} distinct genuine pairs; lower --pairs")
        idx = by_label[int(rng.choice(multi_keys))]
        a, b = rng.choice(idx, size=2, replace=False)
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            genuine.append((int(a), int(b)))
    budget = 50 * num_pairs + 1000
    while len(impostor) < num_pairs:
        budget -= 1
        if budget < 0:
            raise DataError(f"{where}: could not draw {num_pairs} distinct impostor pairs; lower --pairs")
        la, lb = rng.choice(label_keys, size=2, replace=False)
        a, b = int(rng.choice(by_label[int(la)])), int(rng.choice(by_label[int(lb)]))
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            impostor.append((a, b))
    pairs = np.array(genuine + impostor, dtype=np.int64)
    issame = np.array([True] * num_pairs + [False] * num_pairs)
    perm = rng.permutation(len(pairs))
    return pairs[perm], issame[perm]


def write_synthetic(
    dst: str | os.PathLike,
    *,
    identities: int,
    images_per_identity: int,
    fmt: str = "rec",
    seed: int = 0,
    pairs: int = 600,
    image_size: int = 112,
    overwrite: bool = False,
) -> int:
    """Render a synthetic dataset (:class:`~facetrain.data.synthetic.SyntheticIdentities`) to disk.

    Args:
        dst: output folder (``rec``/``folder``) or ``.bin`` file (``bin``).
        identities: identities (classes), or for ``bin`` the held-out identities the pairs come from.
        images_per_identity: images per identity (ignored for ``bin``).
        fmt: ``"rec"``, ``"folder"`` (JPEG quality 95) or ``"bin"`` (``pairs`` verification pairs, half genuine).
        seed: synthetic seed.
        pairs: number of pairs for ``bin`` (even).
        image_size: square image side.
        overwrite: replace an existing ``dst``.

    Returns:
        Number of images written.
    """
    from facetrain.data.images import encode_image
    from facetrain.data.synthetic import SyntheticIdentities, make_verification_pairs

    if fmt not in ("rec", "folder", "bin"):
        raise DataError(f"unknown synthetic format {fmt!r}; use one of: rec, folder, bin")
    if identities < 1 or images_per_identity < 1:
        raise DataError(f"--identities and --images-per-identity must be >= 1, got {identities}, {images_per_identity}")
    if fmt == "bin":
        from facetrain.data.bins import write_bin

        dst = Path(dst)
        if dst.exists() and not overwrite:
            raise DataError(f"{dst}: already exists; pass --overwrite to replace it")
        if pairs < 2 or pairs % 2 or identities < 2:
            raise DataError(f"bin needs an even --pairs >= 2 and --identities >= 2, got {pairs}, {identities}")
        images, issame = make_verification_pairs(pairs, num_identities=identities, seed=seed, image_size=image_size)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_bin(dst, images, issame)
        return len(images)
    data = SyntheticIdentities(identities, images_per_identity, seed=seed, image_size=image_size)
    with _atomic_output(dst, overwrite=overwrite, is_dir=True) as tmp:
        if fmt == "rec":
            from facetrain.data.recordio import write_rec_dataset

            samples = (
                (encode_image(rgb, ext=".jpg", quality=95), label) for rgb, label in (data[i] for i in range(len(data)))
            )
            write_rec_dataset(tmp, samples, image_size=(image_size, image_size), num_classes=identities)
        else:
            width = len(str(identities - 1))
            for i in range(len(data)):
                rgb, label = data[i]
                folder = tmp / f"{label:0{width}d}"
                folder.mkdir(exist_ok=True)
                (folder / f"{i % images_per_identity:05d}.jpg").write_bytes(encode_image(rgb, ext=".jpg", quality=95))
    return len(data)


# ---------------------------------------------------------------------------------------------------------------------
# Sources: one interface over image folders and RecordIO (single file or parts) that hands out the raw encoded bytes.


class _Source:
    """Raw view of a dataset: ``read(i) -> encoded bytes``, ``label(i)``, ``where(i)``; no decoding."""

    format: str = ""
    num_parts: int = 1
    image_size: tuple[int, int] | None = None
    names: list[str] | None = None  # identity names by label, when known
    total_bytes: int = 0
    bad_records: list[BadRecord]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def where(self, i: int) -> str:
        raise NotImplementedError

    def key(self, i: int) -> str:
        """File-name stem for sample ``i`` when written to a folder."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


class _FolderSource(_Source):
    format = "folder"

    def __init__(self, root: Path, on_bad: str) -> None:
        self.dataset = ImageFolderDataset(root, on_bad=on_bad)
        self.bad_records = self.dataset.bad_records
        self.names = self.dataset.identity_names
        self.total_bytes = sum(os.path.getsize(p) for p, _ in self.dataset.samples)
        self._labels = self.dataset.labels()

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int) -> bytes:
        return self.dataset.read_bytes(i)

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def where(self, i: int) -> str:
        return self.dataset.where(i)

    def key(self, i: int) -> str:
        return Path(self.dataset.samples[i][0]).stem


class _RecSource(_Source):
    """One ``.rec`` or a folder of ``part-NNNNN.rec`` through :class:`~facetrain.data.recordio.RecordDataset`."""

    def __init__(self, path: Path, kind: str) -> None:
        from facetrain.data.recordio import RecordDataset

        self.dataset = RecordDataset(path)
        self.format = kind
        self.bad_records = []
        self.num_parts = len(self.dataset.paths)
        self.total_bytes = sum(p.stat().st_size for p in self.dataset.paths)
        self.image_size = self.dataset.image_size
        if len(self.dataset) == 0:
            raise DataError(f"{path}: the RecordIO holds no image records")
        self.names = _read_label_map(self.dataset.paths[0].parent / "label_map.json")
        self._max_label = -1

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int) -> bytes:
        return bytes(self.dataset.encoded(i)[0])

    def read_with_label(self, i: int) -> tuple[bytes, int]:
        data, label = self.dataset.encoded(i)
        self._max_label = max(self._max_label, int(label))
        return bytes(data), int(label)

    def label(self, i: int) -> int:
        return int(self.labels()[i])

    def labels(self) -> np.ndarray:
        return self.dataset.labels()

    def where(self, i: int) -> str:
        part, pos = self.dataset._locate(i)
        reader = self.dataset._readers[part]
        return f"{reader.rec_path} key {int(reader.keys[pos])} offset {int(reader.offsets[pos])}"

    def key(self, i: int) -> str:
        path, key = self.dataset.locate(i)
        return f"{key:08d}" if self.num_parts == 1 else f"{path.stem}_{key:08d}"

    @property
    def num_classes(self) -> int:
        try:
            return self.dataset.num_classes
        except DataError:
            # A record whose header cannot be read (already reported when skipping bad records): fall back on the
            # property file, else on the labels of the records read so far.
            prop = getattr(self.dataset, "_property", None)
            if prop is not None:
                return int(prop[0])
            if self._max_label < 0:
                raise
            return self._max_label + 1


def open_source(path: str | os.PathLike, *, on_bad: str = "raise") -> _Source:
    """Raw-bytes view of a dataset (used by conversions); same accepted paths as ``open_dataset``."""
    from facetrain.data import detect_format

    kind = detect_format(path)
    if kind == "folder":
        return _FolderSource(Path(path), on_bad)
    return _RecSource(Path(path), kind)


def _read_label_map(path: Path) -> list[str] | None:
    import json

    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        names = sorted(mapping, key=mapping.__getitem__)
        if [mapping[n] for n in names] != list(range(len(names))):
            raise ValueError("labels are not 0..C-1")
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("%s: ignored (%s)", path, exc)
        return None
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Streaming: read in this process, decode-check in a pool, write in this process.


def _checked_records(
    source: _Source, *, workers: int, on_bad: str, bad: list[BadRecord], bar
) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(index, bytes, label)`` for every record that reads and decodes; bad ones raise or go to ``bad``."""

    def chunks() -> Iterator[list[tuple[int, str, bytes | None, int, str | None]]]:
        chunk = []
        for i in range(len(source)):
            try:
                if isinstance(source, _RecSource):
                    data, label = source.read_with_label(i)
                else:
                    data, label = source.read(i), source.label(i)
                chunk.append((i, source.where(i), data, label, None))
            except DataError as exc:
                chunk.append((i, source.where(i), None, -1, str(exc)))
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def finish(chunk, errors) -> Iterator[tuple[int, bytes, int]]:
        for (i, where, data, label, read_error), error in zip(chunk, errors):
            bar.update(1)
            error = read_error or error
            if error is not None:
                if on_bad == "raise":
                    raise DataError(f"{error}; or pass --skip-bad / on_bad='skip' to leave it out")
                bad.append(BadRecord(where, error.removeprefix(f"{where}: ")))
                continue
            if source.image_size is None:
                source.image_size = _decoded_size(data, where)
            yield i, data, label

    if workers <= 1:
        for chunk in chunks():
            yield from finish(chunk, _check_chunk([(where, data) for _, where, data, _, _ in chunk]))
        return
    import multiprocessing
    from collections import deque

    # At most 4 chunks per worker in flight: memory stays bounded however large the dataset (Pool.imap would read
    # the whole source ahead into its queue).
    pool = multiprocessing.get_context("spawn").Pool(workers)
    inflight: deque = deque()
    try:
        for chunk in chunks():
            task = [(where, data) for _, where, data, _, _ in chunk]
            inflight.append((chunk, pool.apply_async(_check_chunk, (task,))))
            if len(inflight) >= 4 * workers:
                chunk, result = inflight.popleft()
                yield from finish(chunk, result.get())
        while inflight:
            chunk, result = inflight.popleft()
            yield from finish(chunk, result.get())
    finally:
        pool.terminate()
        pool.join()


def _check_chunk(task: list[tuple[str, bytes | None]]) -> list[str | None]:
    """Decode each ``(where, data)``; the error message per item, or None (runs in a worker process)."""
    out: list[str | None] = []
    for where, data in task:
        if data is None:
            out.append(None)  # a read error, already recorded
            continue
        try:
            decode_image_bytes(data, where=where)
            out.append(None)
        except DataError as exc:
            out.append(str(exc))
    return out


def _decoded_size(data: bytes, where: str) -> tuple[int, int]:
    rgb = decode_image_bytes(data, where=where)
    return int(rgb.shape[0]), int(rgb.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# Sinks


def _write_rec(tmp: Path, source: _Source, records, *, parts: int, layout: str, expected: int) -> int:
    """Write ``records`` as ``train.rec`` or ``parts`` contiguous shards; ``expected`` sizes the shards."""
    from facetrain.data.recordio import write_rec_dataset

    bounds = [round(expected * p / parts) for p in range(parts + 1)]
    stream = iter(records)
    written = 0
    size = None
    for p in range(parts):
        take = bounds[p + 1] - bounds[p] if p < parts - 1 else None
        chunk = _take((stream_item[1:] for stream_item in stream), take)
        prefix = "train" if parts == 1 else f"part-{p:05d}"
        counter = _Counter(chunk)
        write_rec_dataset(
            tmp,
            counter,
            image_size=source.image_size or (112, 112),
            layout=layout,
            prefix=prefix,
            num_classes=source.num_classes,
            write_property=False,
        )
        written += counter.count
        size = source.image_size or size
    h, w = size or (112, 112)
    (tmp / "property").write_text(f"{source.num_classes},{h},{w}\n")
    if source.names is not None:
        write_json_atomic(tmp / "label_map.json", {name: k for k, name in enumerate(source.names)})
    return written


def _write_folder(tmp: Path, source: _Source, records) -> int:
    names = source.names
    if names is not None and len(names) != source.num_classes:
        log.warning(
            "label_map.json has %d names for %d classes; naming folders by label", len(names), source.num_classes
        )
        names = None
    width = max(1, len(str(max(source.num_classes - 1, 0))))
    made: set[int] = set()
    written = 0
    for i, data, label in records:
        folder = tmp / (names[label] if names is not None else f"{label:0{width}d}")
        if label not in made:
            folder.mkdir(exist_ok=True)
            made.add(label)
        with open(folder / (source.key(i) + _image_ext(data)), "wb") as f:
            f.write(data)
        written += 1
    return written


def _write_list(tmp_file: Path, source: _Source, records) -> int:
    written = 0
    with open(tmp_file, "w", encoding="utf-8") as f:
        for i, _, label in records:
            f.write(f"{written}\t{label}\t{os.path.abspath(source.where(i))}\n")
            written += 1
    return written


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:2] == b"BM":
        return ".bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".jpg"


class _Counter:
    def __init__(self, it: Iterable) -> None:
        self._it = iter(it)
        self.count = 0

    def __iter__(self):
        for item in self._it:
            self.count += 1
            yield item


def _take(it: Iterator, n: int | None) -> Iterator:
    if n is None:
        yield from it
        return
    for _, item in zip(range(n), it):
        yield item


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing


_BUCKET_HEAD = struct.Struct("<qqI")  # source index, label, byte length


def _read_bucket(path: Path) -> list[tuple[int, bytes, int]]:
    blob = path.read_bytes()
    out = []
    pos, n = 0, len(blob)
    while pos < n:
        index, label, length = _BUCKET_HEAD.unpack_from(blob, pos)
        pos += _BUCKET_HEAD.size
        out.append((index, blob[pos : pos + length], label))
        pos += length
    return out


def _num_buckets(total_bytes: int, memory: int) -> int:
    if memory <= 0:
        raise DataError(f"shuffle memory must be > 0 bytes, got {memory}")
    k = max(1, -(-total_bytes // memory))
    if k > _MAX_BUCKETS:
        log.warning("shuffle: %d buckets needed for %d bytes in %d; capped at %d", k, total_bytes, memory, _MAX_BUCKETS)
    return min(k, _MAX_BUCKETS)


class _atomic_output:  # noqa: N801 - used as a context manager like a function
    """``with _atomic_output(dst) as tmp:`` write under ``tmp``; renamed to ``dst`` only if the block succeeds."""

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool, is_dir: bool) -> None:
        self.dst = Path(dst)
        self.is_dir = is_dir
        if self.dst.exists() and not overwrite:
            raise DataError(f"{self.dst}: already exists; pass --overwrite (overwrite=True) to replace it")
        self.tmp = self.dst.with_name(f"{self.dst.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        _remove(self.tmp)
        if self.is_dir:
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            _remove(self.tmp)
            return
        old = None
        if self.dst.exists():
            old = self.dst.with_name(f"{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()), leave=False)
