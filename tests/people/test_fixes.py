"""XMP without invented names, no sidecar for a vanished photo, video wording, enroll's group-photo listing and
`people list` as text or JSON."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from facetrain.errors import DataError
from facetrain.people.annotate import NS, export
from facetrain.people.identify import enroll, identify
from facetrain.people.library import Library

pytestmark = pytest.mark.realdata

MWG, RDF, FT = NS["mwg-rs"], NS["rdf"], NS["facetrain"]


def test_xmp_names_only_known_faces_and_skips_vanished_photos(library, scanned_library, tmp_path):
    photos = scanned_library.parent / "photos"
    with Library(library) as lib:
        enroll(lib, "Obama", [photos / "obama.jpg"])
        identify(lib)
        from facetrain.people.cluster import cluster_unknown

        cluster_unknown(lib, min_faces=1, threshold=0.99)  # every unknown face gets a cluster of its own
        # a photo of the library that is no longer on disk (the shared photo folder stays untouched)
        lib.conn.execute("UPDATE photos SET path = ? WHERE path LIKE ?", (str(tmp_path / "gone.jpg"), "%obama3.jpg"))
        xmps = export(lib, "xmp", tmp_path / "xmp", root=photos)
    names = {p.name for p in xmps}
    assert "obama3.jpg.xmp" not in names and "gone.jpg.xmp" not in names and len(xmps) == 11
    unknown = clusters = 0
    for path in xmps:
        assert 'Name="unknown' not in path.read_text()
        for region in ET.parse(path).getroot().iter(f"{{{RDF}}}Description"):
            if region.get(f"{{{MWG}}}Type") != "Face":
                continue
            name = region.get(f"{{{MWG}}}Name")
            if name is None:
                unknown += 1
                clusters += region.get(f"{{{FT}}}Cluster") is not None
            else:
                assert name == "Obama" and region.get(f"{{{FT}}}Cluster") is None
    assert unknown >= 20 and clusters == unknown


def test_enroll_on_a_group_photo_lists_faces_left_to_right(library, scanned_library):
    photos = scanned_library.parent / "photos"
    with Library(library) as lib:
        with pytest.raises(DataError) as err:
            enroll(lib, "X", [photos / "faceapi_sample1.jpg"])
        message = str(err.value)
        listed = [(int(k), int(x), int(y)) for k, x, y in re.findall(r"(\d+) at \((\d+), (\d+)\)", message)]
        boxes = lib.conn.execute(
            "SELECT (x1 + x2) / 2, (y1 + y2) / 2 FROM faces f JOIN photos p ON p.id = f.photo_id WHERE p.path LIKE ?",
            ("%faceapi_sample1.jpg",),
        ).fetchall()
        assert "left to right" in message and "--face-index" in message
        assert [k for k, _, _ in listed] == list(range(len(boxes))) and len(boxes) >= 2
        assert [x for _, x, _ in listed] == sorted(round(cx) for cx, _ in boxes)
        (result,) = enroll(lib, "X", [photos / "faceapi_sample1.jpg"], face_index=len(boxes) - 1)
        x1, x2 = lib.conn.execute("SELECT x1, x2 FROM faces WHERE id = ?", (result.face_id,)).fetchone()
        assert round((x1 + x2) / 2) == listed[-1][1]  # the index picks the face listed under it: the rightmost


def test_people_list_text_or_json(library, scanned_library, run_cli):
    photos = scanned_library.parent / "photos"
    with Library(library) as lib:
        enroll(lib, "Obama", [photos / "obama.jpg"])
        identify(lib)
    code, out, err = run_cli("people", "list", library)
    assert code == 0, err
    first, *rest = out.strip().splitlines()
    assert re.fullmatch(r"12 photos \(0 unreadable\), 28 faces, 1 people \(\d+ faces identified\), \d+ clusters", first)
    assert any(line.startswith("Obama: ") for line in rest) and "{" not in out
    code, out, err = run_cli("people", "list", library, "--json")
    data = json.loads(out)
    assert data["counts"]["faces"] == 28 and data["people"][0]["name"] == "Obama" and isinstance(data["clusters"], list)


def test_who_on_a_video_says_in_the_video(tmp_path, run_cli, sface, assets_dir):
    import cv2

    frame = cv2.imread(str(assets_dir / "images" / "obama.jpg"))
    h, w = frame.shape[:2]
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 2, (w, h))
    for _ in range(3):
        writer.write(frame)
    writer.release()
    if not (tmp_path / "clip.avi").is_file():
        pytest.skip("OpenCV cannot write MJPG here")
    code, out, err = run_cli("people", "init", tmp_path / "lib.db", "--model", sface)
    assert code == 0, err
    code, out, err = run_cli("people", "who", tmp_path / "lib.db", tmp_path / "clip.avi")
    assert code == 0, err
    assert out.strip().endswith("And one person in the video."), out
