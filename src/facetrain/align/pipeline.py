"""Photos -> aligned 112x112 faces: ``align_folder(src, dst, ...)``.

``src`` is ``root/<identity>/<photo>`` or a flat folder (any depth works: the relative folder is kept). Each photo
is read upright (EXIF), faces are detected, one or all faces are chosen (``multi``), each is warped with
:func:`~facetrain.align.template.norm_crop` and written as ``dst/<relative folder>/<stem>.png`` (``<stem>_f<i>.png``
with ``multi="all"``), atomically. Photos with no face or that cannot be read are listed in
``dst/align_report.json`` and ``dst/align_report.csv``, never silently dropped. A run can be interrupted and
started again: finished photos are recorded in ``dst/.facetrain_align.jsonl`` and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import DataError

from .detectors import DEFAULT_DETECTOR, Detector, Face, build_detector
from .exif import IMAGE_SUFFIXES, read_image
from .template import norm_crop, template_for_size

logger = logging.getLogger(__name__)

MULTI_POLICIES = ("largest", "central", "all")
STATE_FILE = ".facetrain_align.jsonl"
SETTINGS_FILE = ".facetrain_align.json"
REPORT_JSON = "align_report.json"
REPORT_CSV = "align_report.csv"


@dataclass
class PhotoResult:
    """What happened to one photo.

    Attributes:
        photo: path relative to the source root (POSIX separators).
        status: ``"ok"``, ``"no_face"`` or ``"error"``.
        detected: faces the detector found.
        outputs: written crops, relative to the destination root.
        detail: the error message, for ``"error"``.
    """

    photo: str
    status: str
    detected: int = 0
    outputs: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class AlignSummary:
    """Totals of an ``align_folder`` run (``skipped`` were already done by an earlier run)."""

    photos: int
    processed: int
    skipped: int
    faces: int
    misses: int
    errors: int
    multi_face: int
    seconds: float
    report: str
    rec: dict | None = None


def align_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    detector: str = DEFAULT_DETECTOR,
    detector_kwargs: dict | None = None,
    multi: str = "largest",
    image_size: int = 112,
    workers: int = 0,
    progress: bool | None = None,
    write_rec: bool = False,
) -> AlignSummary:
    """Detect and align every photo under ``src`` into ``dst``.

    Args:
        src: photo folder (``root/<identity>/<photo>`` or flat).
        dst: output folder (created); may hold a previous, interrupted run with the same settings.
        detector: detector name (see :func:`~facetrain.align.detectors.list_detectors`).
        detector_kwargs: keyword arguments of the detector (``model_path``, ``score_threshold``, ``max_side``...).
        multi: several faces in a photo: ``"largest"`` box, the most ``"central"`` one, or ``"all"``.
        image_size: side of the aligned crops (multiple of 112 or 128).
        workers: processes; 0 runs in this process.
        progress: show a tqdm bar; default when stderr is a terminal.
        write_rec: also pack the crops into ``dst/train.rec`` / ``train.idx`` / ``property``, labels by the sorted
            first-level folder names (needs ``root/<identity>/<photo>``).

    Returns:
        The run's :class:`AlignSummary`; the full per-photo list is in ``dst/align_report.json``.

    Raises:
        DataError: ``src`` missing or without photos, or ``dst`` holds a run with other settings.
    """
    if multi not in MULTI_POLICIES:
        raise DataError(f"--multi must be one of {', '.join(MULTI_POLICIES)}, got {multi!r}")
    try:
        template_for_size(image_size)
    except ValueError as exc:
        raise DataError(f"--size: {exc}") from exc
    # build once here so a wrong name or weight file fails now with one line, not inside every worker
    first_detector = build_detector(detector, **(detector_kwargs or {}))
    src, dst = Path(src), Path(dst)
    photos = list_photos(src, exclude=dst)
    if not photos:
        raise DataError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) found under {src}")
    dst.mkdir(parents=True, exist_ok=True)
    settings = {"detector": detector, "detector_kwargs": _jsonable(detector_kwargs or {}), "multi": multi}
    settings["image_size"] = image_size
    _check_settings(dst, json.loads(json.dumps(settings)))
    done = _load_state(dst)
    names = output_stems(photos, src)
    todo = [p for p in photos if not _is_done(done.get(_rel(p, src)), dst)]
    started = time.perf_counter()
    results: dict[str, PhotoResult] = {k: v for k, v in done.items() if v.status != "error"}
    tasks = [(str(p), _rel(p, src), names[p]) for p in todo]
    show = sys.stderr.isatty() if progress is None else progress
    with open(dst / STATE_FILE, "a", encoding="utf-8") as state:
        run = _run_tasks(tasks, dst, first_detector, detector, detector_kwargs or {}, multi, image_size, workers, show)
        for result in run:
            results[result.photo] = result
            state.write(json.dumps(asdict(result)) + "\n")
            state.flush()
    elapsed = time.perf_counter() - started
    ordered = [results[_rel(p, src)] for p in photos if _rel(p, src) in results]
    summary = AlignSummary(
        photos=len(photos),
        processed=len(todo),
        skipped=len(photos) - len(todo),
        faces=sum(len(r.outputs) for r in ordered),
        misses=sum(r.status == "no_face" for r in ordered),
        errors=sum(r.status == "error" for r in ordered),
        multi_face=sum(r.detected > 1 for r in ordered),
        seconds=round(elapsed, 3),
        report=str(dst / REPORT_JSON),
    )
    if write_rec:
        summary.rec = pack_rec(dst, [o for r in ordered for o in r.outputs])
    _write_report(dst, summary, ordered)
    return summary


def align_photo(
    image_rgb: np.ndarray, detector: Detector, *, multi: str = "largest", image_size: int = 112
) -> tuple[list[np.ndarray], list[Face]]:
    """Aligned crops (image_size, image_size, 3) RGB of the chosen faces of one photo, and all detected faces."""
    faces = detector.detect(image_rgb)
    chosen = select_faces(faces, image_rgb.shape[:2], multi)
    return [norm_crop(image_rgb, face.landmarks, image_size) for face in chosen], faces


def select_faces(faces: list[Face], image_hw: tuple[int, int], multi: str) -> list[Face]:
    """The faces kept by a policy: ``largest`` box, most ``central`` box centre, or ``all`` (left to right)."""
    if not faces:
        return []
    if multi == "all":
        return sorted(faces, key=lambda f: float(f.box[0]))
    if multi == "largest":
        return [max(faces, key=lambda f: f.area)]
    if multi == "central":
        centre = np.array([image_hw[1] / 2, image_hw[0] / 2])
        return [min(faces, key=lambda f: float(np.linalg.norm(f.center - centre)))]
    raise DataError(f"multi-face policy must be one of {', '.join(MULTI_POLICIES)}, got {multi!r}")


def list_photos(root: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, hidden entries skipped; ``exclude``: a folder to leave out,
    e.g. the output folder when it lies inside the photo folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"photo folder not found: {root}")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (skip is None or (Path(folder) / d).resolve() != skip)
        )
        found.extend(Path(folder) / f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)


def output_stems(photos: list[Path], root: Path) -> dict[Path, str]:
    """Output path stem (relative, no suffix) per photo; photos sharing a stem in one folder keep their extension."""
    stems: dict[Path, str] = {}
    seen: dict[str, int] = {}
    for photo in photos:
        key = (photo.relative_to(root).parent / photo.stem).as_posix()
        seen[key] = seen.get(key, 0) + 1
    for photo in photos:
        key = (photo.relative_to(root).parent / photo.stem).as_posix()
        stems[photo] = key if seen[key] == 1 else f"{key}_{photo.suffix.lstrip('.').lower()}"
    return stems


def pack_rec(dst: Path, outputs: list[str]) -> dict:
    """Pack aligned crops ``dst/<identity>/*.png`` into ``dst/train.rec`` (labels = sorted identity folders)."""
    from facetrain.data.recordio import write_rec_dataset

    with_identity = [o for o in outputs if "/" in o]
    if not with_identity or len(with_identity) != len(outputs):
        raise DataError(f"--rec needs photos laid out as <src>/<identity>/<photo>; {dst} has crops outside folders")
    identities = sorted({o.split("/", 1)[0] for o in outputs})
    label = {name: i for i, name in enumerate(identities)}
    ordered = sorted(outputs, key=lambda o: (label[o.split("/", 1)[0]], o))
    # the .rec holds the PNG bytes as written (lossless); readers decode any image format
    samples = (((dst / o).read_bytes(), label[o.split("/", 1)[0]]) for o in ordered)
    return write_rec_dataset(dst, samples, num_classes=len(identities))


def _run_tasks(
    tasks, dst, detector, detector_name, detector_kwargs, multi, image_size, workers, show
) -> Iterator[PhotoResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="photo", disable=not show, desc="align")
    try:
        if workers and workers > 0 and len(tasks) > 1:
            context = multiprocessing.get_context("spawn")  # onnxruntime and torch are not fork-safe
            del detector  # each worker builds its own (sessions cannot be pickled)
            init = (detector_name, detector_kwargs, multi, image_size, str(dst), True)
            with context.Pool(workers, initializer=_init_worker, initargs=init) as pool:
                for result in pool.imap_unordered(_worker_task, tasks, chunksize=1):
                    bar.update(1)
                    yield result
        else:
            _WORKER.update(detector=detector, multi=multi, image_size=image_size, dst=Path(dst))
            for task in tasks:
                result = _worker_task(task)
                bar.update(1)
                yield result
    finally:
        bar.close()


_WORKER: dict = {}


def _init_worker(detector_name, detector_kwargs, multi, image_size, dst, single_thread) -> None:
    kwargs = dict(detector_kwargs)
    if single_thread:  # N workers x 1 thread beats N x all-cores oversubscription
        cv2.setNumThreads(1)
        if detector_name in ("retinaface", "scrfd"):
            kwargs.setdefault("num_threads", 1)
        if detector_name == "mtcnn":
            import torch

            torch.set_num_threads(1)
    _WORKER.update(detector=build_detector(detector_name, **kwargs), multi=multi, image_size=image_size, dst=Path(dst))


def _worker_task(task: tuple[str, str, str]) -> PhotoResult:
    path, rel, stem = task
    try:
        image = read_image(path)
        crops, faces = align_photo(image, _WORKER["detector"], multi=_WORKER["multi"], image_size=_WORKER["image_size"])
    except DataError as exc:
        return PhotoResult(rel, "error", detail=str(exc))
    except Exception as exc:  # one bad photo must not end a long run; the report names it
        logger.debug("failed on %s", path, exc_info=True)
        return PhotoResult(rel, "error", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if not crops:
        return PhotoResult(rel, "no_face", detected=0)
    outputs = []
    for i, crop in enumerate(crops):
        name = f"{stem}_f{i}.png" if _WORKER["multi"] == "all" else f"{stem}.png"
        write_png(_WORKER["dst"] / name, crop)
        outputs.append(name)
    return PhotoResult(rel, "ok", detected=len(faces), outputs=outputs)


def write_png(path: Path, image_rgb: np.ndarray) -> None:
    """Write an RGB image as PNG atomically (temporary name, then ``os.replace``)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"cannot encode {path} as PNG")
    _atomic_write(path, encoded.tobytes())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_done(result: PhotoResult | None, dst: Path) -> bool:
    if result is None or result.status == "error":
        return False
    return all((dst / o).is_file() for o in result.outputs)


def _load_state(dst: Path) -> dict[str, PhotoResult]:
    done: dict[str, PhotoResult] = {}
    path = dst / STATE_FILE
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            done[record["photo"]] = PhotoResult(**record)
        except (ValueError, TypeError, KeyError):
            continue  # a line cut by an interruption; that photo is simply redone
    return done


def _check_settings(dst: Path, settings: dict) -> None:
    path = dst / SETTINGS_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous is not None and previous != settings:
            raise DataError(
                f"{dst} holds an align run with other settings ({previous}); use a new output folder or delete it"
            )
    _atomic_write(path, json.dumps(settings, indent=1).encode())


def _write_report(dst: Path, summary: AlignSummary, results: list[PhotoResult]) -> None:
    problems = [r for r in results if r.status != "ok" or r.detected > 1]
    report = {"summary": asdict(summary), "problems": [asdict(r) for r in problems]}
    _atomic_write(dst / REPORT_JSON, json.dumps(report, indent=1).encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["photo", "status", "detected", "outputs", "detail"])
    for r in problems:
        writer.writerow([r.photo, r.status, r.detected, ";".join(r.outputs), r.detail])
    _atomic_write(dst / REPORT_CSV, buffer.getvalue().encode())


def _jsonable(kwargs: dict) -> dict:
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in kwargs.items()}


def draw_faces(image_rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A copy of the photo with each face's box, index, score and numbered landmarks 1..5 drawn on it."""
    canvas = np.ascontiguousarray(image_rgb.copy())
    side = max(canvas.shape[:2])
    thickness = max(1, round(side / 600))
    font = max(0.4, side / 1600)
    colours = [(255, 0, 0), (0, 160, 255), (0, 220, 0), (255, 0, 255), (255, 200, 0)]  # eyes, nose, mouth corners
    for index, face in enumerate(faces):
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (255, 255, 0), thickness)
        label = f"#{index} {face.score:.2f}"
        cv2.putText(
            canvas,
            label,
            (x1, max(0, y1 - 4 * thickness)),
            cv2.FONT_HERSHEY_SIMPLEX,
            font,
            (255, 255, 0),
            thickness,
            cv2.LINE_AA,
        )
        radius = max(2, int(round((x2 - x1) / 40)))
        for k, (x, y) in enumerate(face.landmarks):
            centre = (int(round(x)), int(round(y)))
            cv2.circle(canvas, centre, radius, colours[k], -1, cv2.LINE_AA)
            cv2.putText(
                canvas,
                str(k + 1),
                (centre[0] + radius + 1, centre[1] - radius),
                cv2.FONT_HERSHEY_SIMPLEX,
                font * 0.8,
                colours[k],
                thickness,
                cv2.LINE_AA,
            )
    return canvas
