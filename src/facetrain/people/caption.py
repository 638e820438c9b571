"""``people caption``: per-photo captioning prompts (names by position, date, place) and, with an Ollama-compatible
endpoint, the captions themselves.

The endpoint contract is Ollama's ``POST {endpoint}/api/generate`` with JSON
``{"model": NAME, "prompt": TEXT, "images": [base64 photo], "stream": false}``, answering JSON whose ``response``
field is the text. The endpoint is whatever the user names (usually a local server); nothing else is contacted.
Without an endpoint the prompts are written to a JSON file instead.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from facetrain.errors import DataError

from .annotate import atomic_write, photo_records
from .library import Library

logger = logging.getLogger(__name__)


def build_prompt(record: dict) -> str:
    """A captioning prompt for one photo record (see :func:`facetrain.people.annotate.photo_records`)."""
    lines = ["Write one short, factual caption for this photo."]
    named = [f for f in record["faces"] if f.get("person")]
    if named:
        who = "; ".join(
            f'"{f["person"]}" at ({round((f["box"][0] + f["box"][2]) / 2)}, {round((f["box"][1] + f["box"][3]) / 2)})'
            for f in named
        )
        lines.append(f"People identified, with the pixel centre of their face: {who}. Use these names.")
    others = len(record["faces"]) - len(named)
    if others:
        lines.append(f"{others} other {'person is' if others == 1 else 'people are'} not identified; do not name them.")
    if record.get("taken_at"):
        lines.append(f"Taken on {record['taken_at'].replace('T', ' at ')}.")
    if record.get("gps"):
        lines.append(f"Location (GPS): {record['gps']['lat']:.5f}, {record['gps']['lon']:.5f}.")
    return " ".join(lines)


def caption(
    lib: Library,
    *,
    endpoint: str | None = None,
    model: str = "llava",
    out: str | os.PathLike | None = None,
    timeout: float = 120.0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Caption every photo with faces (or write the prompts when ``endpoint`` is None).

    Args:
        lib: an open library.
        endpoint: base URL of an Ollama-compatible server, e.g. ``http://127.0.0.1:11434``.
        model: the model name the server knows.
        out: prompts file when there is no endpoint (default ``captions_prompts.json`` beside the library).
        timeout: seconds per request.
        overwrite: re-caption photos that already have a caption.

    Returns:
        ``{"prompts": n}`` or ``{"captioned": n, "skipped": n, "failed": n}``.
    """
    records = [r for r in photo_records(lib) if r["status"] != "error"]
    if endpoint is None:
        target = Path(out) if out else lib.path.with_name("captions_prompts.json")
        prompts = [{"path": r["path"], "prompt": build_prompt(r)} for r in records]
        atomic_write(target, json.dumps(prompts, indent=1).encode())
        return {"prompts": len(prompts), "file": str(target)}
    stats = {"captioned": 0, "skipped": 0, "failed": 0}
    for r in records:
        if r["caption"] and not overwrite:
            stats["skipped"] += 1
            continue
        try:
            text = generate(endpoint, model, build_prompt(r), Path(r["path"]).read_bytes(), timeout=timeout)
        except (DataError, OSError) as exc:
            logger.warning("caption failed for %s: %s", r["path"], exc)
            stats["failed"] += 1
            continue
        with lib.transaction() as conn:
            conn.execute("UPDATE photos SET caption = ? WHERE path = ?", (text, r["path"]))
        stats["captioned"] += 1
    return stats


def generate(endpoint: str, model: str, prompt: str, image: bytes, *, timeout: float = 120.0) -> str:
    """One non-streaming ``/api/generate`` call; returns the ``response`` text.

    Raises:
        DataError: the server cannot be reached, answers an HTTP error, or the answer has no ``response``.
    """
    url = endpoint.rstrip("/") + "/api/generate"
    body = json.dumps(
        {"model": model, "prompt": prompt, "images": [base64.b64encode(image).decode("ascii")], "stream": False}
    ).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise DataError(f"caption endpoint {url} answered HTTP {exc.code}: {exc.read()[:200]!r}") from exc
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        raise DataError(f"caption endpoint {url} failed: {exc}; is the server running?") from exc
    if not isinstance(answer, dict) or not isinstance(answer.get("response"), str):
        raise DataError(f"caption endpoint {url} gave no 'response' text: {str(answer)[:200]}")
    return answer["response"].strip()
