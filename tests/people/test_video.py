"""Video files: sampled frames, faces tracked across frames (position + appearance), one face per track."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facetrain.people.annotate import photo_records
from facetrain.people.identify import enroll, find, identify, who
from facetrain.people.library import Library
from facetrain.people.scan import scan
from facetrain.people.video import link_tracks

pytestmark = pytest.mark.realdata

FPS = 10


def _letterbox(image: np.ndarray, width: int = 480, height: int = 360) -> np.ndarray:
    scale = min(width / image.shape[1], height / image.shape[0])
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.zeros((height, width, 3), np.uint8)
    y, x = (height - small.shape[0]) // 2, (width - small.shape[1]) // 2
    canvas[y : y + small.shape[0], x : x + small.shape[1]] = small
    return canvas


def test_video_faces_are_tracked_and_identified(tmp_path, assets_dir, sface):
    photos = tmp_path / "media"
    photos.mkdir()
    # 2 s of Obama, then a cut to 2 s of Biden at about the same place in the frame
    writer = cv2.VideoWriter(str(photos / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (480, 360))
    assert writer.isOpened()
    for name in ("obama.jpg", "biden.jpg"):
        frame = _letterbox(cv2.imread(str(assets_dir / "images" / name)))
        for _ in range(2 * FPS):
            writer.write(frame)
    writer.release()
    (photos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
    reference = assets_dir / "images" / "obama2.jpg"
    with Library.create(tmp_path / "lib.db", model=sface) as lib:
        summary = scan(lib, photos, video_interval=0.5, progress=False)
        assert summary.processed == 2 and summary.errors == 1
        rows = lib.conn.execute(
            "SELECT f.frame_time, f.track_frames FROM faces f JOIN photos p ON p.id = f.photo_id "
            "WHERE p.kind = 'video' ORDER BY f.idx"
        ).fetchall()
        assert len(rows) == 2  # two tracks, not 8 detections, and the cut is not one track
        assert 0 <= rows[0][0] < 2 <= rows[1][0] < 4 and rows[0][1] == rows[1][1] == 4
        enroll(lib, "Obama", [reference])
        identify(lib)
        assert [p.endswith("clip.mp4") for p, _ in find(lib, "Obama")].count(True) == 1
        record = next(r for r in photo_records(lib) if r["path"].endswith("clip.mp4"))
        assert record["kind"] == "video" and record["description"].endswith("And two people in the video.")
        assert '" at ' not in record["description"] and 's is of "Obama"' in record["description"]
        from facetrain.people.web import face_thumbnail

        video_face = lib.conn.execute("SELECT id FROM faces WHERE frame_time IS NOT NULL ORDER BY id").fetchone()[0]
        thumb = cv2.imdecode(np.frombuffer(face_thumbnail(lib, video_face), np.uint8), cv2.IMREAD_COLOR)
        assert thumb.shape == (128, 128, 3) and thumb.std() > 10  # a real frame, not a blank
        faces = who(lib, photos / "clip.mp4")
        assert [f["person"] for f in faces] == ["Obama", None]
        assert scan(lib, photos, video_interval=0.5, progress=False).skipped == 2


def test_link_tracks_needs_position_and_appearance():
    boxes = np.array([[0, 0, 10, 10], [100, 0, 110, 10], [1, 0, 11, 10], [101, 0, 111, 10], [0, 0, 10, 10]], float)
    a, b = np.eye(4)[0], np.eye(4)[1]
    emb = np.stack([a, b, a, b, b])
    samples = np.array([0, 0, 1, 1, 3])
    assert link_tracks(samples, boxes, emb).tolist() == [0, 1, 0, 1, 2]  # sample 3: gap > 1 -> new track
    samples = np.array([0, 0, 1, 1, 2])
    assert link_tracks(samples, boxes, emb).tolist() == [0, 1, 0, 1, 2]  # same place, other face -> new track
