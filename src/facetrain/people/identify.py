"""Enrollment, identification and the edits a user makes (name, merge, split, forget, not-a-face), plus who / find.

Identification: each face's score for a person is the highest cosine similarity between its L2-normalized embedding
and that person's gallery (enrolled reference faces and faces the user named by hand). With the library's
calibrated threshold ``t`` and unsure margin ``m``: ``cos >= t`` -> the person (``auto``); ``t - m <= cos < t`` ->
``unsure`` (the best candidate is stored, but the face is not counted as that person and stays in clustering);
below -> unknown (clustered, see :mod:`.cluster`). Reference and manual assignments are never changed automatically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.errors import DataError

from .library import Library

logger = logging.getLogger(__name__)

MIN_FACE_SIZE = 40.0  # pixels, shorter box side; smaller faces make poor references
MIN_BLUR = 60.0  # variance of the Laplacian of the aligned crop (sharp asset faces: 100..5000)


@dataclass
class EnrollResult:
    """One enrolled reference face, with quality warnings."""

    photo: str
    face_id: int
    size: float
    blur: float
    warnings: list[str]


class FaceIndex:
    """An in-memory numpy index of one set of faces (ids (N,), normalized embeddings (N, D)), rebuilt when the
    library's ``generation`` counter changes."""

    def __init__(self, lib: Library, where: str = "1", params: tuple = ()) -> None:
        self.lib, self.where, self.params = lib, where, params
        self.generation: str | None = None
        self.ids = np.zeros(0, np.int64)
        self.vectors = np.zeros((0, 0), np.float32)

    def refresh(self) -> FaceIndex:
        generation = self.lib.get("generation")
        if generation != self.generation:
            self.ids, self.vectors = self.lib.embeddings(self.where, self.params)
            self.generation = generation
        return self

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids, cosines), each (Q, k'), for (Q, D) normalized queries."""
        self.refresh()
        sims = np.asarray(queries, np.float32) @ self.vectors.T
        k = min(k, sims.shape[1])
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return self.ids[order], np.take_along_axis(sims, order, axis=1)


# ---- enrollment ------------------------------------------------------------------------------------------------
def enroll(
    lib: Library, name: str, photos: list[str | os.PathLike], *, face_index: int | None = None
) -> list[EnrollResult]:
    """Mark faces of ``photos`` as references of ``name`` (scanning the photos first if the library lacks them).

    A photo must show exactly one face unless ``face_index`` picks one: faces are numbered left to right (by the
    centre of their box), and the error of a group photo lists them with their positions.

    Raises:
        DataError: a photo has no face, several faces and no ``face_index``, or the index is out of range.
    """
    results = []
    for photo in photos:
        photo_id = _ensure_scanned(lib, Path(photo))
        faces = lib.conn.execute(
            "SELECT id, size, blur, (x1 + x2) / 2, (y1 + y2) / 2 FROM faces "
            "WHERE photo_id = ? AND not_face = 0 AND forgotten = 0 ORDER BY (x1 + x2) / 2, idx",
            (photo_id,),
        ).fetchall()
        if not faces:
            raise DataError(f"no face found in {photo}; pick a photo where the face is visible")
        listing = ", ".join(f"{k} at ({round(cx)}, {round(cy)})" for k, (*_, cx, cy) in enumerate(faces))
        if face_index is None and len(faces) > 1:
            raise DataError(
                f"{photo} shows {len(faces)} faces, left to right (box centre in pixels): {listing}; "
                "choose one with --face-index"
            )
        i = face_index or 0
        if not 0 <= i < len(faces):
            raise DataError(f"{photo} has {len(faces)} faces ({listing}); --face-index {i} is out of range")
        face_id, size, blur, _, _ = faces[i]
        warnings = []
        if size < MIN_FACE_SIZE:
            warnings.append(f"face is small ({size:.0f} px < {MIN_FACE_SIZE:.0f}); a larger photo identifies better")
        if blur < MIN_BLUR:
            warnings.append(f"face is blurry (sharpness {blur:.0f} < {MIN_BLUR:.0f})")
        with lib.transaction() as conn:
            pid = lib.person_id(name, create=True)
            conn.execute(
                "UPDATE faces SET person_id = ?, assignment = 'reference', similarity = 1.0, cluster_id = NULL "
                "WHERE id = ?",
                (pid, face_id),
            )
            lib.bump()
        results.append(EnrollResult(str(photo), int(face_id), float(size), float(blur), warnings))
    return results


def _ensure_scanned(lib: Library, photo: Path) -> int:
    path = str(photo.resolve())
    row = lib.conn.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchone()
    if row is None:
        from .scan import scan_files

        scan_files(lib, [Path(path)])
        row = lib.conn.execute("SELECT id, status, error FROM photos WHERE path = ?", (path,)).fetchone()
        if row is None or row[1] == "error":
            raise DataError(f"cannot read {photo}: {row[2] if row else 'not found'}")
    return int(row[0])


# ---- identification ---------------------------------------------------------------------------------------------
def identify(lib: Library) -> dict[str, int]:
    """Assign every non-reference, non-manual face to a person, ``unsure``, or unknown (see the module docstring).

    Returns:
        Counts ``{"identified": .., "unsure": .., "unknown": ..}``.
    """
    gallery_ids, gallery = lib.embeddings("assignment IN ('reference', 'manual') AND person_id IS NOT NULL")
    owner = dict(lib.conn.execute("SELECT id, person_id FROM faces WHERE assignment IN ('reference', 'manual')"))
    face_ids, vectors = lib.embeddings("assignment IS NULL OR assignment IN ('auto', 'unsure')")
    threshold, margin = lib.threshold, lib.unsure_margin
    counts = {"identified": 0, "unsure": 0, "unknown": 0}
    updates = []
    if len(gallery_ids) and len(face_ids):
        people = np.array([owner[int(g)] for g in gallery_ids], np.int64)
        order = np.argsort(people, kind="stable")  # gallery grouped by person, for one reduceat per block
        gallery, people = gallery[order], people[order]
        starts = np.flatnonzero(np.r_[True, people[1:] != people[:-1]])
        unique = people[starts]
        per_person = np.empty((len(face_ids), len(unique)), np.float32)
        rows = max(1, 32_000_000 // max(len(gallery_ids), 1))  # ~128 MB of similarities per block
        for start in range(0, len(face_ids), rows):
            sims = vectors[start : start + rows] @ gallery.T
            per_person[start : start + rows] = np.maximum.reduceat(sims, starts, axis=1)
        best = per_person.argmax(axis=1)
        best_sim = per_person[np.arange(len(face_ids)), best]
    else:
        best = np.zeros(len(face_ids), np.int64)
        best_sim = np.full(len(face_ids), -2.0, np.float32)
        unique = np.zeros(0, np.int64)
    for fid, j, sim in zip(face_ids.tolist(), best.tolist(), best_sim.tolist(), strict=True):
        if sim >= threshold:
            updates.append((int(unique[j]), "auto", sim, fid))
            counts["identified"] += 1
        elif sim >= threshold - margin:
            updates.append((int(unique[j]), "unsure", sim, fid))
            counts["unsure"] += 1
        else:
            updates.append((None, None, sim if sim > -2 else None, fid))
            counts["unknown"] += 1
    with lib.transaction() as conn:
        conn.executemany("UPDATE faces SET person_id = ?, assignment = ?, similarity = ? WHERE id = ?", updates)
        conn.execute(
            "UPDATE faces SET cluster_id = NULL, is_core = 0 WHERE assignment IN ('auto', 'reference', 'manual')"
        )
        lib.bump()
    return counts


# ---- edits ------------------------------------------------------------------------------------------------------
def name_cluster(lib: Library, cluster_id: int, name: str) -> int:
    """Name every face of an unknown cluster (manual assignments: they join ``name``'s gallery). Returns the count."""
    with lib.transaction() as conn:
        n = conn.execute("SELECT COUNT(*) FROM faces WHERE cluster_id = ?", (cluster_id,)).fetchone()[0]
        if not n:
            raise DataError(f"no cluster {cluster_id} in {lib.path}; list clusters with: facetrain people list")
        pid = lib.person_id(name, create=True)
        conn.execute(
            "UPDATE faces SET person_id = ?, assignment = 'manual', similarity = NULL, cluster_id = NULL "
            "WHERE cluster_id = ?",
            (pid, cluster_id),
        )
        conn.execute("DELETE FROM clusters WHERE id = ?", (cluster_id,))
        lib.bump()
    return int(n)


def name_face(lib: Library, face_id: int, name: str) -> None:
    """Assign one face to ``name`` by hand."""
    with lib.transaction() as conn:
        _check_face(conn, lib, face_id)
        pid = lib.person_id(name, create=True)
        conn.execute(
            "UPDATE faces SET person_id = ?, assignment = 'manual', similarity = NULL, cluster_id = NULL WHERE id = ?",
            (pid, face_id),
        )
        lib.bump()


def merge(lib: Library, source: str, target: str) -> int:
    """Merge ``source`` into ``target``; each is a person name or a cluster id (digits). Returns faces moved.

    cluster -> cluster moves the faces; cluster -> person names them; person -> person re-assigns every face of
    ``source`` and deletes it; person -> cluster is refused (name the cluster instead).
    """
    src_cluster, dst_cluster = source.isdigit(), target.isdigit()
    if src_cluster and dst_cluster:
        with lib.transaction() as conn:
            n = conn.execute(
                "UPDATE faces SET cluster_id = ? WHERE cluster_id = ?", (int(target), int(source))
            ).rowcount
            if not n:
                raise DataError(f"cluster {source} is empty or unknown in {lib.path}")
            conn.execute("DELETE FROM clusters WHERE id = ?", (int(source),))
            lib.bump()
        return n
    if src_cluster:
        return name_cluster(lib, int(source), target)
    if dst_cluster:
        raise DataError(f"cannot merge person {source!r} into cluster {target}; name the cluster {source!r} instead")
    with lib.transaction() as conn:
        src, dst = lib.person_id(source), lib.person_id(target)
        if src == dst:
            return 0
        n = conn.execute("UPDATE faces SET person_id = ? WHERE person_id = ?", (dst, src)).rowcount
        conn.execute("DELETE FROM people WHERE id = ?", (src,))
        lib.bump()
    return n


def split(lib: Library, face_ids: list[int]) -> int:
    """Split faces off their cluster / person into a new cluster of their own; returns the new cluster id."""
    import time

    with lib.transaction() as conn:
        for fid in face_ids:
            _check_face(conn, lib, fid)
        cluster = conn.execute("INSERT INTO clusters (created) VALUES (?)", (time.time(),)).lastrowid
        conn.executemany(
            "UPDATE faces SET person_id = NULL, assignment = 'split', similarity = NULL, cluster_id = ?, is_core = 1 "
            "WHERE id = ?",
            [(cluster, int(f)) for f in face_ids],
        )
        lib.bump()
    return int(cluster)


def mark_not_face(lib: Library, face_id: int, value: bool = True) -> None:
    """Flag a detection as "not a face": excluded from identification, clustering and exports."""
    with lib.transaction() as conn:
        _check_face(conn, lib, face_id)
        conn.execute(
            "UPDATE faces SET not_face = ?, person_id = NULL, assignment = NULL, cluster_id = NULL WHERE id = ?",
            (int(value), face_id),
        )
        lib.bump()


def forget(lib: Library, name: str) -> int:
    """Remove a person: their faces lose identity **and embedding** (kept only as boxes, never re-clustered), and
    the name is deleted. Returns the number of faces forgotten."""
    with lib.transaction() as conn:
        pid = lib.person_id(name)
        n = conn.execute(
            "UPDATE faces SET embedding = NULL, forgotten = 1, person_id = NULL, assignment = NULL, similarity = NULL, "
            "cluster_id = NULL WHERE person_id = ?",
            (pid,),
        ).rowcount
        conn.execute("DELETE FROM people WHERE id = ?", (pid,))
        lib.bump()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # do not leave the old embedding bytes in the WAL
    return n


def _check_face(conn, lib: Library, face_id: int) -> None:
    if conn.execute("SELECT 1 FROM faces WHERE id = ?", (int(face_id),)).fetchone() is None:
        raise DataError(f"no face {face_id} in {lib.path}")


# ---- who / find -------------------------------------------------------------------------------------------------
def who(lib: Library, photo: str | os.PathLike) -> list[dict]:
    """Faces of one photo with their person (or cluster) and similarity; a photo not in the library is analysed
    now and matched against the library's gallery without being stored."""
    path = str(Path(photo).resolve())
    row = lib.conn.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchone()
    if row is not None:
        return photo_faces(lib, int(row[0]))
    from .attributes import attributes_for
    from .scan import _face_rows, analyze_media

    attributes = attributes_for(lib)
    result = analyze_media(Path(path), lib.detector(), attr_size=attributes.genderage_size)
    if result.error:
        raise DataError(result.error)
    if result.crops is None:
        return []
    emb = lib.embedder().embed(result.crops)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    attrs = attributes.rows(result.crops, result.attr_crops)
    rows = _face_rows(result, emb, attrs)  # one per face (one per track for a video)
    emb = np.stack([np.frombuffer(row[8], np.float32) for row in rows])
    gallery = FaceIndex(lib, "person_id IS NOT NULL AND assignment IN ('reference', 'manual')")
    ids, sims = gallery.search(emb, k=1)
    owners = dict(lib.conn.execute("SELECT f.id, p.name FROM faces f JOIN people p ON p.id = f.person_id"))
    out = []
    for i in range(len(emb)):
        sim = float(sims[i, 0]) if sims.shape[1] else None
        name = owners.get(int(ids[i, 0])) if sim is not None and sim >= lib.threshold else None
        out.append(
            {
                "face_id": None, "box": [round(float(v), 1) for v in rows[i][:4]], "person": name, "cluster": None,
                "similarity": sim, "assignment": "auto" if name else None, "frame_time": rows[i][9],
                **_attribute_fields(*rows[i][11:15]),
            }
        )  # fmt: skip
    return out


def photo_faces(lib: Library, photo_id: int) -> list[dict]:
    rows = lib.conn.execute(
        "SELECT f.id, f.x1, f.y1, f.x2, f.y2, f.landmarks, f.det_score, f.similarity, f.assignment, f.cluster_id, "
        "p.name, f.blur, f.size, f.frame_time, f.expression, f.expression_p, f.gender, f.age "
        "FROM faces f LEFT JOIN people p ON p.id = f.person_id "
        "WHERE f.photo_id = ? AND f.not_face = 0 AND f.forgotten = 0 ORDER BY f.idx",
        (photo_id,),
    ).fetchall()
    out = []
    for fid, x1, y1, x2, y2, lm, score, sim, assignment, cluster, name, blur, size, frame_time, *attrs in rows:
        sure = assignment in ("reference", "manual", "auto")
        out.append(
            {
                "face_id": fid,
                "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
                "photo_id": photo_id,
                "landmarks": np.round(np.frombuffer(lm, np.float32).reshape(5, 2).astype(np.float64), 1).tolist(),
                "score": round(score, 4),
                "person": name if sure else None,
                "candidate": name if assignment == "unsure" else None,
                "cluster": cluster,
                "similarity": None if sim is None else round(sim, 4),
                "assignment": assignment,
                "blur": round(blur, 1),
                "size": round(size, 1),
                "frame_time": frame_time,
                **_attribute_fields(*attrs),
            }
        )
    return out


def _attribute_fields(expression, expression_p, gender, age) -> dict:
    """The optional attributes of a face (None where the model was absent; see :mod:`.attributes`)."""
    return {
        "expression": expression,
        "expression_probability": expression_p,
        "gender": gender,
        "age": None if age is None else round(float(age)),
    }


def find(lib: Library, name: str) -> list[tuple[str, float | None]]:
    """Photos where ``name`` appears (sure assignments), with the best similarity per photo, sorted by path."""
    pid = lib.person_id(name)
    rows = lib.conn.execute(
        "SELECT ph.path, MAX(COALESCE(f.similarity, 1.0)) FROM faces f JOIN photos ph ON ph.id = f.photo_id "
        "WHERE f.person_id = ? AND f.assignment IN ('reference', 'manual', 'auto') AND f.not_face = 0 "
        "GROUP BY ph.id ORDER BY ph.path",
        (pid,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def people_summary(lib: Library) -> list[dict]:
    """Every person with face and photo counts."""
    rows = lib.conn.execute(
        "SELECT p.id, p.name, COUNT(f.id), COUNT(DISTINCT f.photo_id) FROM people p LEFT JOIN faces f "
        "ON f.person_id = p.id AND f.assignment IN ('reference', 'manual', 'auto') GROUP BY p.id ORDER BY p.name"
    ).fetchall()
    return [{"id": r[0], "name": r[1], "faces": r[2], "photos": r[3]} for r in rows]
