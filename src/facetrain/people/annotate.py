"""``people export``: per-photo face annotations as JSON, CSV or XMP sidecars (MWG face regions), with a one-sentence
description per photo.

The sentence names people by position (the box centre, in pixels of the upright photo), with gender and expression
when their models ran (see :mod:`.attributes`; nothing is said of an attribute whose model was absent), e.g.
``Face at coordinates (125, 327) is of "Kumar", a "man" expressing "neutral" emotion. And one man in the image.``
The ``annotation`` of a photo is that sentence, then the file, the time stamp, ``(lat, lon)`` and the place name
(``'Usar'``), one per line, each only when known: the per-photo text of the home-media app this feature serves.

XMP sidecars (``photo.jpg.xmp`` beside the photo, or under ``--out`` mirroring the tree) carry the Metadata Working
Group region schema: ``mwg-rs:Regions`` with ``mwg-rs:AppliedToDimensions`` (the upright photo's pixel size) and one
``mwg-rs:RegionList`` item per face: ``mwg-rs:Name`` (named faces only), ``mwg-rs:Type="Face"`` and ``mwg-rs:Area``
with the **normalized centre** ``stArea:x, y`` and size ``stArea:w, h`` (unit ``normalized``), plus the sentence as
``dc:description`` and the place as ``photoshop:City`` / ``photoshop:Country``. An unknown face has no name; its
cluster id, expression, gender and age go in facetrain's own namespace (``facetrain:Cluster``, ...). Photos that are
no longer on disk get no sidecar. Every file is written to a temporary name and renamed (atomic).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from xml.sax.saxutils import quoteattr

from facetrain.errors import ConfigError

from .identify import photo_faces
from .library import Library

FORMATS = ("json", "csv", "xmp")
NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "mwg-rs": "http://www.metadataworkinggroup.com/schemas/regions/",
    "stDim": "http://ns.adobe.com/xap/1.0/sType/Dimensions#",
    "stArea": "http://ns.adobe.com/xmp/sType/Area#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "facetrain": "https://github.com/facetrain/facetrain/ns/people/1.0/",
}
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def photo_records(lib: Library) -> list[dict]:
    """One dict per scanned photo: path, size, date, GPS, caption, faces (see :func:`photo_faces`) and sentence."""
    rows = lib.conn.execute(
        "SELECT id, path, width, height, status, error, taken_at, gps_lat, gps_lon, caption, kind, place, country "
        "FROM photos ORDER BY path"
    ).fetchall()
    records = []
    for pid, path, width, height, status, error, taken_at, lat, lon, caption, kind, place, country in rows:
        faces = photo_faces(lib, pid) if status == "ok" else []
        record = {
            "path": path, "width": width, "height": height, "status": status, "error": error,
            "taken_at": taken_at, "gps": None if lat is None else {"lat": lat, "lon": lon},
            "place": place, "country": country, "caption": caption, "kind": kind, "faces": faces,
        }  # fmt: skip
        record["description"] = describe(record)
        record["annotation"] = annotation(record)
        records.append(record)
    return records


def describe(record: dict) -> str:
    """One sentence per face (position, who, gender, age and expression when known), then the head count."""
    parts = []
    for face in record["faces"]:
        x1, y1, x2, y2 = face["box"]
        where = f"Face at coordinates ({round((x1 + x2) / 2)}, {round((y1 + y2) / 2)})"
        if face.get("frame_time") is not None:
            where += f" at {face['frame_time']:.1f} s"
        if face.get("person"):
            who = f'is of "{face["person"]}"'
        elif face.get("candidate"):
            who = f'may be "{face["candidate"]}"'
        elif face.get("cluster") is not None:
            who = f"is of unknown person #{face['cluster']}"
        else:
            who = "is of an unknown person"
        parts.append(f"{where} {who}{_attribute_phrase(face)}.")
    medium = "video" if record.get("kind") == "video" else "image"
    if not record["faces"]:
        parts.append(f"No people in the {medium}.")
    else:
        parts.append(f"And {_head_count(record['faces'])} in the {medium}.")
    return " ".join(parts)


def _attribute_phrase(face: dict) -> str:
    """``, a "man" aged about 35 expressing "neutral" emotion`` from whatever of the three is known."""
    words = []
    if face.get("gender"):
        words.append(f'a "{face["gender"]}"')
    if face.get("age") is not None:
        words.append(f"aged about {face['age']}")
    if face.get("expression"):
        words.append(f'expressing "{face["expression"]}" emotion')
    return ", " + " ".join(words) if words else ""


def _number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _head_count(faces: list[dict]) -> str:
    """``one man and two women`` when every gender is known, ``one man and one other person`` when some are,
    ``three people`` when none is."""
    men = sum(1 for f in faces if f.get("gender") == "man")
    women = sum(1 for f in faces if f.get("gender") == "woman")
    others = len(faces) - men - women
    groups = []
    if men:
        groups.append(f"{_number(men)} {'man' if men == 1 else 'men'}")
    if women:
        groups.append(f"{_number(women)} {'woman' if women == 1 else 'women'}")
    if others:
        noun = "person" if others == 1 else "people"
        groups.append(f"{_number(others)} {'other ' if groups else ''}{noun}")
    return " and ".join(groups)


def annotation(record: dict) -> str:
    """The sentence, then the file, the time stamp, ``(lat, lon)`` and the place name, one per line (when known)."""
    lines = [record.get("description") or describe(record), record["path"]]
    if record.get("taken_at"):
        lines.append(record["taken_at"])
    if record.get("gps"):
        lines.append(f"({round(record['gps']['lat'], 6)}, {round(record['gps']['lon'], 6)})")
    if record.get("place"):
        lines.append(repr(record["place"]))
    return "\n".join(lines)


def export(
    lib: Library, fmt: str, out: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None
) -> list[Path]:
    """Write the annotations.

    Args:
        lib: an open library.
        fmt: ``json`` (one file), ``csv`` (one row per face; photos without faces get one row with empty face
            fields) or ``xmp`` (one sidecar per photo with faces).
        out: the JSON/CSV file (default ``people.json`` / ``people.csv`` beside the library); for XMP a folder to
            mirror the photo tree into (default: beside each photo).
        root: XMP with ``out``: the photo tree root to mirror (default: the common folder of all photos).

    Returns:
        The files written.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    records = photo_records(lib)
    if fmt == "json":
        target = Path(out) if out else lib.path.with_name("people.json")
        atomic_write(target, json.dumps({"photos": records}, indent=1).encode())
        return [target]
    if fmt == "csv":
        target = Path(out) if out else lib.path.with_name("people.csv")
        atomic_write(target, to_csv(records).encode())
        return [target]
    written = []
    records = [r for r in records if r.get("kind") != "video"]  # MWG regions describe still images only
    paths = [r["path"] for r in records if r["faces"]]
    base = Path(root) if root else (Path(os.path.commonpath(paths)) if paths else None)
    if base is not None and base.is_file():
        base = base.parent
    for record in records:
        if not record["faces"] or not Path(record["path"]).is_file():  # no sidecar for a photo that is gone
            continue
        photo = Path(record["path"])
        target = photo.with_name(photo.name + ".xmp") if out is None else Path(out) / photo.relative_to(base)
        if out is not None:
            target = target.with_name(target.name + ".xmp")
        atomic_write(target, to_xmp(record).encode())
        written.append(target)
    return written


CSV_FIELDS = [
    "path", "width", "height", "taken_at", "gps_lat", "gps_lon", "face_id", "x1", "y1", "x2", "y2", "landmarks",
    "score", "person", "cluster", "similarity", "assignment", "description", "expression", "expression_probability",
    "gender", "age", "place", "country",
]  # fmt: skip


ATTRIBUTE_FIELDS = ("expression", "expression_probability", "gender", "age")


def to_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in records:
        base = {
            "path": r["path"], "width": r["width"], "height": r["height"], "taken_at": r["taken_at"] or "",
            "gps_lat": r["gps"]["lat"] if r["gps"] else "", "gps_lon": r["gps"]["lon"] if r["gps"] else "",
            "description": r["description"], "place": r.get("place") or "", "country": r.get("country") or "",
        }  # fmt: skip
        if not r["faces"]:
            writer.writerow(base)
        for f in r["faces"]:
            x1, y1, x2, y2 = f["box"]
            writer.writerow(
                {
                    **base, "face_id": f["face_id"], "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                    "landmarks": json.dumps(f["landmarks"]), "score": f["score"], "person": f["person"] or "",
                    "cluster": "" if f["cluster"] is None else f["cluster"],
                    "similarity": "" if f["similarity"] is None else f["similarity"],
                    "assignment": f["assignment"] or "",
                    **{k: "" if f.get(k) is None else f[k] for k in ATTRIBUTE_FIELDS},
                }
            )  # fmt: skip
    return buffer.getvalue()


def to_xmp(record: dict) -> str:
    """An XMP packet with MWG face regions (normalized centre x/y and w/h of each box) and the description."""
    width, height = float(record["width"]), float(record["height"])
    items = []
    for f in record["faces"]:
        x1, y1, x2, y2 = f["box"]
        own = {"Cluster": None if f["person"] else f["cluster"]} | {
            key.capitalize(): f.get(key) for key in ("expression", "gender", "age")
        }
        extra = "".join(f" facetrain:{k}={quoteattr(str(v))}" for k, v in own.items() if v is not None)
        name = f" mwg-rs:Name={quoteattr(f['person'])}" if f["person"] else ""
        area = {
            "x": (x1 + x2) / 2 / width, "y": (y1 + y2) / 2 / height, "w": (x2 - x1) / width, "h": (y2 - y1) / height,
        }  # fmt: skip
        attrs = " ".join(f'stArea:{k}="{v:.6f}"' for k, v in area.items())
        items.append(
            f'      <rdf:li>\n       <rdf:Description{name} mwg-rs:Type="Face"{extra}>\n'
            f'        <mwg-rs:Area {attrs} stArea:unit="normalized"/>\n'
            "       </rdf:Description>\n      </rdf:li>\n"
        )
    from xml.sax.saxutils import escape

    date = f"   <exif:DateTimeOriginal>{record['taken_at']}</exif:DateTimeOriginal>\n" if record["taken_at"] else ""
    if record.get("place"):
        date += f"   <photoshop:City>{escape(record['place'])}</photoshop:City>\n"
    if record.get("country"):
        date += f"   <photoshop:Country>{escape(record['country'])}</photoshop:Country>\n"

    ns = " ".join(f'xmlns:{k}="{v}"' for k, v in NS.items() if k not in ("x", "rdf"))
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{NS["x"]}" x:xmptk="facetrain">\n'
        f' <rdf:RDF xmlns:rdf="{NS["rdf"]}">\n'
        f'  <rdf:Description rdf:about="" {ns}>\n'
        '   <mwg-rs:Regions rdf:parseType="Resource">\n'
        f'    <mwg-rs:AppliedToDimensions stDim:w="{int(width)}" stDim:h="{int(height)}" stDim:unit="pixel"/>\n'
        "    <mwg-rs:RegionList>\n     <rdf:Bag>\n" + "".join(items) + "     </rdf:Bag>\n    </mwg-rs:RegionList>\n"
        "   </mwg-rs:Regions>\n"
        "   <dc:description>\n    <rdf:Alt>\n"
        f'     <rdf:li xml:lang="x-default">{escape(record["description"])}</rdf:li>\n'
        "    </rdf:Alt>\n   </dc:description>\n" + date + "  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n"
        '<?xpacket end="w"?>\n'
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
