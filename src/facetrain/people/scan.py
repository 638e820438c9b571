"""``people scan``: walk a photo tree and store every face (box, landmarks, score, quality, embedding) incrementally.

Per file: unchanged (same size + mtime, or same content hash) is skipped; a new path whose hash matches a photo that
vanished is a move (the photo row, and so its faces, keeps its identity); photos gone from the tree are pruned.
New or changed photos are decoded (EXIF orientation applied), detected, aligned with the ArcFace 5-point template
and embedded in batches; each batch of photos is committed in one transaction, so a killed scan resumes where it
stopped. Unreadable files are recorded with status ``error``, never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import DataError, FacetrainError

from .library import Library, make_detector
from .video import detect_frames, is_video, link_tracks

logger = logging.getLogger(__name__)

MAX_PIXELS = 200_000_000  # larger photos are recorded as errors instead of exhausting memory


@dataclass
class ScanSummary:
    """What a scan did."""

    seen: int = 0
    skipped: int = 0
    moved: int = 0
    processed: int = 0
    pruned: int = 0
    errors: int = 0
    faces: int = 0
    seconds: float = 0.0
    error_files: list[str] = field(default_factory=list)

    @property
    def photos_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PhotoAnalysis:
    """One photo after decode + detect + align (what a worker returns)."""

    path: str
    sha256: str
    size: int
    mtime: float
    width: int = 0
    height: int = 0
    error: str | None = None
    taken_at: str | None = None
    gps: tuple[float, float] | None = None
    boxes: np.ndarray | None = None  # (F, 4)
    landmarks: np.ndarray | None = None  # (F, 5, 2)
    scores: np.ndarray | None = None  # (F,)
    crops: np.ndarray | None = None  # (F, 112, 112, 3) uint8
    attr_crops: np.ndarray | None = None  # (F, S, S, 3) uint8 gender/age crops, when the library has that model
    kind: str = "photo"
    frame_times: np.ndarray | None = None  # videos: (F,) seconds of each detection
    samples: np.ndarray | None = None  # videos: (F,) sampled-frame index of each detection


def scan(
    lib: Library,
    folder: str | os.PathLike,
    *,
    workers: int = 0,
    batch_photos: int = 8,
    progress: bool | None = None,
    prune: bool = True,
    videos: bool = True,
    video_interval: float = 1.0,
) -> ScanSummary:
    """Scan ``folder`` into the library (see the module docstring).

    Args:
        lib: an open library.
        folder: photo tree root.
        workers: processes for decoding + detection (0: in this process).
        batch_photos: photos per embedder batch and per committed transaction.
        progress: show a tqdm bar (default: when stderr is a TTY).
        prune: delete photos under ``folder`` that no longer exist.
        videos: also scan video files (one face per track, see :mod:`.video`).
        video_interval: seconds between sampled video frames.

    Returns:
        A :class:`ScanSummary`.
    """
    start = time.perf_counter()
    root = Path(folder).resolve()
    files = list_media(root, videos=videos)
    summary = ScanSummary(seen=len(files))
    embedder = lib.embedder()
    with lib.writer():
        prefix = f"{root}{os.sep}"
        known = {  # LIKE narrows the rows; startswith drops paths where '_' / '%' in the root matched as wildcards
            row[0]: row[1:]
            for row in lib.conn.execute(
                "SELECT path, id, size, mtime, sha256 FROM photos WHERE path LIKE ?", (prefix + "%",)
            )
            if row[0].startswith(prefix)
        }
        todo: list[tuple[str, str | None]] = []  # (path, sha or None)
        new_files: list[tuple[str, os.stat_result]] = []
        walked = set()
        for path in files:
            key = str(path)
            walked.add(key)
            try:
                st = path.stat()
            except OSError:
                continue
            if key in known:
                pid, size, mtime, sha = known[key]
                if size == st.st_size and mtime == st.st_mtime:
                    summary.skipped += 1
                    continue
                digest = file_sha256(path)
                if digest == sha:
                    with lib.transaction() as conn:
                        conn.execute(
                            "UPDATE photos SET size = ?, mtime = ? WHERE id = ?", (st.st_size, st.st_mtime, pid)
                        )
                    summary.skipped += 1
                else:
                    todo.append((key, digest))
            else:
                new_files.append((key, st))
        missing = {known[p][3]: p for p in known if p not in walked}
        for key, st in new_files:
            digest = file_sha256(Path(key))
            old = missing.pop(digest, None)
            old_id = known[old][0] if old else None
            if old_id is None:  # moved in from another folder of the library whose file is gone
                for pid, path in lib.conn.execute("SELECT id, path FROM photos WHERE sha256 = ?", (digest,)):
                    if not path.startswith(prefix) and not os.path.exists(path):
                        old, old_id = path, pid
                        break
            if old_id is not None:
                with lib.transaction() as conn:
                    conn.execute(
                        "UPDATE photos SET path = ?, size = ?, mtime = ? WHERE id = ?",
                        (key, st.st_size, st.st_mtime, old_id),
                    )
                summary.moved += 1
                logger.info("moved: %s -> %s", old, key)
            else:
                todo.append((key, digest))
        if prune and missing:
            with lib.transaction() as conn:
                conn.executemany("DELETE FROM photos WHERE path = ?", [(p,) for p in missing.values()])
                lib.bump()
            summary.pruned = len(missing)
        if todo:
            _process(lib, todo, embedder, workers, batch_photos, progress, summary, video_interval)
    summary.seconds = time.perf_counter() - start
    return summary


def _process(lib, todo, embedder, workers, batch_photos, progress, summary, video_interval=1.0) -> None:
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(todo), unit="photo", desc="scan", disable=not show)
    batch: list[PhotoAnalysis] = []
    try:
        for result in _analyses(lib, todo, workers, video_interval):
            batch.append(result)
            bar.update(1)
            if len(batch) >= batch_photos:
                _commit(lib, batch, embedder, summary)
                bar.set_postfix(faces=summary.faces, errors=summary.errors)
                batch = []
        if batch:
            _commit(lib, batch, embedder, summary)
    finally:
        bar.close()


def _analyses(lib: Library, todo: list[tuple[str, str | None]], workers: int, video_interval: float = 1.0):
    from .attributes import attributes_for

    name, path = lib.get("detector"), lib.get("detector_path") or None
    attr_size = attributes_for(lib).genderage_size
    if workers and workers > 0 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # onnxruntime sessions are not fork-safe
        initargs = (name, path, video_interval, attr_size)
        with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
            yield from pool.imap(_worker_task, todo, chunksize=1)
    else:
        _WORKER["detector"] = lib.detector()
        _WORKER["video_interval"] = video_interval
        _WORKER["attr_size"] = attr_size
        for task in todo:
            yield _worker_task(task)


_WORKER: dict = {}


def _init_worker(name: str, path: str | None, video_interval: float, attr_size: int | None = None) -> None:
    # An initializer that raises makes multiprocessing.Pool respawn the worker forever; the failure is kept and
    # raised by the first task instead, which stops the scan with that one line.
    cv2.setNumThreads(1)
    _WORKER["video_interval"] = video_interval
    _WORKER["attr_size"] = attr_size
    try:
        _WORKER["detector"] = make_detector(name, path, num_threads=1)
    except Exception as exc:
        _WORKER["start_error"] = f"a scan worker could not start: detector {name} ({path or 'built in'}): {exc}"


class WorkerStartError(FacetrainError):
    """A scan worker process could not build its detector."""


def _worker_task(task: tuple[str, str | None]) -> PhotoAnalysis:
    if "start_error" in _WORKER:
        raise WorkerStartError(_WORKER["start_error"])
    path, digest = task
    try:
        return analyze_media(
            Path(path),
            _WORKER["detector"],
            sha256=digest,
            video_interval=_WORKER["video_interval"],
            attr_size=_WORKER.get("attr_size"),
        )
    except Exception as exc:  # one bad photo must never end a long scan; it is recorded
        logger.debug("failed on %s", path, exc_info=True)
        st = _safe_stat(path)
        return PhotoAnalysis(path, digest or "", st[0], st[1], error=f"{type(exc).__name__}: {exc}"[:300])


def list_media(root: str | os.PathLike, *, videos: bool = True) -> list[Path]:
    """Photos (and, with ``videos``, video files) under ``root``, recursive, sorted, hidden entries skipped."""
    from facetrain.align import list_photos

    found = list_photos(root)
    if videos:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(folder) / n for n in names if not n.startswith(".") and is_video(n))
    return sorted(found)


def analyze_media(
    path: Path,
    detector,
    *,
    sha256: str | None = None,
    video_interval: float = 1.0,
    attr_size: int | None = None,
) -> PhotoAnalysis:
    """:func:`analyze_photo` for photos; for videos, one face per track (see :mod:`.video`)."""
    if not is_video(path):
        return analyze_photo(path, detector, sha256=sha256, attr_size=attr_size)
    st = path.stat()
    result = PhotoAnalysis(str(path), sha256 or file_sha256(path), st.st_size, st.st_mtime, kind="video")
    try:
        found = detect_frames(path, detector, interval=video_interval)
    except DataError as exc:
        result.error = str(exc)
        return result
    result.height, result.width = found["shape"]
    if result.width == 0:
        result.error = f"no frame of {path} could be decoded"
        return result
    if found["box"]:
        result.boxes = np.stack(found["box"]).astype(np.float32)
        result.landmarks = np.stack(found["landmarks"]).astype(np.float32)
        result.scores = np.array(found["score"], np.float32)
        result.crops = np.stack(found["crop"])
        result.frame_times = np.array(found["time"], np.float64)
        result.samples = np.array(found["sample"], np.int64)
    return result


def analyze_photo(path: Path, detector, *, sha256: str | None = None, attr_size: int | None = None) -> PhotoAnalysis:
    """Decode one photo (EXIF orientation), detect, align to 112x112 (and, with ``attr_size``, the gender/age crops
    of :func:`.attributes.crop_for_genderage`); decode errors become ``error``, not raises."""
    from facetrain.align import decode_image, norm_crop

    st = path.stat()
    data = path.read_bytes()
    digest = sha256 or hashlib.sha256(data).hexdigest()
    result = PhotoAnalysis(str(path), digest, st.st_size, st.st_mtime)
    try:
        pixels = _pixel_count(data)
        if pixels and pixels > MAX_PIXELS:
            raise DataError(f"{path} has {pixels / 1e6:.0f} megapixels, more than the {MAX_PIXELS / 1e6:.0f} allowed")
        image = decode_image(data, source=str(path))
    except DataError as exc:
        result.error = str(exc)
        return result
    result.height, result.width = image.shape[:2]
    result.taken_at, result.gps = exif_date_gps(data)
    faces = detector.detect(image)
    if faces:
        result.boxes = np.stack([f.box for f in faces]).astype(np.float32)
        result.landmarks = np.stack([f.landmarks for f in faces]).astype(np.float32)
        result.scores = np.array([f.score for f in faces], np.float32)
        result.crops = np.stack([norm_crop(image, f.landmarks) for f in faces])
        if attr_size:
            from .attributes import crop_for_genderage

            result.attr_crops = crop_for_genderage(image, result.boxes, attr_size)
    return result


def _commit(lib: Library, batch: list[PhotoAnalysis], embedder, summary: ScanSummary) -> None:
    from .attributes import attributes_for, place_name

    attributes = attributes_for(lib)
    crops = [r.crops for r in batch if r.crops is not None]
    if crops:
        emb = embedder.embed(np.concatenate(crops)).astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    places = {r.path: place_name(*r.gps) for r in batch if r.gps}
    offset = 0
    now = time.time()
    with lib.transaction() as conn:
        for r in batch:
            conn.execute("DELETE FROM photos WHERE path = ?", (r.path,))
            status = "error" if r.error else ("ok" if r.crops is not None else "no_faces")
            cur = conn.execute(
                "INSERT INTO photos (path, size, mtime, sha256, width, height, status, error, taken_at, gps_lat, "
                "gps_lon, scanned_at, kind, place, country) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.path, r.size, r.mtime, r.sha256, r.width, r.height, status, r.error, r.taken_at,
                    r.gps[0] if r.gps else None, r.gps[1] if r.gps else None, now, r.kind,
                    *(places.get(r.path) or (None, None)),
                ),
            )  # fmt: skip
            if r.error:
                summary.errors += 1
                summary.error_files.append(r.path)
            summary.processed += 1
            if r.crops is None:
                continue
            vectors = emb[offset : offset + len(r.crops)]
            offset += len(r.crops)
            attrs = attributes.rows(r.crops, r.attr_crops)
            rows = [(cur.lastrowid, k, *face) for k, face in enumerate(_face_rows(r, vectors, attrs))]
            conn.executemany(
                "INSERT INTO faces (photo_id, idx, x1, y1, x2, y2, landmarks, det_score, blur, size, embedding, "
                "frame_time, track_frames, expression, expression_p, gender, age) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            summary.faces += len(rows)
        lib.bump()


def _face_rows(r: PhotoAnalysis, vectors: np.ndarray, attrs: list[tuple] | None = None) -> list[tuple]:
    """(x1, y1, x2, y2, landmarks, score, blur, size, embedding, frame_time, track_frames, expression,
    expression_p, gender, age) per stored face; for a video one per track: its best view (score x box side) with
    the normalized mean embedding of the track, and the attributes of that view."""
    sides = np.minimum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1])
    if r.samples is None:
        groups = [np.array([i]) for i in range(len(r.crops))]
    else:
        tracks = link_tracks(r.samples, r.boxes, vectors)
        groups = [np.flatnonzero(tracks == t) for t in np.unique(tracks)]
    rows = []
    for members in groups:
        i = int(members[np.argmax(r.scores[members] * sides[members])])
        vector = vectors[members].mean(axis=0)
        vector = (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)
        rows.append(
            (
                *map(float, r.boxes[i]), r.landmarks[i].tobytes(), float(r.scores[i]), blur_score(r.crops[i]),
                float(sides[i]), vector.tobytes(),
                None if r.frame_times is None else float(r.frame_times[i]),
                None if r.samples is None else len(members),
                *(attrs[i] if attrs is not None else (None, None, None, None)),
            )
        )  # fmt: skip
    if r.frame_times is not None:
        rows.sort(key=lambda row: (row[9], row[0]))
    return rows


def blur_score(crop: np.ndarray) -> float:
    """Sharpness of an aligned face: variance of the Laplacian of its grey image (low = blurry; under ~60 is soft)."""
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_stat(path: str) -> tuple[int, float]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime
    except OSError:
        return 0, 0.0


def _pixel_count(data: bytes) -> int | None:
    """Width x height from a PNG / JPEG header without decoding (None when unknown)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w * h
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 < len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return w * h
            pos += 2 + length
    return None


# ---- EXIF date and GPS -------------------------------------------------------------------------------------------
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8}


def exif_date_gps(data: bytes) -> tuple[str | None, tuple[float, float] | None]:
    """EXIF DateTimeOriginal (or DateTime) as ``YYYY-MM-DDTHH:MM:SS`` and GPS (lat, lon) in signed degrees.

    Reads the TIFF structure directly (IFD0 -> Exif IFD 0x8769 / GPS IFD 0x8825); anything malformed gives None.
    """
    from facetrain.align.exif import _find_exif_block

    try:
        tiff = _find_exif_block(data)
        if not tiff:
            return None, None
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd0 = _read_ifd(tiff, endian, struct.unpack(endian + "I", tiff[4:8])[0])
        date = None
        if 0x8769 in ifd0:
            exif = _read_ifd(tiff, endian, int(ifd0[0x8769][0]))
            date = exif.get(0x9003) or exif.get(0x9004)
        date = date or ifd0.get(0x0132)
        if isinstance(date, str) and len(date) >= 19:
            date = f"{date[:4]}-{date[5:7]}-{date[8:10]}T{date[11:19]}"
        else:
            date = None
        gps = None
        if 0x8825 in ifd0:
            g = _read_ifd(tiff, endian, int(ifd0[0x8825][0]))
            if 2 in g and 4 in g:
                lat = _dms(g[2]) * (-1 if str(g.get(1, "N")).upper().startswith("S") else 1)
                lon = _dms(g[4]) * (-1 if str(g.get(3, "E")).upper().startswith("W") else 1)
                gps = (round(lat, 7), round(lon, 7))
        return date, gps
    except Exception:  # malformed EXIF is common; it only loses the date / place
        logger.debug("unreadable EXIF", exc_info=True)
        return None, None


def _dms(values) -> float:
    d, m, s = (list(values) + [0.0, 0.0, 0.0])[:3]
    return float(d) + float(m) / 60.0 + float(s) / 3600.0


def _read_ifd(tiff: bytes, endian: str, offset: int) -> dict:
    (count,) = struct.unpack(endian + "H", tiff[offset : offset + 2])
    out = {}
    for k in range(count):
        entry = tiff[offset + 2 + 12 * k : offset + 14 + 12 * k]
        tag, kind, n = struct.unpack(endian + "HHI", entry[:8])
        size = _TYPE_SIZES.get(kind)
        if size is None:
            continue
        raw = entry[8:12] if size * n <= 4 else tiff[struct.unpack(endian + "I", entry[8:12])[0] :][: size * n]
        if kind == 2:
            out[tag] = raw.split(b"\x00", 1)[0].decode("ascii", "replace").strip()
        elif kind in (5, 10):
            fmt = endian + ("I" if kind == 5 else "i") * (2 * n)
            parts = struct.unpack(fmt, raw[: 8 * n])
            out[tag] = [parts[2 * i] / parts[2 * i + 1] if parts[2 * i + 1] else 0.0 for i in range(n)]
        elif kind in (3, 4, 9):
            fmt = {3: "H", 4: "I", 9: "i"}[kind]
            out[tag] = list(struct.unpack(endian + fmt * n, raw[: size * n]))
    return out


def scan_files(lib: Library, paths: list[Path]) -> ScanSummary:
    """Add single photos (not a whole tree) to the library; already-known paths are left as they are."""
    start = time.perf_counter()
    summary = ScanSummary(seen=len(paths))
    embedder = lib.embedder()
    with lib.writer():
        todo = []
        for path in paths:
            key = str(Path(path).resolve())
            if lib.conn.execute("SELECT 1 FROM photos WHERE path = ?", (key,)).fetchone():
                summary.skipped += 1
            elif not Path(key).is_file():
                raise DataError(f"photo not found: {path}")
            else:
                todo.append((key, None))
        if todo:
            _process(lib, todo, embedder, 0, 8, False, summary)
    summary.seconds = time.perf_counter() - start
    return summary
