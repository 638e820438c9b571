"""Captioning against a local Ollama-compatible server, the review page's HTTP API, and the CLI end to end."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from facetrain.people.caption import build_prompt, caption
from facetrain.people.cluster import cluster_unknown
from facetrain.people.identify import find
from facetrain.people.library import Library

pytestmark = pytest.mark.realdata


class _FakeOllama(BaseHTTPRequestHandler):
    """Answers /api/generate with the prompt's length and the image's size; records requests."""

    requests: list = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if self.path != "/api/generate":
            self.send_response(404)
            self.end_headers()
            return
        image = base64.b64decode(body["images"][0])
        answer = json.dumps({"model": body["model"], "response": f" caption of {len(image)} bytes ", "done": True})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())


@pytest.fixture
def fake_ollama():
    _FakeOllama.requests = []
    server = HTTPServer(("127.0.0.1", 0), _FakeOllama)
    server.timeout = 0.2
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _FakeOllama.requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_caption_with_local_endpoint(library, scanned_library, fake_ollama, run_cli):
    endpoint, requests = fake_ollama
    photos = scanned_library.parent / "photos"
    code, out, err = run_cli("people", "enroll", library, "Barack Obama", photos / "obama.jpg")
    assert code == 0, err
    with Library(library) as lib:
        stats = caption(lib, endpoint=endpoint, model="tiny-vlm", timeout=10)
        assert stats == {"captioned": 12, "skipped": 0, "failed": 0}
        captions = dict(lib.conn.execute("SELECT path, caption FROM photos").fetchall())
        assert caption(lib, endpoint=endpoint)["skipped"] == 12  # not re-sent
    assert len(requests) == 12
    path, body = next(r for r in requests if "Barack Obama" in r[1]["prompt"])
    assert body["model"] == "tiny-vlm" and body["stream"] is False
    sent = base64.b64decode(body["images"][0])
    match = [p for p in captions if Path(p).read_bytes() == sent]
    assert len(match) == 1 and Path(match[0]).name.startswith("obama")
    assert captions[match[0]] == f"caption of {len(sent)} bytes"
    assert "Taken on" in body["prompt"]


def test_caption_prompts_without_endpoint_and_dead_endpoint(library, tmp_path):
    with Library(library) as lib:
        stats = caption(lib, out=tmp_path / "prompts.json")
        prompts = json.loads((tmp_path / "prompts.json").read_text())
        assert stats["prompts"] == 12 == len(prompts)
        assert any("5 other people are not identified" in p["prompt"] for p in prompts)
        dead = caption(lib, endpoint="http://127.0.0.1:9", timeout=2)
        assert dead["failed"] == 12 and dead["captioned"] == 0
    rec = {"faces": [{"person": "Ann", "box": [0, 0, 10, 20]}], "taken_at": "2020-01-02T03:04:05", "gps": None}
    assert '"Ann" at (5, 10)' in build_prompt(rec) and "2020-01-02 at 03:04:05" in build_prompt(rec)


def _call(base: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_review_api_writes_what_the_cli_sees(library, run_cli):
    from facetrain.people.web import make_server

    with Library(library) as lib:
        cluster_unknown(lib)
    server = make_server(library, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        status, kind, page = _call(base, "/")
        assert status == 200 and kind.startswith("text/html") and b"/api/summary" in page
        summary = json.loads(_call(base, "/api/summary")[2])
        assert summary["people"] == [] and len(summary["clusters"]) == 1
        cluster = summary["clusters"][0]
        status, kind, jpeg = _call(base, f"/face/{cluster['face_ids'][0]}.jpg")
        assert status == 200 and jpeg[:2] == b"\xff\xd8"
        assert json.loads(_call(base, "/api/name", {"cluster": cluster["cluster"], "name": "Obama"})[2])["faces"] == 3
        code, out, _ = run_cli("people", "find", library, "Obama")
        assert code == 0 and len(out.strip().splitlines()) == 3
        person = json.loads(_call(base, "/api/person/Obama")[2])
        assert len(person["photos"]) == 3
        # split one face off, then mark another detection as not a face
        face = person["photos"][0]["faces"][0]["face_id"]
        new = json.loads(_call(base, "/api/split", {"faces": [face]})[2])["cluster"]
        assert json.loads(_call(base, f"/api/cluster/{new}")[2])["faces"][0]["face_id"] == face
        assert len(json.loads(_call(base, "/api/person/Obama")[2])["photos"]) == 2
        other = person["photos"][1]["faces"][0]["face_id"]
        assert json.loads(_call(base, "/api/not_face", {"face": other})[2])["ok"]
        with Library(library) as lib:
            assert [Path(p).name for p, _ in find(lib, "Obama")] == ["obama3.jpg"] or len(find(lib, "Obama")) == 1
            assert lib.conn.execute("SELECT not_face FROM faces WHERE id = ?", (other,)).fetchone()[0] == 1
        status, _, body = _call(base, "/api/name", {"cluster": 99999, "name": "x"})
        assert status == 400 and "no cluster" in json.loads(body)["error"]
        assert _call(base, "/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cli_end_to_end(tmp_path, assets_dir, sface, run_cli):
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "faceapi_sample1.jpg"):
        shutil.copy(assets_dir / "images" / name, photos)
    lib = tmp_path / "lib.db"
    code, out, err = run_cli("people", "init", lib, "--model", sface)
    assert code == 0 and "threshold 0.363" in out
    code, out, err = run_cli("people", "scan", lib, photos)
    assert code == 0 and "4 scanned" in out and "6 faces found" in out, out + err
    code, out, err = run_cli("people", "scan", lib, photos)
    assert code == 0 and "4 unchanged" in out
    code, out, err = run_cli("people", "enroll", lib, "Obama", photos / "obama.jpg")
    assert code == 0 and "identified 1" in out, out
    code, out, _ = run_cli("people", "who", lib, photos / "obama2.jpg")
    assert code == 0 and 'is of "Obama"' in out and out.strip().endswith("And one person in the image.")
    code, out, _ = run_cli("people", "who", lib, photos / "faceapi_sample1.jpg")
    assert out.strip().endswith("And three people in the image.") and "Obama" not in out
    code, out, _ = run_cli("people", "who", lib, assets_dir / "images" / "obama3.jpg")  # not in the library
    assert 'is of "Obama"' in out
    code, out, err = run_cli("people", "enroll", lib, "X", photos / "faceapi_sample1.jpg")
    assert code == 1 and "--face-index" in err
    code, out, err = run_cli("people", "threshold", lib, "0.9")
    assert code == 0 and "threshold 0.9" in out
    code, out, _ = run_cli("people", "find", lib, "Obama")
    assert len(out.strip().splitlines()) == 1  # only the reference is sure at 0.9
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"model": {"name": "sface"}, "results": {"far_target": 1e-3, "threshold": 0.4}}))
    code, out, _ = run_cli("people", "threshold", lib, "--calibration", calib)
    assert "threshold 0.4" in out
    code, out, err = run_cli("people", "export", lib, "--format", "json", "--out", tmp_path / "e.json")
    assert code == 0 and len(json.loads((tmp_path / "e.json").read_text())["photos"]) == 4
    code, out, err = run_cli("people", "find", lib, "Obamma")
    assert code == 1 and "did you mean 'Obama'" in err
    code, out, err = run_cli("people", "forget", lib, "Obama")
    assert code == 0 and "2 faces" in out
    code, out, err = run_cli("people", "list", lib, "--json")
    assert code == 0 and json.loads(out)["counts"]["people"] == 0 and json.loads(out)["people"] == []
    code, out, err = run_cli("people", "list", lib)
    assert code == 0 and ", 0 people (" in out and not out.lstrip().startswith("{")
