"""Place names from EXIF GPS, offline (GeoNames via reverse_geocode), on GPS-tagged copies of asset photos."""

from __future__ import annotations

import importlib.util

import pytest

from facetrain.people.annotate import photo_records
from facetrain.people.attributes import place_name
from facetrain.people.library import Library
from facetrain.people.scan import exif_date_gps, scan

pytestmark = pytest.mark.realdata


@pytest.fixture(autouse=True)
def _needs_reverse_geocode():
    if importlib.util.find_spec("reverse_geocode") is None:
        pytest.skip('reverse_geocode is not installed (pip install "facetrain[people]")')


def test_written_gps_reads_back(tmp_path, assets_dir, gps_photo):
    photo = gps_photo(assets_dir / "images" / "obama.jpg", tmp_path / "a.jpg", 18.325447, 72.9561)
    when, gps = exif_date_gps(photo.read_bytes())
    assert when == "2024-05-01T10:30:00"
    assert gps == pytest.approx((18.325447, 72.9561), abs=1e-6)


def test_place_name_of_known_places():
    assert place_name(48.8566, 2.3522) == ("Paris", "France")
    assert place_name(-33.8688, 151.2093)[1] == "Australia"
    city, country = place_name(18.325447, 72.9561)  # the home-media app's example: a village near Murud, India
    assert country == "India" and city


def test_scan_stores_the_place_of_a_gps_tagged_photo(tmp_path, assets_dir, gps_photo, sface):
    photos = tmp_path / "photos"
    gps_photo(assets_dir / "images" / "obama.jpg", photos / "paris.jpg", 48.8566, 2.3522)
    gps_photo(assets_dir / "images" / "biden.jpg", photos / "sydney.jpg", -33.8688, 151.2093, "2023:12:24 18:00:05")
    (photos / "plain.jpg").write_bytes((assets_dir / "images" / "grace_hopper.jpg").read_bytes())
    with Library.create(tmp_path / "lib.db", model=sface) as lib:
        scan(lib, photos, progress=False)
        records = {r["path"].rsplit("/", 1)[1]: r for r in photo_records(lib)}
    assert records["paris.jpg"]["place"] == "Paris" and records["paris.jpg"]["country"] == "France"
    assert records["sydney.jpg"]["country"] == "Australia"
    assert records["sydney.jpg"]["gps"] == pytest.approx({"lat": -33.8688, "lon": 151.2093}, abs=1e-6)
    assert records["plain.jpg"]["place"] is None and records["plain.jpg"]["gps"] is None  # nothing invented
