"""``align_folder`` and the ``facetrain align`` / ``facetrain detect`` commands on real photos."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from facetrain.align.detectors import Face
from facetrain.align.pipeline import align_folder, list_photos, select_faces
from facetrain.errors import DataError

pytestmark = pytest.mark.realdata


@pytest.fixture
def photo_tree(tmp_path, assets_dir):
    """src/<identity>/<photo> with real photos, a blank photo, a broken file and a group photo (links, no copies)."""
    src = tmp_path / "src"
    layout = {
        "grace": ["grace_hopper.jpg", "astronaut.png"],
        "barack": ["obama2.jpg"],
        "group": ["faceapi_sample3.jpg"],
    }
    for identity, names in layout.items():
        (src / identity).mkdir(parents=True)
        for name in names:
            (src / identity / name).symlink_to(assets_dir / "images" / name)
    cv2.imwrite(str(src / "barack" / "blank.png"), np.full((200, 300, 3), 90, np.uint8))
    (src / "barack" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "barack" / "notes.txt").write_text("not a photo")
    return src


def test_align_folder_report_and_resume(photo_tree, tmp_path):
    dst = tmp_path / "dst"
    summary = align_folder(photo_tree, dst, multi="largest")
    assert (summary.photos, summary.faces, summary.misses, summary.errors, summary.multi_face) == (6, 4, 1, 1, 1)
    for name in ("grace/grace_hopper.png", "grace/astronaut.png", "barack/obama2.png", "group/faceapi_sample3.png"):
        crop = cv2.imread(str(dst / name))
        assert crop.shape == (112, 112, 3) and crop.std() > 20, name
    report = json.loads((dst / "align_report.json").read_text())
    problems = {p["photo"]: p for p in report["problems"]}
    assert problems["barack/blank.png"]["status"] == "no_face"
    assert (
        problems["barack/broken.jpg"]["status"] == "error" and "broken.jpg" in problems["barack/broken.jpg"]["detail"]
    )
    assert problems["group/faceapi_sample3.jpg"]["detected"] == 3
    assert "barack/blank.png" in (dst / "align_report.csv").read_text()
    assert not list(dst.rglob("*.tmp"))

    again = align_folder(photo_tree, dst, multi="largest")
    assert again.skipped == 5 and again.processed == 1  # only the unreadable photo is tried again
    assert (again.faces, again.misses, again.errors) == (4, 1, 1)
    with pytest.raises(DataError, match="other settings"):
        align_folder(photo_tree, dst, multi="all")


def test_multi_all_writes_every_face_left_to_right(tmp_path, assets_dir):
    src = tmp_path / "flat"
    src.mkdir()
    (src / "group.jpg").symlink_to(assets_dir / "images" / "faceapi_sample3.jpg")
    summary = align_folder(src, tmp_path / "out", multi="all", image_size=128)
    assert summary.faces == 3
    again = align_folder(src, src / "aligned", multi="all")  # output inside the photo folder is never read back
    assert again.photos == 1 and align_folder(src, src / "aligned", multi="all").skipped == 1
    crops = sorted((tmp_path / "out").glob("group_f*.png"))
    assert [c.name for c in crops] == ["group_f0.png", "group_f1.png", "group_f2.png"]
    assert cv2.imread(str(crops[0])).shape == (128, 128, 3)


def test_select_faces_policies():
    def face(x1, y1, x2, y2):
        return Face(np.array([x1, y1, x2, y2], np.float32), 0.9, np.zeros((5, 2), np.float32))

    faces = [face(0, 0, 50, 50), face(90, 90, 110, 110), face(150, 10, 190, 60)]
    assert select_faces(faces, (200, 200), "largest")[0] is faces[0]
    assert select_faces(faces, (200, 200), "central")[0] is faces[1]
    assert [f.box[0] for f in select_faces(faces[::-1], (200, 200), "all")] == [0, 90, 150]
    assert select_faces([], (200, 200), "largest") == []


def test_missing_or_empty_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        align_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no photos"):
        align_folder(tmp_path / "empty", tmp_path / "out")
    assert list_photos(tmp_path / "empty") == []


def test_cli_align_with_workers_and_rec(photo_tree, tmp_path, run_cli):
    pytest.importorskip("facetrain.data.recordio")
    for junk in ("blank.png", "broken.jpg"):
        (photo_tree / "barack" / junk).unlink()
    dst = tmp_path / "aligned"
    code, out, err = run_cli("align", photo_tree, dst, "--workers", "2", "--rec", "--no-progress")
    assert code == 0, err
    assert "faces written 4" in out and "no face 0" in out
    assert (dst / "train.rec").stat().st_size > 0 and (dst / "train.idx").is_file()
    assert (dst / "property").read_text().startswith("3,112,112")


def test_cli_detect_draws_an_annotated_png(tmp_path, assets_dir, run_cli):
    out_png = tmp_path / "annotated.png"
    photo = assets_dir / "images" / "faceapi_sample3.jpg"
    code, out, err = run_cli("detect", photo, "--out", out_png)
    assert code == 0, err
    assert "3 face(s)" in out and out.count("landmarks") == 3
    drawn = cv2.imread(str(out_png))
    original = cv2.imread(str(photo))
    assert drawn.shape == original.shape and (drawn != original).any()
    code, out, err = run_cli("detect", tmp_path / "missing.jpg")
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1
    code, _, _ = run_cli("detect", photo, "--detector", "nope")
    assert code == 2


def test_odd_photo_formats_align_like_the_original(tmp_path, assets_dir):
    """EXIF-rotated, CMYK, 16-bit and grey copies of a portrait give (nearly) the same aligned face."""
    pil = pytest.importorskip("PIL.Image")
    from facetrain.align.detectors import build_detector
    from facetrain.align.exif import read_image
    from facetrain.align.pipeline import align_photo

    original = read_image(assets_dir / "images" / "grace_hopper.jpg")
    stored_sideways = np.ascontiguousarray(np.rot90(original, k=1))  # orientation 6 means: rotate 90 clockwise to view
    exif = pil.Exif()
    exif[0x0112] = 6
    pil.fromarray(stored_sideways).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    pil.fromarray(original).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cv2.imwrite(str(tmp_path / "deep.png"), original[:, :, ::-1].astype(np.uint16) * 257)
    pil.fromarray(original).convert("L").save(tmp_path / "grey.png")
    detector = build_detector("retinaface")
    (reference,), (face,) = align_photo(original, detector)
    size = np.sqrt(face.area)
    for name in ("rotated.jpg", "cmyk.jpg", "deep.png", "grey.png"):
        crops, faces = align_photo(read_image(tmp_path / name), detector)
        assert len(faces) == 1, name
        # landmarks in upright-photo coordinates, as on the original
        assert np.abs(faces[0].landmarks - face.landmarks).max() < 0.05 * size, name
        if name != "grey.png":  # colour copies: the aligned crops themselves agree
            a, b = (cv2.cvtColor(c, cv2.COLOR_RGB2GRAY).astype(np.float64) for c in (reference, crops[0]))
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95, name
