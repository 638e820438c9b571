"""The review page rendered by a real headless Chromium (marked ``browser``; skipped without /usr/bin/chromium)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from facetrain.people.cluster import cluster_unknown
from facetrain.people.library import Library

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [pytest.mark.browser, pytest.mark.realdata]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_page_renders_clusters_and_thumbnails(library, tmp_path):
    from facetrain.people.web import make_server

    with Library(library) as lib:
        cluster_unknown(lib)
        (cluster,) = [r[0] for r in lib.conn.execute("SELECT DISTINCT cluster_id FROM faces WHERE cluster_id > 0")]
    server = make_server(library, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        dom = subprocess.run(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic",
                "--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{server.server_port}/",
            ],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert f'id="cluster-{cluster}"' in dom
    assert dom.count('src="/face/') == 3 and "name cluster" in dom
