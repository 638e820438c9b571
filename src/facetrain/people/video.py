"""Faces in video files: frames sampled every ``interval`` seconds, faces tracked across nearby sampled frames, and
one face stored per track: the box, landmarks and time of its best view (detector score x box side) with the
normalized mean embedding of all its views.

Tracking (:func:`link_tracks`) is greedy association between nearby sampled frames by box position (IoU or centre
distance) **and** embedding similarity, so a cut to another person at the same place starts a new track.
Decoding uses OpenCV's ``VideoCapture`` (FFmpeg in the wheels).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import DataError

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".3gp")
DEFAULT_INTERVAL = 1.0  # seconds between sampled frames
MAX_SAMPLES = 3600  # at most this many sampled frames per video


def is_video(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def sample_frames(path: str | Path, interval: float = DEFAULT_INTERVAL, max_samples: int = MAX_SAMPLES):
    """Yield ``(time_s, rgb_frame)`` every ``interval`` seconds of the video.

    Raises:
        DataError: the file cannot be opened as a video.
    """
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"cannot open video {path}: not a video OpenCV can decode")
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        if not np.isfinite(fps) or fps <= 0:
            fps = 25.0
        step = max(1, round(interval * fps))
        index = 0
        samples = 0
        while samples < max_samples:
            ok = capture.grab()
            if not ok:
                break
            if index % step == 0:
                ok, bgr = capture.retrieve()
                if ok and bgr is not None:
                    yield index / fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    samples += 1
            index += 1
    finally:
        capture.release()


def read_frame(path: str | Path, time_s: float) -> np.ndarray:
    """The RGB frame at ``time_s`` seconds (for thumbnails)."""
    capture = cv2.VideoCapture(str(path))
    try:
        capture.set(cv2.CAP_PROP_POS_MSEC, float(time_s) * 1000.0)
        ok, bgr = capture.read()
    finally:
        capture.release()
    if not ok or bgr is None:
        raise DataError(f"cannot read the frame at {time_s:.2f} s of {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def detect_frames(path: str | Path, detector, *, interval: float = DEFAULT_INTERVAL) -> dict:
    """Detect and align faces in frames sampled every ``interval`` seconds.

    Returns:
        ``shape`` (height, width) of the frames ((0, 0) when none decoded) and, per detection (K of them):
        ``sample`` (K,) int, ``time`` (K,) seconds, ``box`` (K, 4), ``landmarks`` (K, 5, 2), ``score`` (K,),
        ``crop`` (K, 112, 112, 3) uint8.
    """
    from facetrain.align import norm_crop

    out: dict = {"shape": (0, 0), "sample": [], "time": [], "box": [], "landmarks": [], "score": [], "crop": []}
    for sample, (time_s, frame) in enumerate(sample_frames(path, interval)):
        out["shape"] = frame.shape[:2]
        for face in detector.detect(frame):
            out["sample"].append(sample)
            out["time"].append(round(time_s, 3))
            out["box"].append(face.box)
            out["landmarks"].append(face.landmarks)
            out["score"].append(face.score)
            out["crop"].append(norm_crop(frame, face.landmarks))
    return out


def link_tracks(
    samples: np.ndarray,
    boxes: np.ndarray,
    embeddings: np.ndarray,
    *,
    min_iou: float = 0.3,
    min_cosine: float = 0.3,
    max_gap: int = 1,
) -> np.ndarray:
    """Track id per detection: a detection continues the track whose last box it follows (IoU >= ``min_iou`` or a
    centre within half a box side) seen at most ``max_gap`` samples before, with cosine similarity of the
    embeddings >= ``min_cosine`` (so a cut to another person at the same place starts a new track); the most
    similar such track wins, each track takes at most one detection per sample.

    Args:
        samples: (K,) sample index of each detection, non-decreasing.
        boxes: (K, 4) x1, y1, x2, y2.
        embeddings: (K, D) L2-normalized.
    """
    track = np.full(len(samples), -1, np.int64)
    last: dict[int, int] = {}  # track id -> index of its latest detection
    for s in np.unique(samples):
        members = np.flatnonzero(samples == s)
        taken: set[int] = set()
        for i in members:
            best, best_cos = -1, min_cosine
            for t, j in last.items():
                if t in taken or s - samples[j] > max_gap or s == samples[j]:
                    continue
                if _match(boxes[i], boxes[j], min_iou) <= 0:
                    continue
                cos = float(embeddings[i] @ embeddings[j])
                if cos >= best_cos:
                    best, best_cos = t, cos
            if best < 0:
                best = len(last)
            track[i] = best
            last[best] = int(i)
            taken.add(best)
    return track


def _match(box: np.ndarray, last: np.ndarray, min_iou: float) -> float:
    """> 0 when ``box`` continues ``last`` (IoU, or a small bonus for a near centre), else 0."""
    ix = max(0.0, min(box[2], last[2]) - max(box[0], last[0]))
    iy = max(0.0, min(box[3], last[3]) - max(box[1], last[1]))
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (last[2] - last[0]) * (last[3] - last[1]) - inter
    iou = inter / union if union > 0 else 0.0
    if iou >= min_iou:
        return float(iou)
    centre = np.array(
        [(box[0] + box[2]) / 2 - (last[0] + last[2]) / 2, (box[1] + box[3]) / 2 - (last[1] + last[3]) / 2]
    )
    side = min(last[2] - last[0], last[3] - last[1])
    return 0.01 if np.hypot(*centre) < 0.5 * side else 0.0
