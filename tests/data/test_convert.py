"""Conversions rec <-> folder <-> list, bounded-memory shuffle, shards, atomic output, verify, info, make_bin."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import facetrain.data.convert as convert_mod
from facetrain.data import open_dataset
from facetrain.data.convert import (
    convert_dataset,
    dataset_info,
    external_shuffle,
    make_bin,
    open_source,
    verify_dataset,
)
from facetrain.errors import DataError

COUNTS = [3, 1, 4, 2, 5]  # images per identity: 15 images, 5 identities


def _make_folder(root: Path, counts=COUNTS, *, size: int = 12, seed: int = 0) -> dict[str, list[bytes]]:
    """root/person_<k>/<j>.(png|jpg) with random pixels; returns identity -> encoded bytes in file-name order."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[bytes]] = {}
    for k, n in enumerate(counts):
        name = f"person_{k}"
        (root / name).mkdir(parents=True)
        out[name] = []
        for j in range(n):
            rgb = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            ext = ".png" if (k + j) % 2 else ".jpg"
            data = cv2.imencode(ext, rgb[:, :, ::-1])[1].tobytes()
            (root / name / f"{j:03d}{ext}").write_bytes(data)
            out[name].append(data)
    return out


def _records(path: Path) -> list[tuple[bytes, int]]:
    """(encoded bytes, label) of every record of a dataset, in dataset order."""
    source = open_source(path)
    return [(source.read(i), source.label(i)) for i in range(len(source))]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "faces"
    _make_folder(root)
    return root


def test_folder_to_rec_to_folder_round_trip_keeps_bytes_labels_and_names(folder, tmp_path):
    report = convert_dataset(folder, tmp_path / "rec", to="rec", workers=0)
    assert (report.images, report.identities, report.parts) == (15, 5, 1)
    rec = tmp_path / "rec"
    assert {p.name for p in rec.iterdir()} == {"train.rec", "train.idx", "property", "label_map.json"}
    assert (rec / "property").read_text().strip() == "5,12,12"
    assert _records(rec) == _records(folder)  # grouped by identity, same order, original bytes
    ds = open_dataset(rec)
    assert len(ds) == 15 and ds.num_classes == 5

    back = convert_dataset(rec, tmp_path / "back", to="folder")
    assert back.images == 15
    original = {(p.parent.name, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    restored = {(p.parent.name, p.read_bytes()) for p in (tmp_path / "back").rglob("*") if p.is_file()}
    assert restored == original
    assert _records(tmp_path / "back") == _records(folder)


def test_rec_without_names_goes_to_zero_padded_label_folders_that_sort_numerically(tmp_path):
    root = tmp_path / "faces"
    _make_folder(root, counts=[1] * 11)
    convert_dataset(root, tmp_path / "rec")
    (tmp_path / "rec" / "label_map.json").unlink()
    convert_dataset(tmp_path / "rec", tmp_path / "back", to="folder")
    assert sorted(p.name for p in (tmp_path / "back").iterdir())[:3] == ["00", "01", "02"]
    assert [lab for _, lab in _records(tmp_path / "back")] == list(range(11))


def test_shuffled_rec_is_a_seeded_permutation_of_the_same_records(folder, tmp_path):
    a = convert_dataset(folder, tmp_path / "a", shuffle=True, seed=1)
    convert_dataset(folder, tmp_path / "b", shuffle=True, seed=1)
    convert_dataset(folder, tmp_path / "c", shuffle=True, seed=2)
    assert a.shuffled and a.images == 15
    original, shuffled = _records(folder), _records(tmp_path / "a")
    assert Counter(shuffled) == Counter(original)
    assert shuffled != original
    assert _records(tmp_path / "b") == shuffled  # same seed, same order
    assert _records(tmp_path / "c") != shuffled
    ds = open_dataset(tmp_path / "a")
    assert sorted(ds.labels().tolist()) == sorted(lab for _, lab in original)


def test_external_shuffle_with_tiny_bucket_memory(folder, tmp_path):
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    report = convert_dataset(folder, tmp_path / "rec", shuffle=True, seed=5, shuffle_memory=total // 6)
    assert report.shuffle_buckets >= 6
    # one bucket holds a fraction of the data, not all of it (15 records in >= 6 buckets)
    assert 0 < report.max_bucket_bytes < total * 0.75
    assert Counter(_records(tmp_path / "rec")) == Counter(_records(folder))
    assert not list((tmp_path / "rec").glob(".shuffle*")) and not list((tmp_path / "rec").glob("bucket*"))


def test_external_shuffle_gives_every_permutation_about_equally_often(tmp_path):
    records = [(i, bytes([i]), i) for i in range(3)]
    seen = Counter()
    for seed in range(600):
        out = external_shuffle(iter(records), seed=seed, tmp_dir=tmp_path / "s", num_buckets=2)
        seen[tuple(i for i, _, _ in out)] += 1
    assert set(seen) == set(itertools.permutations(range(3)))
    # 100 expected each; sd = sqrt(600 * 1/6 * 5/6) ~ 9.1
    assert all(abs(count - 100) < 40 for count in seen.values()), seen
    assert not (tmp_path / "s").exists()


@settings(max_examples=30, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=0, max_size=40), max_size=30),
    num_buckets=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_external_shuffle_keeps_every_record_exactly_once(tmp_path_factory, payloads, num_buckets, seed):
    records = [(i, data, i % 3) for i, data in enumerate(payloads)]
    stats: dict = {}
    tmp = tmp_path_factory.mktemp("shuffle")
    out = list(external_shuffle(iter(records), seed=seed, tmp_dir=tmp / "b", num_buckets=num_buckets, stats=stats))
    assert sorted(out) == sorted(records)
    assert stats["records"] == len(records) and stats["buckets"] == num_buckets
    again = list(external_shuffle(iter(records), seed=seed, tmp_dir=tmp / "b", num_buckets=num_buckets))
    assert again == out


def test_parts_read_as_one_dataset_equal_the_unsharded_one(folder, tmp_path):
    convert_dataset(folder, tmp_path / "one", shuffle=True, seed=3)
    report = convert_dataset(folder, tmp_path / "parts", shuffle=True, seed=3, parts=3)
    assert report.parts == 3
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == ["label_map.json", *[f"part-0000{p}.{e}" for p in range(3) for e in ("idx", "rec")], "property"]
    assert _records(tmp_path / "parts") == _records(tmp_path / "one")
    one, parts = open_dataset(tmp_path / "one"), open_dataset(tmp_path / "parts")
    assert len(parts) == len(one) == 15 and parts.num_classes == one.num_classes == 5
    np.testing.assert_array_equal(parts.labels(), one.labels())
    for i in range(len(one)):
        np.testing.assert_array_equal(parts[i][0], one[i][0])
    # every part stands alone (a rank can read only its own) and they are about equal in size
    from facetrain.data.recordio import RecordDataset

    standalone = [RecordDataset(tmp_path / "parts" / f"part-0000{p}.rec") for p in range(3)]
    assert [len(part) for part in standalone] == [5, 5, 5]
    # a part read alone takes the class count of the whole set from the shared property, even when it lacks
    # the highest label
    assert [part.num_classes for part in standalone] == [5, 5, 5]
    assert any(part.labels().max() < 4 for part in standalone)
    # rec -> rec: re-shard the parts into 2 without shuffling keeps the order
    convert_dataset(tmp_path / "parts", tmp_path / "two", parts=2)
    assert _records(tmp_path / "two") == _records(tmp_path / "one")


def test_interrupted_conversion_leaves_no_destination(folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert_mod._check_chunk

    def failing(chunk):
        calls["n"] += 1
        raise KeyboardInterrupt if calls["n"] == 1 else AssertionError("not reached")

    monkeypatch.setattr(convert_mod, "_check_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(folder, tmp_path / "rec", shuffle=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]

    # a failure in the middle of writing (after some records went out) also leaves nothing behind
    monkeypatch.setattr(convert_mod, "_check_chunk", real)
    written = {"n": 0}
    real_ext = convert_mod._image_ext

    def failing_ext(data):
        written["n"] += 1
        if written["n"] == 7:
            raise RuntimeError("disk full")
        return real_ext(data)

    monkeypatch.setattr(convert_mod, "_image_ext", failing_ext)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_dataset(folder, tmp_path / "out", to="folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]


def test_existing_destination_needs_overwrite(folder, tmp_path):
    dst = tmp_path / "rec"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        convert_dataset(folder, dst)
    assert (dst / "keep").exists()
    convert_dataset(folder, dst, overwrite=True)
    assert not (dst / "keep").exists() and (dst / "train.rec").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces", "rec"]


def test_bad_image_in_folder_raises_or_is_skipped_and_reported(folder, tmp_path):
    bad = folder / "person_2" / "000.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"person_2/000\.jpg"):
        convert_dataset(folder, tmp_path / "rec")
    assert not (tmp_path / "rec").exists()
    report = convert_dataset(folder, tmp_path / "rec", on_bad="skip", workers=0)
    assert report.images == 14
    assert [Path(b.where).name for b in report.bad_records] == ["000.jpg"]
    assert len(open_dataset(tmp_path / "rec")) == 14


def test_verify_lists_every_bad_record_by_key_and_offset_in_a_rec(folder, tmp_path):
    from facetrain.data.recordio import write_rec_dataset

    good = _records(folder)
    samples = list(good)
    samples[4] = (b"\xff\xd8\xffnot really a jpeg", samples[4][1])
    samples[9] = (samples[9][0][: len(samples[9][0]) // 3], samples[9][1])
    write_rec_dataset(tmp_path / "rec", samples, image_size=(12, 12), num_classes=5)
    report = verify_dataset(tmp_path / "rec", workers=2)  # exercises the process pool
    assert report.records == 15 and not report.ok
    assert len(report.bad_records) == 2
    source = open_source(tmp_path / "rec")
    assert [b.where for b in report.bad_records] == [source.where(4), source.where(9)]
    assert all(" key " in b.where and " offset " in b.where for b in report.bad_records)
    assert verify_dataset(folder, workers=0).ok


def test_broken_framing_in_a_rec_is_reported_and_skippable(folder, tmp_path):
    convert_dataset(folder, tmp_path / "rec")
    source = open_source(tmp_path / "rec")
    where = source.where(6)
    offset = int(where.rsplit(" offset ", 1)[1])
    with open(tmp_path / "rec" / "train.rec", "r+b") as f:  # destroy the magic word of image 6
        f.seek(offset)
        f.write(b"\0\0\0\0")
    report = verify_dataset(tmp_path / "rec", workers=0)
    assert [b.where for b in report.bad_records] == [where]
    with pytest.raises(DataError, match=f"offset {offset}"):
        convert_dataset(tmp_path / "rec", tmp_path / "copy")
    assert convert_dataset(tmp_path / "rec", tmp_path / "copy", on_bad="skip").images == 14


def test_verify_folder_reports_paths_of_every_bad_file(folder):
    (folder / "person_0" / "000.jpg").write_bytes(b"")
    (folder / "person_4" / "004.jpg").write_bytes(b"\xff\xd8\xff broken")
    report = verify_dataset(folder, workers=0)
    assert report.records == 15
    assert sorted(Path(b.where).name for b in report.bad_records) == ["000.jpg", "004.jpg"]


def test_list_output_is_mxnet_lst(folder, tmp_path):
    report = convert_dataset(folder, tmp_path / "train.lst", to="list")
    lines = (tmp_path / "train.lst").read_text().splitlines()
    assert report.images == len(lines) == 15
    rows = [line.split("\t") for line in lines]
    assert [int(r[0]) for r in rows] == list(range(15))
    assert [int(r[1]) for r in rows] == [lab for _, lab in _records(folder)]
    assert all(Path(r[2]).is_absolute() and Path(r[2]).is_file() for r in rows)
    convert_dataset(folder, tmp_path / "rec")
    with pytest.raises(DataError, match="image-folder source"):
        convert_dataset(tmp_path / "rec", tmp_path / "x.lst", to="list")
    with pytest.raises(DataError, match="rec output only"):
        convert_dataset(folder, tmp_path / "f", to="folder", shuffle=True)


def test_dataset_info_counts_and_size(folder, tmp_path):
    info = dataset_info(folder)
    assert (info.format, info.images, info.identities) == ("folder", 15, 5)
    assert (info.min_per_identity, info.median_per_identity, info.max_per_identity) == (1, 3.0, 5)
    assert info.image_size == (12, 12)
    convert_dataset(folder, tmp_path / "parts", parts=2)
    info = dataset_info(tmp_path / "parts")
    assert (info.format, info.images, info.identities, info.parts, info.image_size) == ("rec-parts", 15, 5, 2, (12, 12))


def test_make_bin_draws_genuine_and_impostor_pairs(folder, tmp_path):
    from facetrain.data.bins import read_bin

    issame = make_bin(folder, tmp_path / "val.bin", num_pairs=6, seed=0)
    images, issame_read = read_bin(tmp_path / "val.bin")
    assert len(images) == 24 and issame_read.tolist() == issame.tolist()
    assert int(issame.sum()) == 6 and len(issame) == 12
    # map every decoded image back to its identity by pixels
    ds = open_dataset(folder)
    by_pixels = {ds[i][0].tobytes(): ds[i][1] for i in range(len(ds))}
    labels = [by_pixels[np.ascontiguousarray(img).tobytes()] for img in images]
    for p, same in enumerate(issame_read):
        assert (labels[2 * p] == labels[2 * p + 1]) == bool(same)
    pair_keys = {(images[2 * p].tobytes(), images[2 * p + 1].tobytes()) for p in range(12)}
    assert len(pair_keys) == 12  # no pair repeats
    again = make_bin(folder, tmp_path / "val2.bin", num_pairs=6, seed=0)
    assert again.tolist() == issame.tolist()
    with pytest.raises(DataError, match="only .* genuine"):
        make_bin(folder, tmp_path / "big.bin", num_pairs=1000)
    with pytest.raises(DataError, match="already exists"):
        make_bin(folder, tmp_path / "val.bin", num_pairs=2)


@pytest.mark.realdata
def test_aligned_asset_faces_round_trip_through_a_shuffled_rec(assets_dir, tmp_path):
    src = assets_dir / "aligned112"
    report = convert_dataset(src, tmp_path / "rec", shuffle=True, seed=0)
    assert (report.images, report.identities) == (28, 5)
    assert (tmp_path / "rec" / "property").read_text().strip() == "5,112,112"
    assert verify_dataset(tmp_path / "rec").ok
    convert_dataset(tmp_path / "rec", tmp_path / "back", to="folder")
    original = sorted((p.parent.name, p.read_bytes()) for p in src.rglob("*.png"))
    restored = sorted((p.parent.name, p.read_bytes()) for p in (tmp_path / "back").rglob("*.png"))
    assert restored == original
