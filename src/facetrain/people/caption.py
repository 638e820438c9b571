"""``people caption``: per-photo captioning prompts (names by position, expressions, date, place) and, with a local
vision-model server, the captions themselves.

Two endpoint dialects (``api``; ``auto`` picks ``openai`` when the URL has a ``/v1`` path, else ``ollama``):

* ``ollama``: ``POST {endpoint}/api/generate`` with ``{"model", "prompt", "images": [base64], "stream": false}``,
  answering JSON whose ``response`` field is the text;
* ``openai``: the OpenAI-compatible ``POST {endpoint}/v1/chat/completions`` (llama.cpp's server, LM Studio, vLLM)
  with one user message holding the prompt and the photo as a ``data:`` URL ``image_url``, answering
  ``choices[0].message.content``.

The endpoint is whatever the user names (usually a local server); nothing else is contacted. Without an endpoint the
prompts are written to a JSON file instead. The default prompt follows the home-media app this feature serves: the
names, the emotions and the location must be in the answer, plain text, no lists or emojis.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from facetrain.errors import ConfigError, DataError

from .annotate import atomic_write, photo_records
from .library import Library

logger = logging.getLogger(__name__)

APIS = ("auto", "ollama", "openai")
INSTRUCTIONS = (
    "The caption must mention the names, the emotions and the location given here. Answer in plain text, one or two "
    "sentences: no lists, no emojis, no hashtags, no markdown."
)


def build_prompt(record: dict) -> str:
    """A captioning prompt for one photo record (see :func:`facetrain.people.annotate.photo_records`)."""
    medium = "video" if record.get("kind") == "video" else "photo"
    lines = [f"Write one short, factual caption for this {medium}."]
    named = [f for f in record["faces"] if f.get("person")]
    if named:
        who = "; ".join(f'"{f["person"]}" at {_centre(f)}{_traits(f)}' for f in named)
        lines.append(f"People identified, with the pixel centre of their face: {who}. Use these names.")
    others = [f for f in record["faces"] if not f.get("person")]
    if others:
        lines.append(
            f"{len(others)} other {'person is' if len(others) == 1 else 'people are'} not identified; do not name them."
        )
        traits = "; ".join(f"the face at {_centre(f)}{_traits(f)}" for f in others if _traits(f))
        if traits:
            lines.append(f"Of them: {traits}.")
    if record.get("taken_at"):
        lines.append(f"Taken on {record['taken_at'].replace('T', ' at ')}.")
    gps = record.get("gps")
    if record.get("place"):
        where = record["place"] + (f", {record['country']}" if record.get("country") else "")
        lines.append(f"Location: {where} (GPS {gps['lat']:.5f}, {gps['lon']:.5f}).")
    elif gps:
        lines.append(f"Location (GPS): {gps['lat']:.5f}, {gps['lon']:.5f}.")
    lines.append(INSTRUCTIONS)
    return " ".join(lines)


def _centre(face: dict) -> str:
    x1, y1, x2, y2 = face["box"]
    return f"({round((x1 + x2) / 2)}, {round((y1 + y2) / 2)})"


def _traits(face: dict) -> str:
    """`` (a "man", expressing "happy" emotion)`` from what is known, else empty."""
    words = []
    if face.get("gender"):
        words.append(f'a "{face["gender"]}"' + (f" aged about {face['age']}" if face.get("age") is not None else ""))
    if face.get("expression"):
        words.append(f'expressing "{face["expression"]}" emotion')
    return f" ({', '.join(words)})" if words else ""


def caption(
    lib: Library,
    *,
    endpoint: str | None = None,
    model: str = "llava",
    out: str | os.PathLike | None = None,
    timeout: float = 120.0,
    overwrite: bool = False,
    api: str = "auto",
) -> dict[str, int]:
    """Caption every photo (or write the prompts when ``endpoint`` is None).

    Args:
        lib: an open library.
        endpoint: base URL of the server, e.g. ``http://127.0.0.1:11434`` (Ollama) or ``http://127.0.0.1:8080/v1``.
        model: the model name the server knows.
        out: prompts file when there is no endpoint (default ``captions_prompts.json`` beside the library).
        timeout: seconds per request.
        overwrite: re-caption photos that already have a caption.
        api: ``ollama``, ``openai`` or ``auto`` (see the module docstring).

    Returns:
        ``{"prompts": n}`` or ``{"captioned": n, "skipped": n, "failed": n}``.
    """
    if api not in APIS:
        raise ConfigError(f"unknown caption api {api!r}; use one of {', '.join(APIS)}")
    records = [r for r in photo_records(lib) if r["status"] != "error"]
    if endpoint is None:
        target = Path(out) if out else lib.path.with_name("captions_prompts.json")
        prompts = [{"path": r["path"], "prompt": build_prompt(r)} for r in records]
        atomic_write(target, json.dumps(prompts, indent=1).encode())
        return {"prompts": len(prompts), "file": str(target)}
    stats = {"captioned": 0, "skipped": 0, "failed": 0}
    for r in records:
        if (r["caption"] and not overwrite) or r.get("kind") == "video":  # a video file is no image to send
            stats["skipped"] += 1
            continue
        try:
            image = Path(r["path"]).read_bytes()
            text = generate(endpoint, model, build_prompt(r), image, timeout=timeout, api=api)
        except (DataError, OSError) as exc:
            logger.warning("caption failed for %s: %s", r["path"], exc)
            stats["failed"] += 1
            continue
        with lib.transaction() as conn:
            conn.execute("UPDATE photos SET caption = ? WHERE path = ?", (text, r["path"]))
        stats["captioned"] += 1
    return stats


def generate(endpoint: str, model: str, prompt: str, image: bytes, *, timeout: float = 120.0, api: str = "auto") -> str:
    """One non-streaming request in the endpoint's dialect; returns the answer's text.

    Raises:
        DataError: the server cannot be reached, answers an HTTP error, or the answer holds no text.
    """
    base = endpoint.rstrip("/")
    if api == "auto":
        api = "openai" if "/v1" in urllib.parse.urlparse(base).path else "ollama"
    encoded = base64.b64encode(image).decode("ascii")
    if api == "openai":
        url = base if base.endswith("/chat/completions") else base + ("" if base.endswith("/v1") else "/v1")
        url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        content = [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": f"data:{_mime(image)};base64,{encoded}"}},
        ]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": False}
    else:
        url = base + "/api/generate"
        body = {"model": model, "prompt": prompt, "images": [encoded], "stream": False}
    answer = _post(url, body, timeout)
    if api == "openai":
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
    else:
        text = answer.get("response") if isinstance(answer, dict) else None
    if not isinstance(text, str):
        field = "choices[0].message.content" if api == "openai" else "'response'"
        raise DataError(f"caption endpoint {url} gave no {field} text: {str(answer)[:200]}")
    return text.strip()


def _post(url: str, body: dict, timeout: float):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise DataError(f"caption endpoint {url} answered HTTP {exc.code}: {exc.read()[:200]!r}") from exc
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        raise DataError(f"caption endpoint {url} failed: {exc}; is the server running?") from exc


def _mime(image: bytes) -> str:
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"
