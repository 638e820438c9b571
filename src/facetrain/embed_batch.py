"""``facetrain embed``: embed a whole folder / RecordIO / list of faces (or raw photos) into one file, resumably.

Pipeline: a pool of decoder threads (OpenCV releases the GIL; a detector is built once per thread) reads and decodes
chunks of ``batch_size`` items ahead of the model, which runs on the main thread, so decoding overlaps inference.
Items are grouped into shards of ``shard_size``; each finished shard is written atomically to ``OUT.partial/``, and a
re-run with the same model, input and settings skips the shards already there. When every shard is done they are
merged into ``OUT`` (written atomically) and ``OUT.partial/`` is removed.

Outputs (by suffix):

- ``.npz``: ``embeddings`` (N, D) float32 raw (unnormalized), ``ids`` (N,) str, ``labels`` (N,) int64 (-1 when
  unknown), ``bad_ids`` (str), ``model`` (the embedder's identity);
- ``.npy``: the embeddings, with ``OUT.ids.tsv`` beside it (``id<TAB>label`` per row);
- ``.parquet``: columns ``id``, ``label``, ``embedding`` (fixed-size list of float32); needs ``pyarrow``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from facetrain.embed import BaseEmbedder
from facetrain.errors import DataError, ModelError, require
from facetrain.fileio import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "EmbedSummary",
    "InputSource",
    "OUTPUT_FORMATS",
    "PipelineOnnxEmbedder",
    "embed_to_file",
    "load_batch_embedder",
    "open_input",
]

OUTPUT_FORMATS = (".npz", ".npy", ".parquet")
MAX_STREAMS = 8  # concurrent CPU runs by default: each holds a batch of activations
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")


@dataclass
class EmbedSummary:
    """What :func:`embed_to_file` did.

    Attributes:
        out: the output file.
        n_items: input items (images or photos).
        n_embeddings: rows in the output (with a detector, a photo can give several faces or none).
        n_resumed: items whose shards were already in ``OUT.partial/`` from an earlier run.
        bad: ``"id: reason"`` of each item skipped with ``skip_bad``.
        seconds: wall time of this run.
        embedding_size: D.
    """

    out: Path
    n_items: int
    n_embeddings: int
    n_resumed: int
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0
    embedding_size: int = 0

    @property
    def items_per_s(self) -> float:
        """Items embedded by this run per second (resumed items excluded)."""
        done = self.n_items - self.n_resumed
        return done / self.seconds if self.seconds > 0 else 0.0


class InputSource(Protocol):
    """A list of items to embed: ``len``, a stable ``key(i)``, and ``load(i) -> (uint8 RGB image, label)``."""

    description: str

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def load(self, index: int) -> tuple[np.ndarray, int]: ...


def embed_to_file(
    model,
    source: str | os.PathLike | InputSource,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int = 2,
    shard_size: int = 4096,
    detector: str | None = None,
    detector_kwargs: dict | None = None,
    skip_bad: bool = False,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    device: str | None = None,
    providers: list[str] | None = None,
    threads: int = 0,
    streams: int | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed every item of ``source`` and write ids, labels and raw embeddings to ``out``.

    Args:
        model: a model file (checkpoint, TorchScript, ONNX; see :func:`load_batch_embedder`) or an Embedder.
        source: an aligned image folder, a ``.rec`` (or folder with ``train.rec``), a list file (one
            ``path [label]`` per line, paths relative to the list), a folder of raw photos (with ``detector``), or an
            :class:`InputSource`.
        out: ``.npz``, ``.npy`` or ``.parquet`` file.
        batch_size: faces per model run (and items per decode task).
        workers: decoder threads (with several model streams, each stream's thread also decodes its own chunk).
        shard_size: items per resumable shard.
        detector: detect + align faces first with this detector (``facetrain.align.build_detector`` name); each
            face becomes a row with id ``<item>#<k>``.
        detector_kwargs: keyword arguments for the detector.
        skip_bad: leave undecodable / wrongly sized images out and list them, instead of stopping.
        restart: discard an existing ``OUT.partial/``.
        overwrite: replace an existing ``out``.
        progress: tqdm progress bar; None shows it when stderr is a terminal.
        device: torch device for torch models.
        providers: onnxruntime providers for ONNX models.
        threads: CPU threads for an ONNX model in all (0: every usable core).
        streams: concurrent model runs on CPU for an ONNX model (None: one per thread, up to 8; see
            :class:`PipelineOnnxEmbedder`).
        on_shard: called with the index of each shard after it is written (tests use it to interrupt a run).

    Returns:
        :class:`EmbedSummary`.

    Raises:
        DataError: bad input (without ``skip_bad``), existing output, or a partial run made with other settings.
        ModelError: the model cannot be loaded.
    """
    start_time = time.perf_counter()
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in OUTPUT_FORMATS:
        raise DataError(f"{out}: unknown output format {fmt or '(none)'}; use one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == ".parquet":
        require("pyarrow", "parquet", "Parquet output")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to recompute it, or choose another output")
    if batch_size < 1 or shard_size < 1 or workers < 1:
        raise DataError(f"batch_size, shard_size and workers must be >= 1, got {batch_size}, {shard_size}, {workers}")
    if not hasattr(source, "load"):
        source = open_input(source)
    embedder = (
        model
        if hasattr(model, "embed")
        else load_batch_embedder(
            model, batch_size=batch_size, device=device, providers=providers, threads=threads, streams=streams
        )
    )
    input_size = tuple(getattr(embedder, "input_size", None) or (112, 112))

    partial = out.with_name(out.name + ".partial")
    if restart and partial.exists():
        shutil.rmtree(partial)
    n_items = len(source)
    n_shards = (n_items + shard_size - 1) // shard_size
    manifest = {
        "model": str(embedder.identity),
        "source": source.description,
        "n_items": n_items,
        "items_sha256": _keys_digest(source),
        "shard_size": shard_size,
        "detector": detector,
        "detector_kwargs": _jsonable(detector_kwargs or {}),
        "input_size": list(input_size),
    }
    _open_partial(partial, manifest)
    done = {i for i in range(n_shards) if _shard_path(partial, i).is_file()}
    n_resumed = sum(min(shard_size, n_items - i * shard_size) for i in done)
    if done:
        logger.info("resuming: %d of %d shards already in %s", len(done), n_shards, partial)

    loader = _FaceLoader(source, input_size, detector, detector_kwargs or {}, skip_bad)
    tasks = []  # (shard, items) in order; a shard is written when its last chunk is embedded
    for shard in range(n_shards):
        if shard not in done:
            first, end = shard * shard_size, min((shard + 1) * shard_size, n_items)
            tasks.extend((shard, range(lo, min(lo + batch_size, end))) for lo in range(first, end, batch_size))
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=n_items, initial=n_resumed, unit="img", desc="embed", disable=not show)
    current: dict[int, list] = {}
    remaining = {s: 0 for s in range(n_shards) if s not in done}
    for shard, _items in tasks:
        remaining[shard] += 1
    streams = max(1, int(getattr(embedder, "streams", 1)))

    def embed_chunk(chunk):
        faces, keys, labels, bad = chunk
        embeddings = embedder.embed(faces) if len(faces) else np.zeros((0, embedder.embedding_size), np.float32)
        return embeddings, keys, labels, bad

    if streams > 1:  # each thread decodes its chunk and runs the model on it: `streams` batches in flight
        work, finish = (lambda task: embed_chunk(loader.load_chunk(task))), (lambda result: result)
        threads, depth = max(workers, streams), streams + 1
    else:  # the decoders run ahead; the model runs here, one batch at a time
        work, finish, threads, depth = loader.load_chunk, embed_chunk, workers, 2 * workers
    try:
        with (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="facetrain-embed") as pool,
            closing(_prefetch(pool, work, tasks, depth)) as results,
        ):
            for (shard, items), result in zip(tasks, results):
                current.setdefault(shard, []).append(finish(result))
                bar.update(len(items))
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    _write_shard(partial, shard, current.pop(shard), embedder.embedding_size)
                    if on_shard is not None:
                        on_shard(shard)
    finally:
        bar.close()
    embedding_size, n_rows, bad_all = _merge(partial, n_shards, out, fmt, manifest["model"])
    shutil.rmtree(partial, ignore_errors=True)
    return EmbedSummary(
        out=out,
        n_items=n_items,
        n_embeddings=n_rows,
        n_resumed=n_resumed,
        bad=bad_all,
        seconds=time.perf_counter() - start_time,
        embedding_size=embedding_size,
    )


def open_input(path: str | os.PathLike) -> InputSource:
    """An :class:`InputSource` for a folder, a ``.rec`` (or folder holding ``train.rec``) or a list file.

    Raises:
        DataError: missing path, unknown kind, or no images.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass an image folder, a .rec or a list file")
    if path.is_file():
        if path.suffix.lower() == ".rec":
            return _RecSource(path)
        if path.suffix.lower() in LIST_SUFFIXES:
            return _ListSource(path)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return _FileListSource([path], path.parent, f"image {path}")
        raise DataError(f"{path}: not an input for embed; pass an image folder, a .rec or a list file (.txt/.lst)")
    if (path / "train.rec").is_file():
        return _RecSource(path)
    return _FolderSource(path)


def load_batch_embedder(
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str | None = None,
    providers: list[str] | None = None,
    threads: int = 0,
    backbone: str | None = None,
    streams: int | None = None,
):
    """Open a model file for batch embedding: ONNX through onnxruntime (IO binding on CUDA), others through torch.

    Raises:
        ModelError: missing or unreadable model file.
    """
    from facetrain.embed import load_embedder

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        _check_onnx_file(path)
        return PipelineOnnxEmbedder(path, batch_size=batch_size, providers=providers, threads=threads, streams=streams)
    return load_embedder(path, device=device, batch_size=batch_size, backbone=backbone)


class PipelineOnnxEmbedder(BaseEmbedder):
    """An ONNX face model under onnxruntime, set up for throughput beside decoder threads.

    Input ``(B, 3, H, W)`` RGB float32 ``(x - 127.5) / 127.5`` (facetrain's and InsightFace's convention), one
    ``(B, D)`` output. A fixed batch dimension is padded.

    On CPU the cores are split into ``streams``: one session whose ``run`` is called from ``streams`` threads at
    once, each on its own batch with ``threads // streams`` intra-op threads (default: one stream per core, up to 8).
    Whole batches in parallel scale better than one batch split op by op across cores, where every op waits for
    its slowest thread; intra-op threads do not spin while idle, which would take the CPU from the other streams and
    the decoders. PReLUs are decomposed in memory (:func:`facetrain.export.graph.session_model`; exact). On CUDA one
    stream runs with IO binding (input copied to the GPU once, output read back once).

    Args:
        path: the ``.onnx`` file.
        batch_size: images per run (ignored for a fixed batch dimension).
        providers: onnxruntime providers; default CUDA if available, then CPU.
        threads: CPU threads in all (0: every core this process may use).
        streams: concurrent runs on CPU (None: one per thread, at most 8; 1: one batch at a time on all threads).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 64,
        providers: list[str] | None = None,
        threads: int = 0,
        streams: int | None = None,
    ) -> None:
        from facetrain.export.graph import cpu_only, session_model

        ort = require("onnxruntime", "onnx", "running ONNX models")
        self.path = Path(path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        if streams is not None and streams < 1:
            raise ModelError(f"streams must be >= 1, got {streams}")
        gpu = not cpu_only(providers)
        total = int(threads) if threads else _usable_cpus()
        self.streams = 1 if gpu else min(int(streams), total) if streams else min(total, MAX_STREAMS)
        options = ort.SessionOptions()
        if threads or not gpu:
            options.intra_op_num_threads = max(1, total // self.streams)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            model = session_model(self.path, providers)
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for malformed graphs
            raise ModelError(f"cannot load ONNX model {self.path}: {str(exc).splitlines()[0]}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        shape = inp.shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_size = (int(shape[2]), int(shape[3]))
        self.batch_size = self.fixed_batch or int(batch_size)
        self.name = self.path.stem
        self._identity: str | None = None
        self._cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.embedding_size = int(self._embed_batch(np.zeros((1, *self.input_size, 3), np.uint8)).shape[1])

    def warm_up(self, rounds: int = 2) -> None:
        """Run ``rounds`` full batches on every stream at once, so that onnxruntime's memory arena has grown to its
        steady size before timing starts: the first two runs of each concurrent stream take up to 2.5x the steady
        time (iresnet18, batch 32, 2 streams). Optional: without it the first batches of a run pay that cost."""
        zeros = np.zeros((self.batch_size, *self.input_size, 3), np.uint8)
        with ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="facetrain-warm-up") as pool:
            list(pool.map(lambda _: self.embed(zeros), range(self.streams * rounds)))

    @property
    def identity(self) -> str:
        """16 hex digits of the SHA-256 of the file."""
        if self._identity is None:
            from facetrain.embed import file_hash

            self._identity = file_hash(self.path)
        return self._identity

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        x = (batch.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5
        if self.fixed_batch and n < self.fixed_batch:
            x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), np.float32)])
        x = np.ascontiguousarray(x)
        try:
            if self._cuda:
                import onnxruntime as ort

                binding = self.session.io_binding()
                binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
                binding.bind_output(self.output_name, "cuda")
                self.session.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0]
            else:
                out = self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelError(f"{self.path}: inference failed: {str(exc).splitlines()[0]}") from exc
        return np.asarray(out, np.float32).reshape(out.shape[0], -1)[:n]


# -- inputs ----------------------------------------------------------------------------------------------------------


class _FileListSource:
    """Image files with labels; keys are paths relative to ``root``."""

    def __init__(self, files: list[Path], root: Path, description: str, labels: list[int] | None = None) -> None:
        if not files:
            raise DataError(f"{description}: no images found ({', '.join(IMAGE_SUFFIXES)})")
        self.files = files
        self.root = root
        self.labels = labels if labels is not None else [-1] * len(files)
        self.description = description

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        file = self.files[index]
        try:
            return file.relative_to(self.root).as_posix()
        except ValueError:
            return str(file)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        from facetrain.data.images import read_image_file

        return read_image_file(self.files[index]), self.labels[index]


class _FolderSource(_FileListSource):
    """Every image under a folder (recursively, sorted); ``root/<identity>/...`` gives labels by sorted identity."""

    def __init__(self, root: Path) -> None:
        files = sorted(
            (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        identities = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        label_of = {name: i for i, name in enumerate(identities)}
        labels = [label_of.get(p.relative_to(root).parts[0], -1) if p.parent != root else -1 for p in files]
        super().__init__(files, root, f"folder {root.resolve()}", labels)


class _ListSource(_FileListSource):
    """A list file: ``path``, ``path label`` or im2rec's ``index<TAB>label<TAB>path`` per line; ``#`` comments."""

    def __init__(self, list_path: Path) -> None:
        root = list_path.parent
        files, labels = [], []
        for number, raw in enumerate(list_path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else line.rsplit(None, 1)
            try:
                if len(fields) >= 3:  # im2rec .lst: index, label(s), path
                    path, label = fields[-1], int(float(fields[1]))
                elif len(fields) == 2 and _is_int(fields[1]):
                    path, label = fields[0], int(fields[1])
                else:
                    path, label = line, -1
            except ValueError as exc:
                raise DataError(f"{list_path}:{number}: cannot read {raw!r} as 'path [label]'") from exc
            files.append(root / path)
            labels.append(label)
        super().__init__(files, root, f"list {list_path.resolve()}", labels)


class _RecSource:
    """A RecordIO dataset; keys are ``<rec file name>:<record key>``; reads serialized, decodes in parallel."""

    def __init__(self, path: Path) -> None:
        from facetrain.data.recordio import RecordDataset

        self.dataset = RecordDataset(path)
        self._labels = self.dataset.labels()
        self._lock = threading.Lock()
        self.description = f"rec {Path(path).resolve()}"

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> str:
        rec, key = self.dataset.locate(index)
        return f"{Path(rec).name}:{key}"

    def load(self, index: int) -> tuple[np.ndarray, int]:
        from facetrain.data.images import decode_image

        with self._lock:  # one file handle per part: reads must not interleave
            data, _label = self.dataset.encoded(index)
        return decode_image(data, where=f"{self.key(index)}"), int(self._labels[index])


# -- decoding and the pipeline ---------------------------------------------------------------------------------------


class _FaceLoader:
    """Decodes one chunk of items into faces (detect + align first when a detector is set); runs in worker threads."""

    def __init__(self, source, input_size, detector: str | None, detector_kwargs: dict, skip_bad: bool) -> None:
        self.source = source
        self.input_size = tuple(input_size)
        self.detector = detector
        self.detector_kwargs = detector_kwargs
        self.skip_bad = skip_bad
        self._local = threading.local()
        if detector is not None:
            from facetrain.align import build_detector

            build_detector(detector, **detector_kwargs)  # fail early on an unknown name

    def load_chunk(self, task) -> tuple[np.ndarray, list[str], list[int], list[str]]:
        _shard, items = task
        faces, keys, labels, bad = [], [], [], []
        for index in items:
            key = self.source.key(index)
            try:
                image, label = self.source.load(index)
                found = self._faces(image, key)
            except DataError as exc:
                if not self.skip_bad:
                    raise DataError(f"{exc} (pass --skip-bad to list and skip bad images)") from exc
                bad.append(f"{key}: {exc}")
                continue
            for suffix, face in found:
                faces.append(face)
                keys.append(key + suffix)
                labels.append(label)
        h, w = self.input_size
        array = np.stack(faces) if faces else np.zeros((0, h, w, 3), np.uint8)
        return array, keys, labels, bad

    def _faces(self, image: np.ndarray, key: str) -> list[tuple[str, np.ndarray]]:
        h, w = self.input_size
        if self.detector is None:
            if image.shape[:2] != (h, w):
                raise DataError(
                    f"{key}: image is {image.shape[1]}x{image.shape[0]}, expected an aligned {w}x{h} face; "
                    "align first (facetrain align) or pass --detector NAME"
                )
            return [("", image)]
        from facetrain.align import norm_crop

        detector = getattr(self._local, "detector", None)
        if detector is None:
            from facetrain.align import build_detector

            detector = self._local.detector = build_detector(self.detector, **self.detector_kwargs)
        return [
            (f"#{k}", norm_crop(image, face.landmarks, image_size=w)) for k, face in enumerate(detector.detect(image))
        ]


def _prefetch(pool: ThreadPoolExecutor, fn, tasks: list, depth: int) -> Iterator:
    """``map(fn, tasks)`` in order, keeping at most ``depth`` tasks in flight; pending ones are cancelled on exit."""
    pending: deque[Future] = deque()
    it = iter(tasks)
    try:
        for task in it:
            pending.append(pool.submit(fn, task))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        for future in pending:
            future.cancel()


# -- shards, manifest and the merged output --------------------------------------------------------------------------


def _open_partial(partial: Path, manifest: dict) -> None:
    path = partial / "manifest.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != manifest:
            changed = sorted(k for k in manifest if not old or old.get(k) != manifest[k])
            raise DataError(
                f"{partial} holds a partial run with other settings ({', '.join(changed)} differ); "
                "pass --restart to discard it, or use the same model, input and options"
            )
        return
    partial.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())


def _shard_path(partial: Path, shard: int) -> Path:
    return partial / f"shard-{shard:06d}.npz"


def _write_shard(partial: Path, shard: int, chunks: list, embedding_size: int) -> None:
    embeddings = [c[0] for c in chunks if len(c[0])]
    arrays = {
        "embeddings": np.concatenate(embeddings).astype(np.float32)
        if embeddings
        else np.zeros((0, embedding_size), np.float32),
        "ids": np.array([k for c in chunks for k in c[1]], dtype=str),
        "labels": np.array([x for c in chunks for x in c[2]], dtype=np.int64),
        "bad": np.array([b for c in chunks for b in c[3]], dtype=str),
    }
    _atomic_savez(_shard_path(partial, shard), arrays)


def _merge(partial: Path, n_shards: int, out: Path, fmt: str, model_identity: str) -> tuple[int, int, list[str]]:
    embeddings, ids, labels, bad = [], [], [], []
    for shard in range(n_shards):
        with np.load(_shard_path(partial, shard), allow_pickle=False) as data:
            embeddings.append(data["embeddings"])
            ids.extend(data["ids"].tolist())
            labels.append(data["labels"])
            bad.extend(data["bad"].tolist())
    size = max((e.shape[1] for e in embeddings), default=0)
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, size), np.float32)
    label_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == ".npz":
        _atomic_savez(
            out,
            {
                "embeddings": matrix,
                "ids": np.array(ids, dtype=str),
                "labels": label_array,
                "bad_ids": np.array([b.split(": ", 1)[0] for b in bad], dtype=str),
                "model": np.array(model_identity),
            },
        )
    elif fmt == ".npy":
        tsv = "".join(f"{i}\t{lab}\n" for i, lab in zip(ids, label_array.tolist()))
        _atomic_write_bytes(out.with_name(out.stem + ".ids.tsv"), tsv.encode())
        _atomic_write(out, lambda fh: np.save(fh, matrix))
    else:
        pa = require("pyarrow", "parquet", "Parquet output")
        pq = require("pyarrow.parquet", "parquet", "Parquet output")
        flat = pa.array(matrix.reshape(-1), type=pa.float32())
        table = pa.table(
            {
                "id": pa.array(ids, type=pa.string()),
                "label": pa.array(label_array, type=pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, size),
            }
        )
        _atomic_write(out, lambda fh: pq.write_table(table, fh))
    return size, int(matrix.shape[0]), bad


def _atomic_savez(path: Path, arrays: dict) -> None:
    _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def _atomic_write(path: Path, write: Callable) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def _keys_digest(source) -> str:
    digest = hashlib.sha256()
    for index in range(len(source)):
        digest.update(source.key(index).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _check_onnx_file(path: Path) -> None:
    """One-line errors for a file that is not ONNX or does not take (B, 3, H, W) faces."""
    from facetrain.export.onnx import inspect_onnx

    info = inspect_onnx(path)
    shape = info.input_shape
    if len(shape) != 4 or shape[1] != 3:
        raise ModelError(f"{path}: input {info.input_name!r} has shape {shape}; expected (batch, 3, H, W) faces")
    if not info.static_hw:
        raise ModelError(f"{path}: input H, W {shape[2:]} are not fixed; re-export with a static 112x112 input")


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _jsonable(kwargs: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in kwargs.items()}
