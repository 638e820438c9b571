"""People in a photo library: one SQLite file of photos, faces, people and clusters (``facetrain people ...``).

* :mod:`.library`: ``Library`` (create / open, WAL, schema version, model identity, writer lock, thresholds).
* :mod:`.scan`: ``scan(lib, folder)`` incremental, resumable detect + align + embed; EXIF date / GPS.
* :mod:`.video`: frames sampled from videos, faces tracked across frames.
* :mod:`.identify`: ``enroll``, ``identify`` (calibrated threshold + unsure band), name / merge / split / forget,
  ``who``, ``find``, ``FaceIndex``.
* :mod:`.cluster`: ``cluster_unknown`` (incremental density-based clustering with core faces).
* :mod:`.annotate`: ``export`` (JSON, CSV, XMP sidecars with MWG regions) and one-sentence descriptions.
* :mod:`.caption`: prompts and an Ollama-compatible ``/api/generate`` client.
* :mod:`.web`: the review page (stdlib ``http.server``).

Never imports facetrain.models / heads / engine; the embedder comes from :mod:`facetrain.embed`.
"""
