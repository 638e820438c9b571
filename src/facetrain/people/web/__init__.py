"""``people serve``: a small local review page (stdlib ``http.server``, plain HTML/JS, no build step).

Routes (JSON in and out; every action writes to the SQLite library, so the CLI sees it at once):

* ``GET /`` the page; ``GET /face/<id>.jpg`` a face thumbnail cut from its photo.
* ``GET /api/summary``: ``{"people": [...], "clusters": [...]}``.
* ``GET /api/person/<name>``: that person's photos and faces; ``GET /api/cluster/<id>``: a cluster's faces.
* ``POST /api/name`` ``{"cluster": id, "name": str}``; ``POST /api/merge`` ``{"source": str, "target": str}``;
  ``POST /api/split`` ``{"faces": [id, ...]}``; ``POST /api/not_face`` ``{"face": id}``;
  ``POST /api/name_face`` ``{"face": id, "name": str}``.

The server is single-threaded and binds 127.0.0.1 by default; it has no authentication, so do not expose it.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import FacetrainError

from ..cluster import cluster_summary
from ..identify import identify, mark_not_face, merge, name_cluster, name_face, people_summary, photo_faces, split
from ..library import Library

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("index.html")
THUMB = 128


def make_server(library: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765) -> HTTPServer:
    """An HTTPServer bound to (host, port) serving ``library``; port 0 picks a free port (``server.server_port``)."""
    lib = Library(library)

    class Handler(_Handler):
        pass

    Handler.lib = lib
    server = HTTPServer((host, port), Handler)
    return server


class _Handler(BaseHTTPRequestHandler):
    lib: Library

    def log_message(self, fmt, *args) -> None:  # route the access log to logging, not stderr
        logger.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        try:
            if path in ("/", "/index.html"):
                return self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            if path == "/api/summary":
                return self._json({"people": people_summary(self.lib), "clusters": cluster_summary(self.lib)})
            if path.startswith("/api/person/"):
                return self._json(self._person(path[len("/api/person/") :]))
            if path.startswith("/api/cluster/"):
                return self._json(self._cluster(int(path[len("/api/cluster/") :])))
            if path.startswith("/face/") and path.endswith(".jpg"):
                return self._send(200, face_thumbnail(self.lib, int(path[6:-4])), "image/jpeg")
            return self._json({"error": f"no route {path}"}, 404)
        except (FacetrainError, ValueError) as exc:
            return self._json({"error": str(exc)}, 400)

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlparse(self.path).path
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if path == "/api/name":
                result = {"faces": name_cluster(self.lib, int(body["cluster"]), _name(body))}
                identify(self.lib)  # the newly named faces may identify others
            elif path == "/api/merge":
                result = {"faces": merge(self.lib, str(body["source"]), str(body["target"]))}
            elif path == "/api/split":
                result = {"cluster": split(self.lib, [int(f) for f in body["faces"]])}
            elif path == "/api/not_face":
                mark_not_face(self.lib, int(body["face"]))
                result = {}
            elif path == "/api/name_face":
                name_face(self.lib, int(body["face"]), _name(body))
                identify(self.lib)
                result = {}
            else:
                return self._json({"error": f"no route {path}"}, 404)
        except (FacetrainError, ValueError, KeyError, TypeError) as exc:
            return self._json({"error": f"{type(exc).__name__}: {exc}"}, 400)
        return self._json({"ok": True, **result})

    def _person(self, name: str) -> dict:
        pid = self.lib.person_id(name)
        rows = self.lib.conn.execute(
            "SELECT DISTINCT ph.id, ph.path FROM faces f JOIN photos ph ON ph.id = f.photo_id WHERE f.person_id = ? "
            "AND f.assignment IN ('reference', 'manual', 'auto') ORDER BY ph.path",
            (pid,),
        ).fetchall()
        photos = [{"photo_id": i, "path": p, "faces": photo_faces(self.lib, i)} for i, p in rows]
        return {"name": name, "photos": photos}

    def _cluster(self, cluster: int) -> dict:
        rows = self.lib.conn.execute(
            "SELECT f.id, ph.path FROM faces f JOIN photos ph ON ph.id = f.photo_id WHERE f.cluster_id = ? "
            "AND f.not_face = 0 ORDER BY f.id",
            (cluster,),
        ).fetchall()
        return {"cluster": cluster, "faces": [{"face_id": i, "path": p} for i, p in rows]}

    def _json(self, data, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _name(body: dict) -> str:
    name = str(body["name"]).strip()
    if not name or name.isdigit():
        raise ValueError(f"a person's name must be non-empty text, not {body['name']!r}")
    return name


def face_thumbnail(lib: Library, face_id: int, size: int = THUMB) -> bytes:
    """JPEG bytes of a square crop around a face (box grown by 30%), ``size`` pixels wide."""
    from facetrain.align import read_image

    row = lib.conn.execute(
        "SELECT ph.path, f.x1, f.y1, f.x2, f.y2, f.frame_time FROM faces f JOIN photos ph ON ph.id = f.photo_id "
        "WHERE f.id = ?",
        (face_id,),
    ).fetchone()
    if row is None:
        raise ValueError(f"no face {face_id}")
    if row[5] is not None:
        from ..video import read_frame

        image = read_frame(row[0], row[5])
    else:
        image = read_image(row[0])
    x1, y1, x2, y2 = row[1:5]
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.65
    h, w = image.shape[:2]
    a, b = int(max(0, cx - half)), int(max(0, cy - half))
    crop = image[b : int(min(h, cy + half)), a : int(min(w, cx + half))]
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR))
    return data.tobytes()


def serve(library: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted."""
    server = make_server(library, host, port)
    logger.info("review page on http://%s:%d/", host, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
