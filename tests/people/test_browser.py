"""The review page end to end in a real headless Chromium driven by selenium (marked ``browser`` and ``realdata``).

Needs Debian's ``chromium`` and ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver, same version) and the
``selenium`` package; each test skips with the reason when one is missing. The server runs in a thread on
127.0.0.1 (port 0); every check of an action reads the SQLite library back (Library API and the CLI).
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.people.cluster import cluster_unknown
from facetrain.people.library import Library

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1000,1200",
)  # fmt: skip
WAIT_S = 15
# an <img>'s content box in CSS px, inside its (transparent) selection border
_CONTENT_BOX = (
    "const e = arguments[0], r = e.getBoundingClientRect(), x = r.left + e.clientLeft, y = r.top + e.clientTop;"
    "return [x, y, x + e.clientWidth, y + e.clientHeight];"
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.realdata,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt chromium)"),
    pytest.mark.skipif(
        not CHROMEDRIVER.exists(), reason="needs Debian chromedriver at /usr/bin/chromedriver (apt chromium-driver)"
    ),
]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """One headless Chromium for the module (fresh profile folder); pages are loaded per test."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    drv = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


@pytest.fixture
def served(library):
    """(library path, base URL, the one unknown cluster's id and face ids) with the server running in a thread."""
    from facetrain.people.web import make_server

    with Library(library) as lib:
        cluster_unknown(lib)
        rows = lib.conn.execute("SELECT cluster_id, id FROM faces WHERE cluster_id > 0 ORDER BY id").fetchall()
    (cluster,) = {c for c, _ in rows}
    server = make_server(library, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield library, f"http://127.0.0.1:{server.server_port}/", cluster, [f for _, f in rows]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


def _status_is(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, "status").text == text, f"status never became {text!r}")


def _load(driver, url: str, n_thumbs: int) -> list:
    """Open the page; wait until ``n_thumbs`` face thumbnails have loaded; return the <img> elements."""
    from selenium.webdriver.common.by import By

    driver.get(url)

    def loaded(d):
        imgs = d.find_elements(By.CSS_SELECTOR, "#clusters img[data-face]")
        done = len(imgs) == n_thumbs and all(d.execute_script("return arguments[0].complete", i) for i in imgs)
        return imgs if done else False

    return _wait(driver, loaded, f"{n_thumbs} thumbnails never loaded")


def _click_face(driver, face_id: int, scope: str) -> None:
    from selenium.webdriver.common.by import By

    img = driver.find_element(By.CSS_SELECTOR, f'{scope} img[data-face="{face_id}"]')
    img.click()
    _wait(driver, lambda d: "selected" in img.get_attribute("class").split(), f"face {face_id} not selected")


def _face(library: Path, face_id: int) -> tuple:
    with Library(library) as lib:
        return lib.conn.execute(
            "SELECT p.name, f.assignment, f.cluster_id, f.not_face FROM faces f LEFT JOIN people p "
            "ON p.id = f.person_id WHERE f.id = ?",
            (face_id,),
        ).fetchone()


def test_screenshot_shows_faces(driver, served, tmp_path):
    """The thumbnails decode (naturalWidth > 0) and the screenshot shows image content inside each of them."""
    from selenium.webdriver.common.by import By

    library, url, cluster, faces = served
    imgs = _load(driver, url, len(faces))
    assert len(faces) == 3
    assert driver.find_element(By.ID, f"cluster-{cluster}").is_displayed()
    for img in imgs:  # decoded: naturalWidth > 0 (the server's thumbnails are 128 px)
        assert driver.execute_script("return arguments[0].naturalWidth", img) == 128
    driver.execute_script("arguments[0].scrollIntoView()", imgs[0])
    png = driver.get_screenshot_as_png()
    (tmp_path / "review_page.png").write_bytes(png)
    shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert shot is not None and shot.ndim == 3
    ratio = driver.execute_script("return window.devicePixelRatio") or 1
    stds, boxes = [], []
    for img in imgs:
        x1, y1, x2, y2 = (int(round(v * ratio)) for v in driver.execute_script(_CONTENT_BOX, img))
        crop = shot[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        assert crop.shape[0] > 60 and crop.shape[1] > 60, ((x1, y1, x2, y2), shot.shape)
        stds.append(float(crop.std()))
        boxes.append(shot[y1:y2, x1:x2])
    # a broken image renders as a flat box (or a small icon on white); a real face crop has std in the tens
    assert min(stds) > 15, stds
    blank = shot[-int(40 * ratio) :, -int(40 * ratio) :]  # bottom-right corner: empty white page
    assert blank.std() < 2, blank.std()
    # and the pixels shown are the server's face crop (/face/ID.jpg), scaled from 128 to 96 CSS px
    from facetrain.people.web import face_thumbnail

    with Library(library) as lib:
        thumb = cv2.imdecode(np.frombuffer(face_thumbnail(lib, faces[0]), np.uint8), cv2.IMREAD_COLOR)
    thumb = cv2.resize(thumb, boxes[0].shape[1::-1], interpolation=cv2.INTER_AREA)
    corr = np.corrcoef(boxes[0].astype(np.float32).ravel(), thumb.astype(np.float32).ravel())[0, 1]
    assert corr > 0.9, corr


def test_clicks_write_to_library(driver, served, run_cli):
    """Not a face, name cluster, split, merge: real clicks and typing, each checked in SQLite and by the CLI."""
    from selenium.webdriver.common.by import By

    library, url, cluster, faces = served
    kept, moved, wrong = faces
    _load(driver, url, 3)

    # mark one of the cluster's faces "not a face"
    _click_face(driver, wrong, f"#cluster-{cluster}")
    driver.find_element(By.CSS_SELECTOR, 'button[data-action="not-face"]').click()
    _status_is(driver, "marked 1 as not a face")
    assert _face(library, wrong) == (None, None, None, 1)
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#clusters img[data-face]")) == 2, "page not reloaded")

    # name the cluster
    box = driver.find_element(By.CSS_SELECTOR, f'#cluster-{cluster} input[data-role="cluster-name"]')
    box.send_keys("Barack Obama")
    driver.find_element(By.CSS_SELECTOR, f'#cluster-{cluster} button[data-action="name-cluster"]').click()
    _status_is(driver, f"named cluster {cluster}")
    assert _face(library, kept)[:3] == _face(library, moved)[:3] == ("Barack Obama", "manual", None)
    code, out, _ = run_cli("people", "list", library)
    assert code == 0 and "Barack Obama: 2 faces in 2 photos" in out and f"cluster {cluster}:" not in out, out

    # open the person and split one face off into a new cluster
    person = _wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, 'button[data-person="Barack Obama"]'),
        "no person button after naming",
    )[0]
    person.click()
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detail img[data-face]")) == 2, "no detail faces")
    _click_face(driver, moved, "#detail")
    driver.find_element(By.CSS_SELECTOR, 'button[data-action="split"]').click()
    _wait(driver, lambda d: d.find_element(By.ID, "status").text.startswith("new cluster "), "split gave no status")
    new_cluster = int(driver.find_element(By.ID, "status").text.split()[-1])
    assert _face(library, moved) == (None, "split", new_cluster, 0)
    code, out, _ = run_cli("people", "list", library)
    assert "Barack Obama: 1 faces in 1 photos" in out and f"cluster {new_cluster}: 1 faces" in out, out

    # merge the split-off cluster back into the person through the merge inputs
    _wait(driver, lambda d: d.find_elements(By.ID, f"cluster-{new_cluster}"), "split cluster not shown")
    driver.find_element(By.CSS_SELECTOR, 'input[data-role="merge-source"]').send_keys(str(new_cluster))
    driver.find_element(By.CSS_SELECTOR, 'input[data-role="merge-target"]').send_keys("Barack Obama")
    driver.find_element(By.CSS_SELECTOR, 'button[data-action="merge"]').click()
    _status_is(driver, "merged 1 faces")
    assert _face(library, moved)[:3] == ("Barack Obama", "manual", None)
    code, out, _ = run_cli("people", "list", library)
    assert code == 0 and "Barack Obama: 2 faces in 2 photos" in out and "cluster " not in out, out
    _wait(driver, lambda d: not d.find_elements(By.ID, f"cluster-{new_cluster}"), "merged cluster still shown")
