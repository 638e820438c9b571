"""Fixtures of the people-library tests: one scanned library of the 12 asset photos, copied per test."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

SFACE = "models/face_recognition_sface_2021dec_int8bq.onnx"


@pytest.fixture(scope="session")
def sface(assets_dir: Path) -> Path:
    return assets_dir / SFACE


@pytest.fixture(scope="session")
def scanned_library(tmp_path_factory, assets_dir: Path, sface: Path) -> Path:
    """A library of all 12 asset photos (photos copied to a session folder), scanned once; do not modify it."""
    from facetrain.people.library import Library
    from facetrain.people.scan import scan

    root = tmp_path_factory.mktemp("people_session")
    shutil.copytree(assets_dir / "images", root / "photos")
    with Library.create(root / "lib.db", model=sface) as lib:
        scan(lib, root / "photos", progress=False)
        lib.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return root / "lib.db"


@pytest.fixture
def library(scanned_library: Path, tmp_path: Path) -> Path:
    """A private copy of the scanned library (same photo paths)."""
    target = tmp_path / "lib.db"
    src = sqlite3.connect(str(scanned_library))
    dst = sqlite3.connect(str(target))
    src.backup(dst)
    src.close()
    dst.close()
    return target
