"""The people library on the real asset photos with the shipped SFace recognizer and the default RetinaFace."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from facetrain.errors import DataError
from facetrain.people.annotate import export
from facetrain.people.cluster import cluster_unknown
from facetrain.people.identify import enroll, find, forget, identify, who
from facetrain.people.library import Library

pytestmark = pytest.mark.realdata

MWG = "http://www.metadataworkinggroup.com/schemas/regions/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
AREA = "http://ns.adobe.com/xmp/sType/Area#"


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_face_counts_and_boxes_match_annotations(scanned_library, assets_dir):
    notes = json.loads((assets_dir / "annotations.json").read_text())["images"]
    with Library(scanned_library) as lib:
        rows = lib.conn.execute("SELECT id, path, status FROM photos").fetchall()
        assert len(rows) == 12
        for pid, path, status in rows:
            expected = notes[Path(path).name]
            faces = lib.conn.execute(
                "SELECT x1, y1, x2, y2, embedding FROM faces WHERE photo_id = ?", (pid,)
            ).fetchall()
            assert status == "ok"
            assert len(faces) == expected["n_faces"], path
            for note in expected["faces"]:
                x, y, w, h = note["box_xywh"]
                assert max(_iou(f[:4], (x, y, x + w, y + h)) for f in faces) > 0.7, (path, note["id"])
            for f in faces:
                vec = np.frombuffer(f[4], np.float32)
                assert vec.shape == (128,) and abs(np.linalg.norm(vec) - 1) < 1e-4


def test_obama_photos_cluster_together(library):
    with Library(library) as lib:
        stats = cluster_unknown(lib)
        assert stats["new_clusters"] >= 1
        rows = lib.conn.execute(
            "SELECT ph.path, f.cluster_id FROM faces f JOIN photos ph ON ph.id = f.photo_id "
            "WHERE f.cluster_id IS NOT NULL"
        ).fetchall()
        obama = {Path(p).name: c for p, c in rows if Path(p).name.startswith("obama")}
        assert set(obama) == {"obama.jpg", "obama2.jpg", "obama3.jpg"}
        assert len(set(obama.values())) == 1
        members = [Path(p).name for p, c in rows if c == next(iter(obama.values()))]
        assert sorted(members) == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
        # re-running places nothing new and moves nothing
        before = lib.conn.execute("SELECT id, cluster_id FROM faces ORDER BY id").fetchall()
        assert cluster_unknown(lib)["clustered"] == 0
        assert lib.conn.execute("SELECT id, cluster_id FROM faces ORDER BY id").fetchall() == before


def test_enroll_obama_identifies_him_and_not_the_others(library, scanned_library):
    photos = scanned_library.parent / "photos"
    with Library(library) as lib:
        results = enroll(lib, "Obama", [photos / "obama.jpg"])
        assert results[0].warnings == []
        identify(lib)
        found = sorted(Path(p).name for p, _ in find(lib, "Obama"))
        assert found == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
        for other in ("biden.jpg", "grace_hopper.jpg", "astronaut.png"):
            faces = who(lib, photos / other)
            assert len(faces) == 1 and faces[0]["person"] is None, other
            assert faces[0]["similarity"] < lib.threshold
        obama2 = who(lib, photos / "obama2.jpg")
        assert obama2[0]["person"] == "Obama" and obama2[0]["similarity"] > 0.6
        # a group photo needs --face-index
        with pytest.raises(DataError, match="face-index"):
            enroll(lib, "X", [photos / "faceapi_sample1.jpg"])
        # forgetting removes the embeddings
        assert forget(lib, "Obama") == 3
        assert (
            lib.conn.execute("SELECT COUNT(*) FROM faces WHERE forgotten = 1 AND embedding IS NULL").fetchone()[0] == 3
        )
        with pytest.raises(DataError, match="no person"):
            find(lib, "Obama")


def test_exports_parse(library, tmp_path, scanned_library):
    photos = scanned_library.parent / "photos"
    with Library(library) as lib:
        enroll(lib, "Obama", [photos / "obama.jpg"])
        identify(lib)
        cluster_unknown(lib)
        (out_json,) = export(lib, "json", tmp_path / "p.json")
        (out_csv,) = export(lib, "csv", tmp_path / "p.csv")
        xmps = export(lib, "xmp", tmp_path / "xmp")
    data = json.loads(out_json.read_text())["photos"]
    by_name = {Path(r["path"]).name: r for r in data}
    rec = by_name["obama2.jpg"]
    (face,) = rec["faces"]
    cx, cy = round((face["box"][0] + face["box"][2]) / 2), round((face["box"][1] + face["box"][3]) / 2)
    expression = r'(, expressing "[a-z]+" emotion)?'
    expected = rf'Face at coordinates \({cx}, {cy}\) is of "Obama"{expression}\. And one person in the image\.'
    assert re.fullmatch(expected, rec["description"]), rec["description"]
    assert rec["annotation"].splitlines()[:2] == [rec["description"], rec["path"]]
    assert len(face["landmarks"]) == 5 and face["similarity"] > 0.6
    assert by_name["faceapi_sample5.jpg"]["description"].endswith("And five people in the image.")
    assert by_name["obama.jpg"]["taken_at"] is not None
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 28 and {r["person"] for r in rows} >= {"Obama", ""}
    assert len(xmps) == 12
    xmp = next(p for p in xmps if p.name == "obama2.jpg.xmp")
    root = ET.parse(xmp).getroot()
    regions = root.findall(f".//{{{MWG}}}RegionList/{{{RDF}}}Bag/{{{RDF}}}li/{{{RDF}}}Description")
    assert len(regions) == 1 and regions[0].get(f"{{{MWG}}}Name") == "Obama"
    area = regions[0].find(f"{{{MWG}}}Area")
    x1, y1, x2, y2 = face["box"]
    assert float(area.get(f"{{{AREA}}}x")) == pytest.approx((x1 + x2) / 2 / rec["width"], abs=1e-5)
    assert float(area.get(f"{{{AREA}}}h")) == pytest.approx((y2 - y1) / rec["height"], abs=1e-5)
    assert area.get(f"{{{AREA}}}unit") == "normalized"


def test_enroll_reports_small_and_blurry_faces(library, scanned_library, tmp_path):
    import cv2

    image = cv2.imread(str(scanned_library.parent / "photos" / "obama.jpg"))
    small = cv2.resize(image, None, fx=0.12, fy=0.12, interpolation=cv2.INTER_AREA)  # face ~29 px
    blurry = cv2.GaussianBlur(image, (0, 0), 6)
    cv2.imwrite(str(tmp_path / "small.jpg"), small)
    cv2.imwrite(str(tmp_path / "blurry.jpg"), blurry)
    with Library(library) as lib:
        (tiny,) = enroll(lib, "Obama", [tmp_path / "small.jpg"])
        assert tiny.size < 40 and any("small" in w for w in tiny.warnings)
        (soft,) = enroll(lib, "Obama", [tmp_path / "blurry.jpg"])
        assert soft.size > 100 and any("blurry" in w for w in soft.warnings)
