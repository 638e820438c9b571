"""RecordIO without MXNet: framing (incl. split records), IRHeader, idx, reader/writer, dataset layouts, errors."""

from __future__ import annotations

import os
import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facetrain.data.images import encode_image
from facetrain.data.recordio import (
    MAGIC,
    IRHeader,
    RecordDataset,
    RecordReader,
    RecordWriter,
    frame_record,
    pack_record_payload,
    read_idx,
    rebuild_idx,
    unpack_record_payload,
    write_rec_dataset,
)
from facetrain.errors import DataError

MAGIC_LE = struct.pack("<I", MAGIC)  # b"\x0a\x23\xd7\xce"


# ----------------------------------------------------------------------------------------------------------------------
# An independent, test-side implementation of the public layout (dmlc-core recordio.h), written from the spec:
#   frame = <u32 magic 0xced7230a> <u32 lrec = cflag << 29 | len> <len bytes> <zero pad to 4>
#   a payload with the magic word at 4-aligned offsets i is cut there: parts before are cflag 1 (first) / 2 (middle),
#   the magic itself is dropped, the rest goes in a cflag 3 (last) frame; no cut -> one cflag 0 frame.
# ----------------------------------------------------------------------------------------------------------------------


def spec_frame(payload: bytes) -> bytes:
    cuts = []
    i = 0
    while i + 4 <= len(payload) - len(payload) % 4:
        if payload[i : i + 4] == MAGIC_LE:
            cuts.append(i)
        i += 4
    pieces, start = [], 0
    for c in cuts:
        pieces.append(payload[start:c])
        start = c + 4
    pieces.append(payload[start:])
    out = b""
    for j, piece in enumerate(pieces):
        if len(pieces) == 1:
            cflag = 0
        else:
            cflag = 1 if j == 0 else (3 if j == len(pieces) - 1 else 2)
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(piece)) + piece + b"\0" * (-len(piece) % 4)
    return out


def spec_unframe_all(data: bytes) -> list[bytes]:
    records, cur, pos = [], None, 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        cflag, n = lrec >> 29, lrec & ((1 << 29) - 1)
        piece = data[pos + 8 : pos + 8 + n]
        pos += 8 + n + (-n % 4)
        if cflag in (0, 1):
            cur = piece
        else:
            cur += MAGIC_LE + piece
        if cflag in (0, 3):
            records.append(cur)
    return records


def spec_ir(flag, label, rid, rid2, extra=(), image=b""):
    return struct.pack("<IfQQ", flag, label, rid, rid2) + struct.pack(f"<{len(extra)}f", *extra) + image


def _img(seed: int, size=112, gray=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return img[:, :, 0] if gray else img


def _jpeg(seed: int) -> bytes:
    return encode_image(_img(seed), ext=".jpg", quality=95)


def _png(seed: int) -> bytes:
    return encode_image(_img(seed), ext=".png")


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ----------------------------------------------------------------------------------------------------------------------
# Framing
# ----------------------------------------------------------------------------------------------------------------------

_segments = st.lists(
    st.one_of(st.binary(max_size=9), st.just(MAGIC_LE), st.just(MAGIC_LE + MAGIC_LE)), min_size=0, max_size=8
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(_segments.map(b"".join), min_size=1, max_size=5))
def test_framing_roundtrip_matches_spec(tmp_path_factory, payloads):
    # Byte-identical to the spec writer (so dmlc/MXNet read our files), and the reader inverts it.
    for p in payloads:
        assert frame_record(p) == spec_frame(p)
    d = tmp_path_factory.mktemp("f")
    with RecordWriter(d / "a.rec") as w:
        offsets = [w.write(k * 3, p) for k, p in enumerate(payloads)]
    raw = (d / "a.rec").read_bytes()
    assert raw == b"".join(spec_frame(p) for p in payloads)
    assert spec_unframe_all(raw) == payloads
    r = RecordReader(d / "a.rec")
    assert r.keys.tolist() == [k * 3 for k in range(len(payloads))] and r.offsets.tolist() == offsets
    assert [r.read(k * 3) for k in range(len(payloads))] == payloads
    assert [p for _, p in r.scan()] == payloads
    assert [o for o, _ in r.scan()] == offsets
    for o, p in zip(offsets, payloads):
        got, nxt = r.read_at(o)
        assert got == p and nxt == o + len(spec_frame(p))


def test_split_record_parts_and_padding():
    payload = b"abcd" + MAGIC_LE + b"efgh" + MAGIC_LE + b"xy"  # aligned magic at 4 and 12 -> 3 parts
    framed = frame_record(payload)
    flags = []
    pos = 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        n = lrec & ((1 << 29) - 1)
        flags.append((lrec >> 29, n))
        pos += 8 + n + (-n % 4)
    assert flags == [(1, 4), (2, 4), (3, 2)]
    assert len(framed) % 4 == 0 and framed.endswith(b"xy\0\0")
    unaligned = b"ab" + MAGIC_LE + b"cd"  # magic at offset 2: not split
    assert struct.unpack_from("<II", frame_record(unaligned))[1] >> 29 == 0


def test_record_larger_than_first_read(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    big = big[:4096] + MAGIC_LE + big[4096:] + b"x"  # split at 4096, odd length
    with RecordWriter(tmp_path / "b.rec") as w:
        w.write(0, b"small")
        w.write(1, big)
        w.write(2, b"after")
    r = RecordReader(tmp_path / "b.rec")
    assert r.read(1) == big and r.read(2) == b"after" and [p for _, p in r.scan()] == [b"small", big, b"after"]


# ----------------------------------------------------------------------------------------------------------------------
# IRHeader payloads
# ----------------------------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    labels=st.one_of(
        st.integers(0, 2**20),
        st.lists(st.floats(-1e6, 1e6, width=32), min_size=0, max_size=6),
    ),
    image=st.binary(max_size=40),
    rid=st.integers(0, 2**64 - 1),
    rid2=st.integers(0, 2**64 - 1),
)
def test_payload_roundtrip_matches_mxnet_pack(labels, image, rid, rid2):
    payload = pack_record_payload(labels, image, id=rid, id2=rid2)
    if isinstance(labels, int):  # a number -> flag 0, label in the header
        assert payload == spec_ir(0, float(labels), rid, rid2, image=image)
        expected = [float(labels)]
    else:  # any sequence (even of 1 or 0) -> flag = len, header.label = 0, floats before the image
        assert payload == spec_ir(len(labels), 0.0, rid, rid2, extra=labels, image=image)
        expected = labels if labels else [0.0]
    header, got, img = unpack_record_payload(payload)
    assert header == IRHeader(0 if isinstance(labels, int) else len(labels), header.label, rid, rid2)
    assert img == image and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(expected, dtype=np.float32))


def test_one_element_sequence_is_flag_one_like_mxnet():
    header, labels, img = unpack_record_payload(pack_record_payload([7.0], b"IMG"))
    assert header.flag == 1 and header.label == 0.0 and labels.tolist() == [7.0] and img == b"IMG"


def test_payload_errors():
    with pytest.raises(DataError, match="fewer than the 24-byte IRHeader"):
        unpack_record_payload(b"\0" * 10)
    with pytest.raises(DataError, match="announces 5 extra labels"):
        unpack_record_payload(struct.pack("<IfQQ", 5, 0, 0, 0) + b"\0" * 8)


# ----------------------------------------------------------------------------------------------------------------------
# idx parsing
# ----------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 10**17)), max_size=40),
    sep=st.sampled_from(["\t", " ", "\t "]),
    eol=st.sampled_from(["\n", "\r\n"]),
    trailing_newline=st.booleans(),
    blank_every=st.integers(0, 5),
)
def test_read_idx_matches_python_parse(tmp_path_factory, rows, sep, eol, trailing_newline, blank_every):
    lines = []
    for i, (k, o) in enumerate(rows):
        lines.append(f"{k}{sep}{o}")
        if blank_every and i % blank_every == 0:
            lines.append("")
    text = eol.join(lines) + (eol if trailing_newline and lines else "")
    path = tmp_path_factory.mktemp("idx") / "x.idx"
    path.write_text(text, newline="")
    keys, offsets = read_idx(path)
    assert keys.dtype == np.int64 and offsets.dtype == np.int64
    assert keys.tolist() == [k for k, _ in rows] and offsets.tolist() == [o for _, o in rows]


def test_read_idx_spans_chunks(tmp_path):
    n = 120_000  # > 1 MiB of text: exercises the chunk carry-over
    keys = np.arange(n) * 7
    offs = np.arange(n) * 123457
    (tmp_path / "x.idx").write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offs)))
    k, o = read_idx(tmp_path / "x.idx")
    np.testing.assert_array_equal(k, keys)
    np.testing.assert_array_equal(o, offs)


@pytest.mark.parametrize(
    ("text", "line"),
    [("0\t0\n1\t8\nbad\t16\n", 3), ("0\t0\n1\n", 2), ("0\t0\t5\n", 1), ("0\t0\n\n-1\t4\n", 3), ("1\t2.5\n", 1)],
)
def test_read_idx_malformed_names_line(tmp_path, text, line):
    (tmp_path / "x.idx").write_text(text)
    with pytest.raises(DataError) as info:
        read_idx(tmp_path / "x.idx")
    _one_line(info, "x.idx", f"line {line} ")


# ----------------------------------------------------------------------------------------------------------------------
# A .rec crafted byte by byte from the public layout, read back
# ----------------------------------------------------------------------------------------------------------------------


def test_handcrafted_insightface_rec(tmp_path):
    """3 images of 2 identities, InsightFace layout, one image record split by an aligned magic word in its id."""
    imgs = [_jpeg(0), _png(1), _jpeg(2)]
    labels = [0, 0, 1]
    payloads = [spec_ir(2, 0.0, 0, 0, extra=(4.0, 6.0))]  # header: images 1..3, identities 4..5
    for key, (img, lab) in enumerate(zip(imgs, labels), start=1):
        rid = MAGIC if key == 2 else key  # IRHeader.id == magic puts the magic word at payload offset 8 (aligned)
        payloads.append(spec_ir(0, float(lab), rid, 0, image=img))
    payloads.append(spec_ir(2, 0.0, 4, 0, extra=(1.0, 3.0)))
    payloads.append(spec_ir(2, 0.0, 5, 0, extra=(3.0, 4.0)))
    rec = b""
    idx = ""
    for key, p in enumerate(payloads):
        idx += f"{key}\t{len(rec)}\n"
        rec += spec_frame(p)
    assert struct.unpack_from("<I", rec, len(spec_frame(payloads[0])) + len(spec_frame(payloads[1])) + 4)[0] >> 29 == 1
    (tmp_path / "train.rec").write_bytes(rec)
    (tmp_path / "train.idx").write_text(idx)
    (tmp_path / "property").write_text("2,112,112\n")

    ds = RecordDataset(tmp_path)
    assert ds.layouts == ["insightface"] and len(ds) == 3 and ds.num_classes == 2 and ds.image_size == (112, 112)
    assert ds.image_keys.tolist() == [1, 2, 3]
    assert ds.labels().tolist() == labels  # the split record (key 2) goes through the slow path
    for i in range(3):
        rgb, lab = ds[i]
        ref = cv2.imdecode(np.frombuffer(imgs[i], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(rgb, ref)
        assert lab == labels[i]
    assert ds.encoded(1) == (imgs[1], 0)
    assert ds.locate(2) == (tmp_path / "train.rec", 3)


def test_insightface_boundary_recovered_when_float32_header_is_inexact(tmp_path, monkeypatch):
    """Above 2**24 images the header's float32 (N + 1) can be off; the first identity record marks the boundary."""
    import facetrain.data.recordio as recordio

    monkeypatch.setattr(recordio, "_FLOAT32_EXACT", 4)  # pretend 5 images is "above 2**24"
    payloads = [spec_ir(2, 0.0, 0, 0, extra=(7.0, 8.0))]  # says images 1..6: one too many, as rounding can
    payloads += [spec_ir(0, float(k // 3), k, 0, image=_jpeg(k)) for k in range(1, 6)]
    payloads += [spec_ir(2, 0.0, 6, 0, extra=(1.0, 3.0)), spec_ir(2, 0.0, 7, 0, extra=(3.0, 6.0))]
    rec, idx = b"", ""
    for key, p in enumerate(payloads):
        idx += f"{key}\t{len(rec)}\n"
        rec += spec_frame(p)
    (tmp_path / "train.rec").write_bytes(rec)
    (tmp_path / "train.idx").write_text(idx)
    ds = RecordDataset(tmp_path)
    assert len(ds) == 5 and ds.image_keys.tolist() == [1, 2, 3, 4, 5] and ds.labels().tolist() == [0, 0, 1, 1, 1]


def test_handcrafted_im2rec_multilabel(tmp_path):
    """im2rec layout (no header record); flag > 0 records take the FIRST extra label as identity."""
    payloads = [
        spec_ir(0, 2.0, 0, 0, image=_jpeg(0)),
        spec_ir(3, 0.0, 1, 0, extra=(1.0, 0.25, 9.0), image=_jpeg(1)),
        spec_ir(0, 0.0, 2, 0, image=encode_image(_img(2, gray=True), ext=".png")),  # grayscale PNG
    ]
    rec, idx = b"", ""
    for key, p in zip((10, 11, 12), payloads):
        idx += f"{key}\t{len(rec)}\n"
        rec += spec_frame(p)
    (tmp_path / "x.rec").write_bytes(rec)
    (tmp_path / "x.idx").write_text(idx)
    ds = RecordDataset(tmp_path / "x.rec")
    assert ds.layouts == ["plain"] and len(ds) == 3
    assert ds.labels().tolist() == [2, 1, 0] and ds.num_classes == 3
    assert [ds[i][1] for i in range(3)] == [2, 1, 0]
    gray = ds[2][0]
    assert gray.shape == (112, 112, 3) and np.array_equal(gray[:, :, 0], gray[:, :, 2])
    assert ds.image_keys.tolist() == [10, 11, 12]


# ----------------------------------------------------------------------------------------------------------------------
# write_rec_dataset
# ----------------------------------------------------------------------------------------------------------------------


def _samples(labels):
    return [(_jpeg(i), lab) for i, lab in enumerate(labels)]


def test_write_insightface_grouped_layout_matches_spec(tmp_path):
    labels = [0, 0, 1, 3, 3, 3]  # label 2 has no image
    summary = write_rec_dataset(tmp_path / "ds", _samples(labels))
    assert summary["images"] == 6 and summary["classes"] == 4 and summary["identity_records"] == 4
    assert (tmp_path / "ds" / "property").read_text() == "4,112,112"
    r = RecordReader(tmp_path / "ds" / "train.rec")
    assert r.keys.tolist() == list(range(11))
    header, lab, img = unpack_record_payload(r.read(0))
    assert header.flag == 2 and lab.tolist() == [7.0, 11.0] and img == b""  # images 1..6, identities 7..10
    ranges = [unpack_record_payload(r.read(k))[1].tolist() for k in range(7, 11)]
    assert ranges == [[1.0, 3.0], [3.0, 4.0], [0.0, 0.0], [4.0, 7.0]]
    h, lab, _ = unpack_record_payload(r.read(4))
    assert h == IRHeader(0, 3.0, 4, 0) and lab.tolist() == [3.0]
    ds = RecordDataset(tmp_path / "ds")
    assert ds.labels().tolist() == labels and ds.num_classes == 4 and len(ds) == 6
    assert not list((tmp_path / "ds").glob("*.tmp"))


def test_write_insightface_shuffled_labels_has_empty_identity_range(tmp_path):
    labels = [1, 0, 1, 2]
    summary = write_rec_dataset(tmp_path, _samples(labels), num_classes=5, image_size=(96, 80))
    assert summary["identity_records"] == 0 and summary["classes"] == 5
    r = RecordReader(tmp_path / "train.rec")
    assert unpack_record_payload(r.read(0))[1].tolist() == [5.0, 5.0] and len(r) == 5
    assert (tmp_path / "property").read_text() == "5,96,80"
    ds = RecordDataset(tmp_path)
    assert ds.labels().tolist() == labels and ds.image_size == (96, 80)
    with pytest.raises(DataError) as info:
        ds.num_classes  # noqa: B018 - property says 5, labels give 3
    _one_line(info, "property", "5", "3")


_TINY_PNG = encode_image(np.full((2, 2, 3), 9, np.uint8), ext=".png")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.lists(st.integers(0, 6), min_size=1, max_size=25), grouped=st.booleans())
def test_write_insightface_identity_records_property(tmp_path_factory, labels, grouped):
    if grouped:
        labels = sorted(labels, key=lambda c: (c * 5) % 7)  # contiguous runs, in a non-sorted label order
    d = tmp_path_factory.mktemp("ins")
    summary = write_rec_dataset(d, [(_TINY_PNG, c) for c in labels])
    n, classes = len(labels), max(labels) + 1
    is_grouped = 1 + sum(a != b for a, b in zip(labels, labels[1:])) == len(set(labels))  # one run per label
    r = RecordReader(d / "train.rec")
    head = unpack_record_payload(r.read(0))[1].tolist()
    if is_grouped:
        assert summary["identity_records"] == classes and head == [n + 1, n + 1 + classes]
        for c in range(classes):  # independent expectation: the key range [a, b) of label c, (0, 0) when absent
            keys = [k for k, lab in enumerate(labels, start=1) if lab == c]
            want = [keys[0], keys[-1] + 1] if keys else [0, 0]
            assert unpack_record_payload(r.read(n + 1 + c))[1].tolist() == want
    else:
        assert summary["identity_records"] == 0 and head == [n + 1, n + 1] and len(r) == n + 1
    ds = RecordDataset(d)
    assert ds.labels().tolist() == labels and ds.num_classes == classes and len(ds) == n
    assert [ds[i][1] for i in range(n)] == labels


def test_write_plain_layout(tmp_path):
    labels = [2, 0, 1]
    write_rec_dataset(tmp_path, _samples(labels), layout="plain", prefix="val", write_property=False)
    assert not (tmp_path / "property").exists()
    r = RecordReader(tmp_path / "val.rec")
    assert r.keys.tolist() == [0, 1, 2]
    assert [unpack_record_payload(r.read(k))[0] for k in range(3)] == [
        IRHeader(0, float(lab), k, 0) for k, lab in enumerate(labels)
    ]
    ds = RecordDataset(tmp_path / "val.rec")
    assert ds.layouts == ["plain"] and ds.labels().tolist() == labels and ds.num_classes == 3


def test_write_errors_leave_nothing(tmp_path):
    with pytest.raises(DataError, match="did you mean 'plain'"):
        write_rec_dataset(tmp_path / "a", _samples([0]), layout="plian")

    def gen():
        yield _jpeg(0), 0
        yield b"", 1

    with pytest.raises(DataError, match="sample 1 has no image bytes"):
        write_rec_dataset(tmp_path / "b", gen())
    assert not (tmp_path / "b" / "train.rec").exists() and not list((tmp_path / "b").glob("*"))
    with pytest.raises(DataError, match="labels must be non-negative"):
        write_rec_dataset(tmp_path / "c", [(_jpeg(0), -1)])
    with pytest.raises(DataError, match="at least 4"):
        write_rec_dataset(tmp_path / "d", _samples([3]), num_classes=2)


def test_writer_is_atomic_and_rejects_duplicates(tmp_path):
    rec = tmp_path / "w.rec"
    with pytest.raises(RuntimeError):
        with RecordWriter(rec) as w:
            w.write(0, b"abc")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    w = RecordWriter(rec)
    w.write(5, b"a")
    w.write(3, b"b")
    with pytest.raises(DataError, match="key 5 written twice"):
        w.write(5, b"c")
    w.abort()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# Parts, idx rebuild, bad inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_parts_folder_reads_as_one_dataset(tmp_path):
    write_rec_dataset(tmp_path, _samples([0, 0, 1]), prefix="part-00000", write_property=False)
    write_rec_dataset(tmp_path, _samples([2, 3]), prefix="part-00001", layout="plain", write_property=False)
    (tmp_path / "property").write_text("4,112,112")
    ds = RecordDataset(tmp_path)
    assert len(ds) == 5 and ds.layouts == ["insightface", "plain"] and ds.num_classes == 4
    assert ds.labels().tolist() == [0, 0, 1, 2, 3] and [ds[i][1] for i in range(5)] == [0, 0, 1, 2, 3]
    assert [p.name for p in ds.paths] == ["part-00000.rec", "part-00001.rec"]
    assert ds.image_keys.tolist() == [1, 2, 3, 0, 1]
    (tmp_path / "part-00001.rec").rename(tmp_path / "part-00002.rec")
    with pytest.raises(DataError, match="without gaps"):
        RecordDataset(tmp_path)


def test_missing_idx_is_rebuilt_and_saved(tmp_path):
    write_rec_dataset(tmp_path, _samples([0, 1, 1]))
    original = (tmp_path / "train.idx").read_text()
    (tmp_path / "train.idx").unlink()
    keys, offsets = rebuild_idx(tmp_path / "train.rec")
    assert "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets)) == original
    assert not (tmp_path / "train.idx").exists()
    ds = RecordDataset(tmp_path)
    assert (tmp_path / "train.idx").read_text() == original and ds.labels().tolist() == [0, 1, 1]
    (tmp_path / "train.idx").unlink()
    with pytest.raises(DataError, match="idx file missing"):
        RecordReader(tmp_path / "train.rec", rebuild_idx=False)


def test_rebuilt_idx_kept_in_memory_when_it_cannot_be_saved(tmp_path, monkeypatch, caplog):
    import facetrain.data.recordio as recordio

    write_rec_dataset(tmp_path, _samples([0, 1]), layout="plain")
    (tmp_path / "train.idx").unlink()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(recordio, "write_idx", read_only)
    with caplog.at_level("WARNING"):
        r = RecordReader(tmp_path / "train.rec")
    assert len(r) == 2 and not (tmp_path / "train.idx").exists()
    assert unpack_record_payload(r.read(1))[0].label == 1.0
    assert any("keeping it in memory" in rec.message for rec in caplog.records)


def _rec_with_idx(tmp_path, payloads, keys=None):
    keys = list(range(len(payloads))) if keys is None else keys
    with RecordWriter(tmp_path / "t.rec") as w:
        offs = [w.write(k, p) for k, p in zip(keys, payloads)]
    return tmp_path / "t.rec", offs


def test_truncated_record(tmp_path):
    rec, offs = _rec_with_idx(tmp_path, [spec_ir(0, 0, 0, 0, image=_jpeg(0)), spec_ir(0, 1, 1, 0, image=_jpeg(1))])
    data = rec.read_bytes()
    rec.write_bytes(data[:-100])
    r = RecordReader(rec)
    assert unpack_record_payload(r.read(0))[2] == _jpeg(0)
    with pytest.raises(DataError) as info:
        r.read(1)
    _one_line(info, "t.rec", "record key 1", f"offset {offs[1]}", "truncated record")
    with pytest.raises(DataError) as info:
        list(r.scan())
    _one_line(info, "t.rec", f"offset {offs[1]}", "truncated")


def test_bad_magic(tmp_path):
    rec, offs = _rec_with_idx(tmp_path, [b"a" * 30, b"b" * 30])
    data = bytearray(rec.read_bytes())
    data[offs[1]] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        RecordReader(rec).read(1)
    _one_line(info, "t.rec", "record key 1", f"offset {offs[1]}", "bad magic")
    (tmp_path / "t.idx").write_text(f"0\t0\n1\t{offs[1] + 4}\n")  # idx pointing inside a record
    with pytest.raises(DataError, match="bad magic"):
        RecordReader(rec).read(1)


def test_idx_offset_past_eof_duplicate_and_unknown_keys(tmp_path):
    rec, offs = _rec_with_idx(tmp_path, [b"x" * 8, b"y" * 8], keys=[4, 9])
    size = rec.stat().st_size
    (tmp_path / "t.idx").write_text(f"4\t0\n9\t{size + 8}\n")
    with pytest.raises(DataError) as info:
        RecordReader(rec)
    _one_line(info, "t.idx", "record key 9", f"offset {size + 8}", "past the end")
    (tmp_path / "t.idx").write_text(f"4\t0\n9\t{offs[1]}\n4\t{offs[1]}\n")
    with pytest.raises(DataError) as info:
        RecordReader(rec)
    _one_line(info, "t.idx", "duplicate record key 4", f"{offs[1]}")
    (tmp_path / "t.idx").write_text(f"9\t{offs[1]}\n4\t0\n")  # unsorted keys are fine
    r = RecordReader(rec)
    assert r.read(4) == b"x" * 8 and r.read(9) == b"y" * 8 and r.keys.tolist() == [9, 4]
    with pytest.raises(DataError) as info:
        r.read(5)
    _one_line(info, "t.rec", "unknown record key 5", "4..9")


def _dataset_with_bad_record(tmp_path):
    samples = _samples([0, 1, 2, 3])
    samples[1] = (b"\xff\xd8garbage-not-a-jpeg", 1)
    write_rec_dataset(tmp_path, samples, layout="plain")
    return samples


def test_on_bad_raise_and_skip(tmp_path, caplog):
    samples = _dataset_with_bad_record(tmp_path)
    ds = RecordDataset(tmp_path)
    with pytest.raises(DataError) as info:
        ds[1]
    _one_line(info, "train.rec", "record key 1", "offset", "cannot decode image")
    skip = RecordDataset(tmp_path, on_bad="skip")
    with caplog.at_level("WARNING"):
        img, label = skip[1]
        img2, label2 = skip[1]
    assert label == label2 == 2  # the next good record
    ref = cv2.imdecode(np.frombuffer(samples[2][0], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(img, ref)
    assert len(skip.bad_records) == 1 and "key 1" in skip.bad_records[0].where
    assert sum("skipping bad record" in r.message for r in caplog.records) == 1  # once per bad key
    assert skip.labels().tolist() == [0, 1, 2, 3]


def test_bad_labels_and_property(tmp_path):
    _rec_with_idx(tmp_path, [spec_ir(0, 1.5, 0, 0, image=_jpeg(0))])
    ds = RecordDataset(tmp_path / "t.rec")
    with pytest.raises(DataError) as info:
        ds.labels()
    _one_line(info, "t.rec", "record key 0", "label 1.5")
    with pytest.raises(DataError, match="label 1.5"):
        ds[0]
    _rec_with_idx(tmp_path, [spec_ir(1, 0.0, 0, 0, extra=(float("inf"),), image=_jpeg(0))])
    ds = RecordDataset(tmp_path / "t.rec")
    with pytest.raises(DataError, match="label inf"):
        ds[0]
    with pytest.raises(DataError, match="label inf"):
        ds.labels()
    (tmp_path / "property").write_text("lots,112,112")
    with pytest.raises(DataError, match="expected 'num_classes,H,W'"):
        RecordDataset(tmp_path / "t.rec")


def test_path_resolution_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        RecordDataset(tmp_path / "nope")
    (tmp_path / "trian.rec").write_bytes(b"")
    with pytest.raises(DataError, match="did you mean trian.rec"):
        RecordDataset(tmp_path)
    with pytest.raises(DataError, match="on_bad"):
        RecordDataset(tmp_path, on_bad="ignore")


def test_empty_rec(tmp_path):
    with RecordWriter(tmp_path / "e.rec"):
        pass
    ds = RecordDataset(tmp_path / "e.rec")
    assert len(ds) == 0 and ds.labels().tolist() == [] and ds.num_classes == 0


# ----------------------------------------------------------------------------------------------------------------------
# DataLoader workers
# ----------------------------------------------------------------------------------------------------------------------


def test_reader_reopens_after_fork_and_pickles_without_fd(tmp_path, monkeypatch):
    import pickle

    write_rec_dataset(tmp_path, _samples([0, 1, 1]))
    ds = RecordDataset(tmp_path)
    first = ds[2]
    reader = ds._readers[0]
    parent_fd = reader._fd
    assert parent_fd is not None
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # what a forked worker sees
    img, label = ds[2]
    assert reader._fd is not None and reader._fd != parent_fd and reader._pid == real_pid + 1
    np.testing.assert_array_equal(img, first[0])
    monkeypatch.undo()
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._readers[0]._fd is None
    img2, label2 = clone[2]
    np.testing.assert_array_equal(img2, first[0])
    assert label == label2 == first[1] == 1
    os.close(parent_fd)  # both descriptors belong to this one process: close them by hand
    os.close(reader._fd)


def _collate(batch):
    return batch


def test_dataloader_two_workers_matches_direct_reads(tmp_path):
    torch = pytest.importorskip("torch")
    labels = [i // 3 for i in range(24)]
    write_rec_dataset(tmp_path, _samples(labels))
    ds = RecordDataset(tmp_path)
    direct = [ds[i] for i in range(len(ds))]  # opens the file in this process first: workers must re-open
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=_collate, shuffle=False)
    got = [item for batch in loader for item in batch]
    assert len(got) == len(direct)
    for (a, la), (b, lb) in zip(got, direct):
        assert la == lb
        np.testing.assert_array_equal(a, b)
