"""Identification bands and the user's edits on a tiny library with hand-made embeddings (exact cosines)."""

from __future__ import annotations

import numpy as np
import pytest

from facetrain.errors import ConfigError, DataError, ModelError
from facetrain.people.annotate import describe
from facetrain.people.cluster import cluster_unknown
from facetrain.people.identify import find, forget, identify, merge, name_cluster, split
from facetrain.people.library import Library

DIM = 8


def _unit(cos: float, axis: int = 1) -> np.ndarray:
    """A unit vector at cosine ``cos`` from e0, rotated towards e_axis."""
    v = np.zeros(DIM)
    v[0], v[axis] = cos, np.sqrt(1 - cos**2)
    return v.astype(np.float32)


@pytest.fixture
def lib(tmp_path):
    lib = Library.create_empty(tmp_path / "lib.db", model_identity="hand", embedding_size=DIM, threshold=0.5)
    yield lib
    lib.close()


def _add(lib: Library, vectors: list[np.ndarray]) -> list[int]:
    ids = []
    with lib.transaction() as conn:
        for v in vectors:
            n = conn.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
            pid = conn.execute(
                "INSERT INTO photos (path, size, mtime, sha256, width, height, status, scanned_at) "
                "VALUES (?, 1, 0, ?, 200, 100, 'ok', 0)",
                (f"/p/{n}.jpg", str(n)),
            ).lastrowid
            ids.append(
                conn.execute(
                    "INSERT INTO faces (photo_id, idx, x1, y1, x2, y2, landmarks, det_score, blur, size, embedding) "
                    "VALUES (?, 0, 10, 20, 50, 60, ?, 0.9, 100, 40, ?)",
                    (pid, np.zeros(10, np.float32).tobytes(), v.tobytes()),
                ).lastrowid
            )
        lib.bump()
    return ids


def test_threshold_and_unsure_band(lib):
    ref, *faces = _add(lib, [_unit(1.0), _unit(0.6), _unit(0.52), _unit(0.47), _unit(0.3)])
    with lib.transaction() as conn:
        conn.execute(
            "UPDATE faces SET person_id = ?, assignment = 'reference' WHERE id = ?",
            (lib.person_id("A", create=True), ref),
        )
    counts = identify(lib)
    assert counts == {"identified": 2, "unsure": 1, "unknown": 1}
    rows = lib.conn.execute("SELECT assignment, similarity FROM faces WHERE id != ? ORDER BY id", (ref,)).fetchall()
    assert [r[0] for r in rows] == ["auto", "auto", "unsure", None]
    assert np.allclose([r[1] for r in rows], [0.6, 0.52, 0.47, 0.3], atol=1e-6)
    assert len(find(lib, "A")) == 3  # reference + 2 auto; unsure is not counted
    lib.set_threshold(0.55)
    assert identify(lib) == {"identified": 1, "unsure": 1, "unknown": 2}
    with pytest.raises(ConfigError):
        lib.set_threshold(1.5)


def test_merge_split_forget(lib):
    a = _add(lib, [_unit(c, 1) for c in (1.0, 0.95, 0.9)])
    b = _add(lib, [_unit(c, 2) * np.float32(1) for c in (0.0, 0.05, 0.1)])
    stats = cluster_unknown(lib, threshold=0.8, min_faces=3)
    assert stats["new_clusters"] == 2 and stats["clustered"] == 6
    ca, cb = (lib.conn.execute("SELECT cluster_id FROM faces WHERE id = ?", (x[0],)).fetchone()[0] for x in (a, b))
    assert ca != cb
    assert merge(lib, str(cb), str(ca)) == 3
    assert lib.conn.execute("SELECT COUNT(DISTINCT cluster_id) FROM faces").fetchone()[0] == 1
    new = split(lib, b)
    assert {r[0] for r in lib.conn.execute("SELECT cluster_id FROM faces WHERE id IN (?, ?, ?)", b)} == {new}
    assert name_cluster(lib, ca, "Ann") == 3 and name_cluster(lib, new, "Bob") == 3
    assert merge(lib, "Bob", "Ann") == 3
    assert len(find(lib, "Ann")) == 6
    with pytest.raises(DataError, match="no person"):
        find(lib, "Bob")
    with pytest.raises(DataError, match="must be text"):
        lib.person_id("42", create=True)
    with pytest.raises(DataError, match="cannot merge person"):
        merge(lib, "Ann", "1")
    assert forget(lib, "Ann") == 6
    assert lib.conn.execute("SELECT COUNT(*) FROM faces WHERE embedding IS NOT NULL").fetchone()[0] == 0
    assert cluster_unknown(lib)["pending"] == 0  # forgotten faces are never clustered again


def test_description_sentence():
    record = {
        "faces": [
            {"box": [100, 300, 150, 354], "person": "Kumar", "candidate": None, "cluster": None},
            {"box": [0, 0, 10, 10], "person": None, "candidate": None, "cluster": 4},
        ]
    }
    assert describe(record) == (
        'Face at coordinates (125, 327) is of "Kumar". Face at coordinates (5, 5) is of unknown person #4. '
        "And two people in the image."
    )
    assert describe({"faces": []}) == "No people in the image."
    assert describe({"faces": [], "kind": "video"}) == "No people in the video."
    # the home-media app's sentence, with gender and expression known
    record["faces"][0] |= {"gender": "man", "expression": "neutral"}
    assert describe({"faces": record["faces"][:1]}) == (
        'Face at coordinates (125, 327) is of "Kumar", a "man" expressing "neutral" emotion. And one man in the image.'
    )
    record["faces"][1] |= {"gender": "woman", "age": 31}
    assert describe(record).endswith(
        'is of unknown person #4, a "woman" aged about 31. And one man and one woman in the image.'
    )
    record["faces"].append({"box": [0, 0, 4, 4], "person": None, "candidate": "Ann", "cluster": None})
    assert describe(record).endswith(
        '(2, 2) may be "Ann". And one man and one woman and one other person in the image.'
    )


def test_annotation_lines():
    from facetrain.people.annotate import annotation

    face = {"box": [100, 300, 150, 354], "person": "Kumar", "gender": "man", "expression": "neutral"}
    record = {
        "faces": [face], "path": "/photos/a.jpg", "taken_at": "2024-05-01T10:30:00",
        "gps": {"lat": 18.325447, "lon": 72.9561}, "place": "Usar",
    }  # fmt: skip
    assert annotation(record).splitlines() == [
        'Face at coordinates (125, 327) is of "Kumar", a "man" expressing "neutral" emotion. And one man in the image.',
        "/photos/a.jpg",
        "2024-05-01T10:30:00",
        "(18.325447, 72.9561)",
        "'Usar'",
    ]
    bare = {"faces": [], "path": "/photos/b.jpg", "taken_at": None, "gps": None, "place": None}
    assert annotation(bare).splitlines() == ["No people in the image.", "/photos/b.jpg"]  # nothing invented


def test_model_and_detector_resolution(tmp_path):
    from facetrain.people.library import resolve_detector, resolve_model

    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    for name in ("det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx", "genderage.onnx"):
        (pack / name).write_bytes(b"")
    model, detector = resolve_model(pack)
    assert model.name == "w600k_r50.onnx" and detector == f"scrfd:{pack / 'det_10g.onnx'}"
    assert resolve_detector(detector) == ("scrfd", str((pack / "det_10g.onnx").resolve()))
    assert resolve_detector(None) == ("retinaface", None)
    yunet = tmp_path / "face_detection_yunet_2023mar.onnx"
    yunet.write_bytes(b"")
    assert resolve_detector(str(yunet)) == ("yunet", str(yunet.resolve()))
    with pytest.raises(ConfigError, match="did you mean 'retinaface'"):
        resolve_detector("retinafce")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no recognition"):
        resolve_model(tmp_path / "empty")


def test_one_chance_match_does_not_chain_two_people(lib):
    rng = np.random.default_rng(0)

    def near(axis: int) -> np.ndarray:
        v = np.zeros(DIM)
        v[axis] = 1.0
        v[3:] += 0.05 * rng.standard_normal(DIM - 3)
        return (v / np.linalg.norm(v)).astype(np.float32)

    theta = np.arccos(0.62)  # a (near group A) and b (near group B) match each other at sin^2 = 0.6156
    a = np.zeros(DIM, np.float32)
    a[0], a[2] = np.cos(theta), np.sin(theta)
    b = np.zeros(DIM, np.float32)
    b[1], b[2] = np.cos(theta), np.sin(theta)
    group_a = _add(lib, [near(0) for _ in range(4)] + [a])
    group_b = _add(lib, [near(1) for _ in range(4)] + [b])
    assert float(a @ b) >= 0.55 and float(a @ near(0)) >= 0.55 > float(a @ near(1))
    stats = cluster_unknown(lib, threshold=0.55, min_faces=3)
    assert stats["new_clusters"] == 2 and stats["clustered"] == 10
    labels = dict(lib.conn.execute("SELECT id, cluster_id FROM faces").fetchall())
    assert len({labels[i] for i in group_a}) == 1 and len({labels[i] for i in group_b}) == 1
    assert labels[group_a[0]] != labels[group_b[0]]
