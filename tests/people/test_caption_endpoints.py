"""Caption prompts carry names, expressions and place; both endpoint dialects (Ollama /api/generate and the
OpenAI-compatible /v1/chat/completions) checked against a local server that records the request bodies."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from facetrain.people.caption import INSTRUCTIONS, build_prompt, caption
from facetrain.people.identify import enroll, identify
from facetrain.people.library import Library
from facetrain.people.scan import scan

pytestmark = pytest.mark.realdata


class _Server(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if self.path == "/api/generate":
            answer = {"model": body["model"], "response": " Obama smiles in Paris. ", "done": True}
        elif self.path == "/v1/chat/completions":
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Obama in Paris."}}]}
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    _Server.requests = []
    httpd = HTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", _Server.requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def paris_library(tmp_path, assets_dir, gps_photo, sface) -> Path:
    import importlib.util

    if importlib.util.find_spec("reverse_geocode") is None:
        pytest.skip('place names need reverse_geocode (pip install "facetrain[people]")')
    photos = tmp_path / "photos"
    gps_photo(assets_dir / "images" / "obama.jpg", photos / "paris.jpg", 48.8566, 2.3522)
    (photos / "obama2.jpg").write_bytes((assets_dir / "images" / "obama2.jpg").read_bytes())
    with Library.create(tmp_path / "lib.db", model=sface) as lib:
        scan(lib, photos, progress=False)
        enroll(lib, "Obama", [photos / "obama2.jpg"])
        identify(lib)
    return tmp_path / "lib.db"


def _paris_record(lib_path: Path) -> dict:
    from facetrain.people.annotate import photo_records

    with Library(lib_path) as lib:
        return next(r for r in photo_records(lib) if r["path"].endswith("paris.jpg"))


def test_prompt_has_names_emotions_place_and_rules(paris_library):
    record = _paris_record(paris_library)
    prompt = build_prompt(record)
    (face,) = record["faces"]
    assert '"Obama" at (' in prompt
    assert "Location: Paris, France (GPS 48.85660, 2.35220)." in prompt
    assert "Taken on 2024-05-01 at 10:30:00." in prompt
    assert prompt.endswith(INSTRUCTIONS) and "no lists, no emojis" in prompt
    if face["expression"] is not None:  # fer installed
        assert f'expressing "{face["expression"]}" emotion' in prompt
    assert '"man"' not in prompt and '"woman"' not in prompt  # no gender model: nothing invented


@pytest.mark.parametrize(
    ("api", "suffix", "path", "text"),
    [
        ("ollama", "", "/api/generate", "Obama smiles in Paris."),
        ("auto", "", "/api/generate", "Obama smiles in Paris."),
        ("openai", "", "/v1/chat/completions", "Obama in Paris."),
        ("auto", "/v1", "/v1/chat/completions", "Obama in Paris."),
    ],
)
def test_both_endpoint_dialects(paris_library, server, api, suffix, path, text):
    url, requests = server
    record = _paris_record(paris_library)
    with Library(paris_library) as lib:
        stats = caption(lib, endpoint=url + suffix, model="llava:7b", api=api)
        captions = dict(lib.conn.execute("SELECT path, caption FROM photos"))
    assert stats == {"captioned": 2, "skipped": 0, "failed": 0}
    assert {p for p, _ in requests} == {path}
    body = next(b for _, b in requests if "Paris, France" in json.dumps(b))
    photo = Path(record["path"]).read_bytes()
    if path == "/api/generate":
        assert body["model"] == "llava:7b" and body["stream"] is False
        assert body["prompt"] == build_prompt(record)
        assert base64.b64decode(body["images"][0]) == photo
    else:
        assert body["model"] == "llava:7b" and body["stream"] is False
        (message,) = body["messages"]
        assert message["role"] == "user"
        parts = {p["type"]: p for p in message["content"]}
        assert parts["text"]["text"] == build_prompt(record)
        prefix = "data:image/jpeg;base64,"
        assert parts["image_url"]["image_url"]["url"].startswith(prefix)
        assert base64.b64decode(parts["image_url"]["image_url"]["url"][len(prefix) :]) == photo
    assert captions[record["path"]] == text


def test_unknown_api_is_refused(paris_library):
    from facetrain.errors import ConfigError

    with Library(paris_library) as lib, pytest.raises(ConfigError, match="unknown caption api 'grpc'"):
        caption(lib, endpoint="http://127.0.0.1:1", api="grpc")


def test_json_and_csv_exports_carry_attributes_and_place(paris_library, tmp_path):
    import csv

    from facetrain.people.annotate import export

    with Library(paris_library) as lib:
        (out_json,) = export(lib, "json", tmp_path / "p.json")
        (out_csv,) = export(lib, "csv", tmp_path / "p.csv")
    record = next(r for r in json.loads(out_json.read_text())["photos"] if r["path"].endswith("paris.jpg"))
    assert record["place"] == "Paris" and record["country"] == "France"
    lines = record["annotation"].splitlines()
    assert lines == [record["description"], record["path"], "2024-05-01T10:30:00", "(48.8566, 2.3522)", "'Paris'"]
    (face,) = record["faces"]
    assert {"expression", "expression_probability", "gender", "age"} <= set(face)
    row = next(r for r in csv.DictReader(out_csv.open()) if r["path"].endswith("paris.jpg"))
    assert row["place"] == "Paris" and row["country"] == "France" and row["person"] == "Obama"
    assert row["expression"] == (face["expression"] or "") and row["gender"] == "" and row["age"] == ""
