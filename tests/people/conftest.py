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


def _exif_app1(lat: float, lon: float, when: str) -> bytes:
    """An APP1 Exif segment (little-endian TIFF) with DateTimeOriginal and GPS latitude / longitude, written by hand
    after the EXIF 2.3 layout: IFD0 -> Exif IFD (0x8769) and GPS IFD (0x8825)."""
    import struct

    def rationals(degrees: float) -> bytes:
        d = int(abs(degrees))
        m = int((abs(degrees) - d) * 60)
        s = round(((abs(degrees) - d) * 60 - m) * 60 * 10000)
        return struct.pack("<6I", d, 1, m, 1, s, 10000)

    def ifd(entries: list[tuple[int, int, int, bytes]], start: int) -> bytes:
        """entries: (tag, type, count, value bytes); values over 4 bytes go after the IFD."""
        head = struct.pack("<H", len(entries))
        data_offset = start + 2 + 12 * len(entries) + 4
        extra = b""
        for tag, kind, count, value in entries:
            if len(value) <= 4:
                head += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")
            else:
                head += struct.pack("<HHII", tag, kind, count, data_offset + len(extra))
                extra += value
        return head + struct.pack("<I", 0) + extra

    date = when.encode() + b"\x00"
    ifd0_size = 2 + 12 * 2 + 4
    exif_start = 8 + ifd0_size
    exif_ifd = ifd([(0x9003, 2, len(date), date)], exif_start)
    gps_start = exif_start + len(exif_ifd)
    gps_ifd = ifd(
        [
            (1, 2, 2, b"N" if lat >= 0 else b"S"),
            (2, 5, 3, rationals(lat)),
            (3, 2, 2, b"E" if lon >= 0 else b"W"),
            (4, 5, 3, rationals(lon)),
        ],
        gps_start,
    )
    ifd0 = ifd([(0x8769, 4, 1, struct.pack("<I", exif_start)), (0x8825, 4, 1, struct.pack("<I", gps_start))], 8)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + exif_ifd + gps_ifd
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.fixture
def gps_photo():
    """Write a copy of a JPEG with EXIF GPS + date: ``gps_photo(src, dst, lat, lon, when="2024:05:01 10:30:00")``."""

    def _write(src: Path, dst: Path, lat: float, lon: float, when: str = "2024:05:01 10:30:00") -> Path:
        data = Path(src).read_bytes()
        assert data[:2] == b"\xff\xd8", f"{src} is not a JPEG"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data[:2] + _exif_app1(lat, lon, when) + data[2:])
        return dst

    return _write
