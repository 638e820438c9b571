"""Incremental scanning: skip unchanged, keep moved photos' faces, prune deleted, record corrupt, resume after SIGKILL,
EXIF orientation / date / GPS, the busy lock and the model-identity check."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.errors import ModelError
from facetrain.people.library import Library, LibraryBusyError
from facetrain.people.scan import exif_date_gps, scan

pytestmark = pytest.mark.realdata

FOUR = ("obama.jpg", "obama2.jpg", "biden.jpg", "grace_hopper.jpg")


@pytest.fixture
def small(tmp_path, assets_dir, sface):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in FOUR:
        shutil.copy(assets_dir / "images" / name, photos / name)
    lib = Library.create(tmp_path / "lib.db", model=sface)
    first = scan(lib, photos, progress=False)
    assert (first.processed, first.faces, first.errors) == (4, 4, 0)
    yield lib, photos
    lib.close()


def _faces_by_hash(lib):
    return dict(
        lib.conn.execute(
            "SELECT ph.sha256, GROUP_CONCAT(f.id) FROM photos ph JOIN faces f ON f.photo_id = ph.id GROUP BY ph.id"
        ).fetchall()
    )


def test_rescan_skips_moves_prunes_and_records_corrupt(small):
    lib, photos = small
    before = _faces_by_hash(lib)
    again = scan(lib, photos, progress=False)
    assert (again.skipped, again.processed, again.faces) == (4, 0, 0)
    # touched but identical content: skipped through the hash, mtime updated
    os.utime(photos / "biden.jpg", (1e9, 1e9))
    again = scan(lib, photos, progress=False)
    assert (again.skipped, again.processed) == (4, 0)
    # moved + deleted + corrupt + a file that is not an image at all
    (photos / "obama2.jpg").rename(photos / "sub" / "renamed.jpg")
    (photos / "grace_hopper.jpg").unlink()
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (photos / "notes.png").write_bytes(b"plain text")
    result = scan(lib, photos, progress=False)
    assert (result.moved, result.pruned, result.errors, result.processed) == (1, 1, 2, 2)
    after = _faces_by_hash(lib)
    moved_hash = lib.conn.execute("SELECT sha256 FROM photos WHERE path LIKE '%renamed.jpg'").fetchone()[0]
    assert after[moved_hash] == before[moved_hash]  # the same face rows followed the file
    assert len(after) == 3
    errors = dict(lib.conn.execute("SELECT path, error FROM photos WHERE status = 'error'").fetchall())
    assert {Path(p).name for p in errors} == {"broken.jpg", "notes.png"}
    assert all(errors.values())
    # errors are not retried while unchanged
    assert scan(lib, photos, progress=False).processed == 0
    # moved to a folder outside the scanned tree, then that folder is scanned: still a move
    other = photos.parent / "other_1"
    other.mkdir()
    biden_hash = lib.conn.execute("SELECT sha256 FROM photos WHERE path LIKE '%biden.jpg'").fetchone()[0]
    (photos / "biden.jpg").rename(other / "biden.jpg")
    moved = scan(lib, other, progress=False)
    assert (moved.moved, moved.processed) == (1, 0)
    assert _faces_by_hash(lib)[biden_hash] == before[biden_hash]
    assert scan(lib, photos, progress=False).pruned == 0  # nothing left to prune: the row moved with the file


def test_killed_scan_is_consistent_and_resumes(tmp_path, assets_dir, sface):
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((assets_dir / "images").iterdir()):  # shrunk copies: the test is about commits, not pixels
        image = cv2.imread(str(src))
        image = cv2.resize(image, None, fx=800 / max(image.shape[:2]), fy=800 / max(image.shape[:2]))
        for k in range(2):
            cv2.imwrite(str(photos / f"{k}_{src.stem}.jpg"), image)
    Library.create(tmp_path / "lib.db", model=sface).close()
    code = (
        "import sys; from facetrain.people.library import Library; from facetrain.people.scan import scan; "
        "scan(Library(sys.argv[1]), sys.argv[2], batch_photos=1, progress=False)"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "lib.db"), str(photos)], env=env)
    try:
        deadline = time.time() + 60
        done = 0
        while time.time() < deadline and proc.poll() is None:
            with sqlite3.connect(str(tmp_path / "lib.db"), timeout=5) as conn:
                done = conn.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
            if done >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "scan finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    with Library(tmp_path / "lib.db") as lib:
        assert lib.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n_photos = lib.conn.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
        assert 3 <= n_photos < 24
        # every committed photo has all its faces (commit per photo)
        empty = lib.conn.execute(
            "SELECT COUNT(*) FROM photos p WHERE status = 'ok' "
            "AND NOT EXISTS (SELECT 1 FROM faces f WHERE f.photo_id = p.id)"
        ).fetchone()[0]
        assert empty == 0
        resumed = scan(lib, photos, progress=False)
        assert resumed.skipped == n_photos and resumed.processed == 24 - n_photos
        counts = dict(
            lib.conn.execute(
                "SELECT p.path, COUNT(f.id) FROM photos p LEFT JOIN faces f ON f.photo_id = p.id GROUP BY p.id"
            ).fetchall()
        )
        assert len(counts) == 24 and min(counts.values()) >= 1
        for path, n in counts.items():  # both copies of a photo, one maybe scanned before the kill, agree
            assert counts[str(Path(path).with_name("1" + Path(path).name[1:]))] == n
        assert lib.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _exif_app1(orientation: int, date: str, lat, lon) -> bytes:
    """An APP1 Exif segment (little-endian TIFF) with Orientation, DateTimeOriginal and GPS, written by hand."""

    def entry(tag, kind, count, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")

    ifd0_off = 8
    ifd0_size = 2 + 3 * 12 + 4
    exif_off = ifd0_off + ifd0_size
    exif_size = 2 + 12 + 4
    date_off = exif_off + exif_size
    gps_off = date_off + 20
    gps_size = 2 + 4 * 12 + 4
    lat_off = gps_off + gps_size
    lon_off = lat_off + 24

    def rationals(dms):
        return b"".join(struct.pack("<II", int(round(v * 100)), 100) for v in dms)

    tiff = b"II*\x00" + struct.pack("<I", ifd0_off)
    tiff += struct.pack("<H", 3) + entry(0x0112, 3, 1, struct.pack("<H", orientation))
    tiff += entry(0x8769, 4, 1, struct.pack("<I", exif_off)) + entry(0x8825, 4, 1, struct.pack("<I", gps_off))
    tiff += struct.pack("<I", 0)
    tiff += struct.pack("<H", 1) + entry(0x9003, 2, 20, struct.pack("<I", date_off)) + struct.pack("<I", 0)
    tiff += date.encode() + b"\x00"
    tiff += struct.pack("<H", 4)
    tiff += entry(1, 2, 2, lat[0].encode() + b"\x00") + entry(2, 5, 3, struct.pack("<I", lat_off))
    tiff += entry(3, 2, 2, lon[0].encode() + b"\x00") + entry(4, 5, 3, struct.pack("<I", lon_off))
    tiff += struct.pack("<I", 0) + rationals(lat[1]) + rationals(lon[1])
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def test_exif_orientation_date_and_gps(tmp_path, assets_dir, sface):
    original = cv2.imread(str(assets_dir / "images" / "obama.jpg"))
    stored = cv2.rotate(original, cv2.ROTATE_90_COUNTERCLOCKWISE)  # orientation 6: display = rotate 90 clockwise
    ok, jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 95])
    app1 = _exif_app1(6, "2021:07:04 18:30:05", ("N", (48, 51, 29.5)), ("W", (2, 17, 40.2)))
    data = jpeg.tobytes()[:2] + app1 + jpeg.tobytes()[2:]
    date, gps = exif_date_gps(data)
    assert date == "2021-07-04T18:30:05"
    assert gps[0] == pytest.approx(48 + 51 / 60 + 29.5 / 3600, abs=1e-6)
    assert gps[1] == pytest.approx(-(2 + 17 / 60 + 40.2 / 3600), abs=1e-6)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "rotated.jpg").write_bytes(data)
    shutil.copy(assets_dir / "images" / "obama.jpg", photos / "upright.jpg")
    with Library.create(tmp_path / "lib.db", model=sface) as lib:
        scan(lib, photos, progress=False)
        rows = {
            Path(r[0]).name: r[1:]
            for r in lib.conn.execute(
                "SELECT p.path, p.width, p.height, p.taken_at, p.gps_lat, f.x1, f.y1, f.x2, f.y2, f.embedding "
                "FROM photos p JOIN faces f ON f.photo_id = p.id"
            )
        }
    rot, up = rows["rotated.jpg"], rows["upright.jpg"]
    assert rot[:2] == up[:2] == (original.shape[1], original.shape[0])
    assert rot[2] == "2021-07-04T18:30:05" and rot[3] == pytest.approx(48.858194, abs=1e-5)
    assert np.allclose(rot[4:8], up[4:8], atol=6)  # boxes in upright-photo pixels
    cos = float(np.frombuffer(rot[8], np.float32) @ np.frombuffer(up[8], np.float32))
    assert cos > 0.9


def test_busy_library_and_model_identity(tmp_path, assets_dir, sface, run_cli):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(assets_dir / "images" / "grace_hopper.jpg", photos)
    model = tmp_path / "sface.onnx"
    shutil.copy(sface, model)
    Library.create(tmp_path / "lib.db", model=model).close()
    holder = Library(tmp_path / "lib.db")
    with holder.writer():
        with Library(tmp_path / "lib.db") as other, pytest.raises(LibraryBusyError, match="busy"):
            scan(other, photos, progress=False)
        code, out, err = run_cli("people", "scan", tmp_path / "lib.db", photos)
        assert code == 1 and "busy" in err and "\n" not in err.strip()
    holder.close()
    # same weights re-saved with extra metadata: another identity -> refused
    import onnx

    proto = onnx.load(str(model))
    proto.doc_string = "edited"
    onnx.save(proto, str(model))
    with Library(tmp_path / "lib.db") as lib, pytest.raises(ModelError, match="cannot be mixed"):
        scan(lib, photos, progress=False)


def test_worker_processes_give_the_same_faces(small, tmp_path, sface):
    lib, photos = small
    with Library.create(tmp_path / "pooled.db", model=sface) as pooled:
        result = scan(pooled, photos, workers=2, batch_photos=2, progress=False)
        assert (result.processed, result.faces) == (4, 4)
        query = "SELECT p.path, f.x1, f.y1, f.embedding FROM faces f JOIN photos p ON p.id = f.photo_id ORDER BY p.path"
        for a, b in zip(lib.conn.execute(query).fetchall(), pooled.conn.execute(query).fetchall(), strict=True):
            assert a[:3] == b[:3]
            assert np.allclose(np.frombuffer(a[3], np.float32), np.frombuffer(b[3], np.float32), atol=1e-5)
