"""The people library: one SQLite file (WAL mode, versioned schema) holding photos, faces, people and clusters.

Tables: ``meta`` (key/value: schema version, detector, embedder path + weights identity, thresholds),
``photos`` (path, size, mtime, sha256, status, EXIF date/GPS, caption), ``faces`` (box, 5 landmarks, detector score,
quality, float32 embedding blob, person / cluster assignment), ``people`` and ``clusters``.

Concurrency: SQLite in WAL mode lets readers run beside one writer; long writers (scan, cluster) also hold an
exclusive ``flock`` on ``LIB.lock`` so a second one fails at once with "library is busy" instead of waiting; short
writes wait up to ``busy_timeout`` and then fail with the same message. Every photo is committed with all its faces
in one transaction, so a killed scan leaves a consistent library.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from facetrain.errors import ConfigError, DataError, FacetrainError, ModelError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SFACE_IDENTITY = "fb143eea07838aa5"  # 16 hex of sha256 of face_recognition_sface_2021dec_int8bq.onnx
# Documented default thresholds (cosine, "same person iff cos >= t"): SFace's from opencv_zoo; for other models a
# conservative ArcFace-family value. Calibrate on your own pairs (`facetrain eval calibrate`) and set it.
DEFAULT_THRESHOLDS = {"sface": 0.363, "default": 0.30}
DEFAULT_UNSURE_MARGIN = 0.05
DEFAULT_CLUSTER_THRESHOLD = {"sface": 0.50, "default": 0.45}
DEFAULT_MIN_FACES = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    kind TEXT NOT NULL DEFAULT 'photo',  -- photo | video
    status TEXT NOT NULL,            -- ok | no_faces | error
    error TEXT,
    taken_at TEXT,
    gps_lat REAL,
    gps_lon REAL,
    caption TEXT,
    scanned_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_sha ON photos(sha256);
CREATE TABLE IF NOT EXISTS people (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clusters (id INTEGER PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY,
    photo_id INTEGER NOT NULL REFERENCES photos(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    landmarks BLOB NOT NULL,         -- (5, 2) float32
    det_score REAL NOT NULL,
    blur REAL NOT NULL,              -- variance of the Laplacian of the aligned crop
    size REAL NOT NULL,              -- shorter box side in pixels
    embedding BLOB,                  -- (D,) float32, L2-normalized; NULL once forgotten
    person_id INTEGER REFERENCES people(id) ON DELETE SET NULL,
    assignment TEXT,                 -- reference | manual | auto | unsure | NULL
    similarity REAL,
    cluster_id INTEGER REFERENCES clusters(id) ON DELETE SET NULL,
    is_core INTEGER NOT NULL DEFAULT 0,
    not_face INTEGER NOT NULL DEFAULT 0,
    forgotten INTEGER NOT NULL DEFAULT 0,
    frame_time REAL,                 -- videos: seconds into the video of the view kept
    track_frames INTEGER             -- videos: sampled frames the face was tracked over
);
CREATE INDEX IF NOT EXISTS faces_photo ON faces(photo_id);
CREATE INDEX IF NOT EXISTS faces_person ON faces(person_id);
CREATE INDEX IF NOT EXISTS faces_cluster ON faces(cluster_id);
"""


# Columns added after schema 1 was released: added on open (NULL = not computed), so older libraries keep working.
_ADDED_COLUMNS = {
    "faces": {"expression": "TEXT", "expression_p": "REAL", "gender": "TEXT", "age": "REAL"},
    "photos": {"place": "TEXT", "country": "TEXT"},
}


def _add_columns(conn: sqlite3.Connection) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if name not in have:
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


class LibraryBusyError(FacetrainError):
    """Another process holds the library for writing."""


class Library:
    """An open people library.

    Args:
        path: the SQLite file.
        busy_timeout: seconds a write waits for another writer before "library is busy".
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"people library {self.path} does not exist; create it with: facetrain people init {path}")
        self.conn = _connect(self.path, busy_timeout)
        version = self.get("schema_version")
        if version is None:
            raise DataError(f"{self.path} is not a facetrain people library (no schema_version); run people init")
        if int(version) != SCHEMA_VERSION:
            raise DataError(
                f"{self.path} has people schema version {version}, this facetrain reads {SCHEMA_VERSION}; "
                "upgrade facetrain or re-create the library"
            )
        _add_columns(self.conn)
        self._embedder = None
        self._detector = None

    # ---- creation -------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        model: str | os.PathLike | None = None,
        detector: str | None = None,
        threshold: float | None = None,
    ) -> Library:
        """Create a library recording the detector and the embedder (with its weights' identity).

        Args:
            path: the new SQLite file (must not exist).
            model: recognition ONNX / checkpoint, or an InsightFace pack folder (det_10g.onnx + w600k_r50.onnx);
                None: the built-in SFace (``facetrain[people]``), with the built-in YuNet as the default detector.
            detector: detector name (``retinaface`` default, ``yunet``, ``scrfd``, ``mtcnn``) or an ``.onnx`` path
                (name guessed from the file name).
            threshold: identification cosine threshold; default per model (:data:`DEFAULT_THRESHOLDS`).

        Raises:
            DataError: the file exists. ModelError: the model cannot be loaded.
        """
        path = Path(path)
        if path.exists():
            raise DataError(f"{path} already exists; pick a new library file or use the existing one")
        model_path, pack_detector = resolve_model(model)
        det_name, det_path = resolve_detector(detector if detector is not None else pack_detector)
        kind = "sface" if "sface" in model_path.name.lower() else "default"
        mean, std = (0.0, 1.0) if kind == "sface" else (127.5, 127.5)
        from facetrain.embed import load_embedder

        embedder = load_embedder(model_path, input_mean=mean, input_std=std)
        if embedder.identity == SFACE_IDENTITY:
            kind = "sface"
        lib = cls.create_empty(
            path,
            model_identity=embedder.identity,
            embedding_size=embedder.embedding_size,
            model_path=str(model_path.resolve()),
            model_kind=kind,
            detector=det_name,
            detector_path=det_path,
            input_mean=mean,
            input_std=std,
            threshold=threshold,
        )
        lib._embedder = embedder
        return lib

    @classmethod
    def create_empty(
        cls,
        path: str | os.PathLike,
        *,
        model_identity: str,
        embedding_size: int,
        model_path: str = "",
        model_kind: str = "default",
        detector: str = "retinaface",
        detector_path: str | None = None,
        input_mean: float = 127.5,
        input_std: float = 127.5,
        threshold: float | None = None,
    ) -> Library:
        """Create the library file from model facts alone (used by :meth:`create`, and for embeddings computed
        elsewhere, e.g. tests with synthetic identities)."""
        path = Path(path)
        if path.exists():
            raise DataError(f"{path} already exists; pick a new library file or use the existing one")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path, 5.0)
        with conn:
            conn.executescript(_SCHEMA)
            values = {
                "schema_version": SCHEMA_VERSION,
                "detector": detector,
                "detector_path": detector_path or "",
                "model_path": model_path,
                "model_identity": model_identity,
                "model_kind": model_kind,
                "embedding_size": int(embedding_size),
                "input_mean": input_mean,
                "input_std": input_std,
                "threshold": DEFAULT_THRESHOLDS[model_kind] if threshold is None else float(threshold),
                "unsure_margin": DEFAULT_UNSURE_MARGIN,
                "cluster_threshold": DEFAULT_CLUSTER_THRESHOLD[model_kind],
                "min_faces": DEFAULT_MIN_FACES,
                "generation": 0,
            }
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in values.items()])
        conn.close()
        return cls(path)

    # ---- meta -----------------------------------------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set(self, key: str, value) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    @property
    def threshold(self) -> float:
        return float(self.get("threshold"))

    @property
    def unsure_margin(self) -> float:
        return float(self.get("unsure_margin"))

    def settings(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta ORDER BY key").fetchall())

    def set_threshold(self, value: float | None = None, *, calibration: str | os.PathLike | None = None) -> float:
        """Set the identification threshold directly or from ``facetrain eval calibrate`` JSON output."""
        if calibration is not None:
            try:
                data = json.loads(Path(calibration).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read calibration file {calibration}: {exc}") from exc
            results = data.get("results") if isinstance(data, dict) else None  # facetrain eval calibrate --json
            found = _find_key(results if isinstance(results, dict) else data, "threshold")
            if found is None:
                raise ConfigError(f"{calibration} has no 'threshold' field; pass the JSON of facetrain eval calibrate")
            value = found
        if value is None or not -1.0 <= float(value) <= 1.0:
            raise ConfigError(f"threshold must be a cosine in [-1, 1], got {value}")
        self.set("threshold", float(value))
        return float(value)

    def bump(self) -> None:
        """Mark the embeddings / assignments as changed (invalidates in-memory indexes)."""
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # ---- models ---------------------------------------------------------------------------------------------
    def embedder(self):
        """The library's embedder; refuses a model whose weights differ from the one the library was built with."""
        if self._embedder is None:
            from facetrain.embed import load_embedder

            path = Path(self.get("model_path"))
            if not path.exists():
                raise ModelError(f"{self.path}: its recognition model {path} is missing; restore it at that path")
            embedder = load_embedder(
                path, input_mean=float(self.get("input_mean")), input_std=float(self.get("input_std"))
            )
            check_identity(self, embedder.identity)
            self._embedder = embedder
        return self._embedder

    def detector(self, num_threads: int = 0):
        if self._detector is None:
            self._detector = make_detector(self.get("detector"), self.get("detector_path") or None, num_threads)
        return self._detector

    # ---- transactions and the writer lock -------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); "library is busy" when another writer holds it too long."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise LibraryBusyError(
                f"library {self.path} is busy (another facetrain process is writing): {exc}"
            ) from exc
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def writer(self) -> Iterator[Library]:
        """Hold the exclusive writer lock (``LIB.lock``) for a long operation; fails at once when held elsewhere."""
        import fcntl

        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LibraryBusyError(
                f"library {self.path} is busy: another facetrain process (scan/cluster) is writing it; wait for it"
            ) from exc
        try:
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- queries used everywhere ----------------------------------------------------------------------------
    def person_id(self, name: str, *, create: bool = False) -> int:
        row = self.conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        if row:
            return int(row[0])
        if not create:
            from facetrain.errors import closest

            names = [r[0] for r in self.conn.execute("SELECT name FROM people")]
            hint = closest(name, names)
            raise DataError(f"no person named {name!r} in {self.path}" + (f" (did you mean {hint!r}?)" if hint else ""))
        if not name.strip() or name.strip().isdigit():
            raise DataError(f"person name {name!r} must be text (digits alone mean a cluster id)")
        cur = self.conn.execute("INSERT INTO people (name, created) VALUES (?, ?)", (name, time.time()))
        return int(cur.lastrowid)

    def embeddings(self, where: str = "1", params: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """Face ids (N,) int64 and their L2-normalized embeddings (N, D) float32 matching an SQL condition."""
        rows = self.conn.execute(
            f"SELECT id, embedding FROM faces WHERE embedding IS NOT NULL AND not_face = 0 AND ({where}) ORDER BY id",
            params,
        ).fetchall()
        dim = int(self.get("embedding_size"))
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.zeros((0, dim), np.float32)
        return ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)

    def counts(self) -> dict[str, int]:
        q = self.conn.execute
        return {
            "photos": q("SELECT COUNT(*) FROM photos").fetchone()[0],
            "photos_with_errors": q("SELECT COUNT(*) FROM photos WHERE status = 'error'").fetchone()[0],
            "faces": q("SELECT COUNT(*) FROM faces WHERE not_face = 0 AND forgotten = 0").fetchone()[0],
            "people": q("SELECT COUNT(*) FROM people").fetchone()[0],
            "identified_faces": q(
                "SELECT COUNT(*) FROM faces WHERE person_id IS NOT NULL AND assignment != 'unsure'"
            ).fetchone()[0],
            "clusters": q("SELECT COUNT(DISTINCT cluster_id) FROM faces WHERE cluster_id IS NOT NULL").fetchone()[0],
        }


def open_library(path: str | os.PathLike) -> Library:
    """Open an existing library (see :class:`Library`)."""
    return Library(path)


def check_identity(lib: Library, identity: str) -> None:
    """Refuse to mix embeddings of two models in one library."""
    stored = lib.get("model_identity")
    if identity != stored:
        raise ModelError(
            f"{lib.path} holds embeddings of model {stored}, but the model now at {lib.get('model_path')} is "
            f"{identity}; embeddings of two models cannot be mixed: restore the original file or make a new library"
        )


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, str | None]:
    """A recognition model file, and the detector an InsightFace pack folder implies (or None).

    ``None`` is the built-in pair of ``facetrain[people]``: SFace, with YuNet as the implied detector.

    A folder is read as an InsightFace model pack: its recognition ONNX (``w600k_*.onnx`` / ``glintr100.onnx`` /
    any ``.onnx`` that is not a detector or landmark model) and, when present, ``det_*.onnx`` (SCRFD).
    """
    if model is None:
        from .builtin import builtin_detector, builtin_recognizer

        return builtin_recognizer(), builtin_detector()
    path = Path(model)
    if path.is_dir():
        onnx = sorted(path.glob("*.onnx"))
        detectors = [p for p in onnx if p.name.startswith(("det_", "scrfd"))]
        others = [p for p in onnx if p not in detectors and not p.name.startswith(("2d106", "1k3d68", "genderage"))]
        if not others:
            raise ModelError(f"model folder {path} holds no recognition .onnx (e.g. w600k_r50.onnx)")
        return others[0], (f"scrfd:{detectors[0]}" if detectors else None)
    if not path.is_file():
        raise ModelError(f"recognition model {path} not found; pass an .onnx file or an InsightFace pack folder")
    return path, None


def resolve_detector(detector: str | None) -> tuple[str, str | None]:
    """(detector name, model path or None) from a name, ``name:path`` or an ``.onnx`` path."""
    from facetrain.align import DEFAULT_DETECTOR, list_detectors

    if not detector:
        return DEFAULT_DETECTOR, None
    if ":" in detector and detector.split(":", 1)[0] in list_detectors():
        name, path = detector.split(":", 1)
        return name, str(Path(path).resolve())
    if detector.lower().endswith(".onnx") or Path(detector).is_file():
        path = Path(detector)
        if not path.is_file():
            raise ModelError(f"detector model {path} not found")
        low = path.name.lower()
        name = "yunet" if "yunet" in low else "scrfd" if ("det_" in low or "scrfd" in low) else "retinaface"
        return name, str(path.resolve())
    if detector not in list_detectors():
        from facetrain.align import build_detector

        build_detector(detector)  # raises ConfigError with a did-you-mean hint
    return detector, None


def make_detector(name: str, path: str | None, num_threads: int = 0):
    from facetrain.align import build_detector

    kwargs: dict = {}
    if name in ("retinaface", "scrfd", "yunet") and path:
        kwargs["model_path"] = path
    if name == "mtcnn" and path:
        kwargs["weights_dir"] = path
    if name in ("retinaface", "scrfd") and num_threads:
        kwargs["num_threads"] = num_threads
    return build_detector(name, **kwargs)


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:
        raise DataError(f"{path} is not an SQLite people library: {exc}") from exc
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA secure_delete=ON")  # forgotten embeddings are overwritten, not left in free pages
    return conn


def _find_key(data, key: str):
    if isinstance(data, dict):
        if key in data and isinstance(data[key], (int, float)):
            return float(data[key])
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    if isinstance(data, list):
        for value in data:
            found = _find_key(value, key)
            if found is not None:
                return found
    return None
