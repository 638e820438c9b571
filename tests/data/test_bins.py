"""Verification .bin: files as Python 2 / MXNet-era scripts wrote them, safe loading, writing, malformed input."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct

import cv2
import numpy as np
import pytest

from facetrain.data.bins import iter_bin_pairs, load_bin_encoded, read_bin, write_bin
from facetrain.data.images import encode_image
from facetrain.errors import DataError


def _img(seed: int, size: int = 112) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _encoded(n: int, ext: str = ".jpg") -> list[bytes]:
    return [encode_image(_img(i, size=24), ext=ext) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------------
# Pickles built opcode by opcode, the way CPython 2.7's cPickle (protocol 2) writes them, memo puts included.
# ----------------------------------------------------------------------------------------------------------------------


class _Py2:
    def __init__(self):
        self.out = [b"\x80\x02"]  # PROTO 2
        self.memo = 0

    def put(self):
        self.out.append(b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo))
        self.memo += 1

    def op(self, raw: bytes, memo: bool = False):
        self.out.append(raw)
        if memo:
            self.put()

    def string(self, data: bytes):  # py2 str: SHORT_BINSTRING 'U' / BINSTRING 'T'
        head = b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))
        self.op(head + data, memo=True)

    def glob(self, module: str, name: str):
        self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n", memo=True)

    def uint8_array(self, data: bytes, module: str = "numpy.core.multiarray"):
        """numpy.ndarray of uint8 as numpy 1.x on Python 2 reduces it."""
        self.glob(module, "_reconstruct")
        self.glob("numpy", "ndarray")
        self.op(b"K\x00\x85", memo=True)  # (0,)
        self.string(b"b")
        self.op(b"\x87", memo=True)  # TUPLE3
        self.op(b"R", memo=True)  # REDUCE
        self.op(b"(K\x01K" + bytes([len(data)]) + b"\x85", memo=True) if len(data) < 256 else self.op(
            b"(K\x01J" + struct.pack("<i", len(data)) + b"\x85", memo=True
        )
        self.glob("numpy", "dtype")
        self.string(b"u1")
        self.op(b"K\x00K\x01\x87", memo=True)
        self.op(b"R", memo=True)
        self.op(b"(K\x03")
        self.string(b"|")
        self.op(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", memo=True)
        self.op(b"b\x89")  # BUILD dtype, then False (fortran order)
        self.string(data)
        self.op(b"t", memo=True)
        self.op(b"b")  # BUILD array

    def bytes(self) -> bytes:
        return b"".join(self.out) + b"."


def py2_bin(images: list[bytes], issame: list[bool], *, as_numpy: bool = False) -> bytes:
    p = _Py2()
    p.op(b"]", memo=True)  # EMPTY_LIST
    p.op(b"(")  # MARK
    for img in images:
        p.uint8_array(img) if as_numpy else p.string(img)
    p.op(b"e")  # APPENDS
    p.op(b"]", memo=True)
    p.op(b"(")
    for s in issame:
        p.op(b"\x88" if s else b"\x89")  # NEWTRUE / NEWFALSE
    p.op(b"e")
    p.op(b"\x86", memo=True)  # TUPLE2
    return p.bytes()


def _globals_in(blob: bytes) -> set[str]:
    return {str(arg) for op, arg, _ in pickletools.genops(blob) if op.name in ("GLOBAL", "STACK_GLOBAL")}


# ----------------------------------------------------------------------------------------------------------------------
# Reading files as they exist in the wild
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_numpy", [False, True])
def test_python2_written_bin(tmp_path, as_numpy):
    images = _encoded(4)
    images[1] = encode_image(_img(9, size=4), ext=".png")  # < 256 bytes: SHORT_BINSTRING; the others BINSTRING
    assert len(images[1]) < 256 < len(images[0])
    blob = py2_bin(images, [True, False], as_numpy=as_numpy)
    pickletools.dis(blob, out=io.StringIO())  # a valid pickle by the stdlib's own disassembler
    (tmp_path / "lfw.bin").write_bytes(blob)
    encoded, issame = load_bin_encoded(tmp_path / "lfw.bin")
    assert encoded == images and issame.dtype == np.bool_ and issame.tolist() == [True, False]
    rgb, same = read_bin(tmp_path / "lfw.bin")
    assert len(rgb) == 4 and rgb[0].shape == (24, 24, 3) and rgb[1].shape == (4, 4, 3)
    ref = cv2.imdecode(np.frombuffer(images[2], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(rgb[2], ref)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_written_bins(tmp_path, protocol):
    images = _encoded(6, ext=".png")
    blob = pickle.dumps((images, [False, True, True]), protocol=protocol)
    if protocol == 2:
        assert "_codecs encode" in _globals_in(blob)  # py3 bytes under protocol 2
    (tmp_path / "a.bin").write_bytes(blob)
    encoded, issame = load_bin_encoded(tmp_path / "a.bin")
    assert encoded == images and issame.tolist() == [False, True, True]


@pytest.mark.parametrize("old_module_name", [False, True])
def test_numpy_arrays_and_numpy_issame(tmp_path, old_module_name):
    images = _encoded(4)
    blob = pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], np.array([True, False])), protocol=2)
    if old_module_name:  # as numpy 1.x wrote it
        blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert "numpy.core.multiarray _reconstruct" in _globals_in(blob)
    (tmp_path / "a.bin").write_bytes(blob)
    encoded, issame = load_bin_encoded(tmp_path / "a.bin")
    assert encoded == images and issame.tolist() == [True, False]


def test_int_issame_accepted_and_iter_pairs(tmp_path):
    images = _encoded(4, ext=".png")
    (tmp_path / "a.bin").write_bytes(pickle.dumps((images, [1, 0]), protocol=4))
    pairs = list(iter_bin_pairs(tmp_path / "a.bin"))
    assert [p[2] for p in pairs] == [True, False]
    np.testing.assert_array_equal(pairs[1][1], cv2.imdecode(np.frombuffer(images[3], np.uint8), 1)[:, :, ::-1])


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def test_write_bin_png_roundtrip_exact_and_py2_compatible(tmp_path):
    arrays = [_img(i, size=112) for i in range(4)]
    write_bin(tmp_path / "x.bin", arrays, [True, False], ext=".png")
    blob = (tmp_path / "x.bin").read_bytes()
    assert blob[:2] == b"\x80\x02" and _globals_in(blob) == set()  # no _codecs: py2 str opcodes only
    ops = {op.name for op, _, _ in pickletools.genops(blob)}
    assert "BINSTRING" in ops and "BINBYTES" not in ops
    images, issame = read_bin(tmp_path / "x.bin")
    for a, b in zip(images, arrays):
        np.testing.assert_array_equal(a, b)
    # arcface_torch's loader: plain pickle with encoding="bytes"
    bins, flags = pickle.loads(blob, encoding="bytes")
    assert isinstance(bins[0], bytes) and flags == [True, False]
    assert not list(tmp_path.glob("*.tmp"))


def test_write_bin_jpeg_default_and_bytes_passthrough(tmp_path):
    arrays = [_img(i) for i in range(2)]
    raw = _encoded(2)
    write_bin(tmp_path / "x.bin", [arrays[0], arrays[1], raw[0], raw[1]], np.array([True, False]))
    encoded, issame = load_bin_encoded(tmp_path / "x.bin")
    assert encoded[2:] == raw and encoded[0][:2] == b"\xff\xd8"
    rgb = read_bin(tmp_path / "x.bin")[0][0]
    assert np.abs(rgb.astype(int) - arrays[0]).mean() < 3  # q95 JPEG of a smooth image


def test_write_bin_errors(tmp_path):
    with pytest.raises(DataError, match="odd"):
        write_bin(tmp_path / "x.bin", _encoded(3), [True])
    with pytest.raises(DataError, match="issame has 2 entries for 1 pairs"):
        write_bin(tmp_path / "x.bin", _encoded(2), [True, False])
    with pytest.raises(DataError, match="image 1 is a str"):
        write_bin(tmp_path / "x.bin", [b"a", "b"], [True])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# Malicious and malformed files
# ----------------------------------------------------------------------------------------------------------------------


def _evil_pickles(marker) -> dict[str, bytes]:
    cmd = f"touch {marker}".encode()
    py = f"open({str(marker)!r}, 'w').write('x')".encode()
    return {
        "posix.system": b"\x80\x02cposix\nsystem\nU" + bytes([len(cmd)]) + cmd + b"\x85R.",
        "os.system": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",  # protocol 0
        "builtins.eval": b"\x80\x02cbuiltins\neval\nU" + bytes([len(py)]) + py + b"\x85R.",
        "__builtin__.eval": b'c__builtin__\neval\n(S"' + py + b'"\ntR.',
        "subprocess.Popen": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\nsubprocess\x8c\x05Popen\x93"
        + b"\x8c\x05touch\x8c"
        + bytes([len(str(marker))])
        + str(marker).encode()
        + b"\x86\x85R.",
        "builtins.getattr": b"\x80\x02cbuiltins\ngetattr\ncbuiltins\nobject\nU\x05mro__\x86R.",
    }


@pytest.mark.parametrize("name", list(_evil_pickles("m")))
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "PWNED"
    blob = _evil_pickles(marker)[name]
    if name != "builtins.getattr":  # the payload really would create the marker with a plain pickle.loads
        pickletools.dis(blob, out=io.StringIO())
    path = tmp_path / "evil.bin"
    path.write_bytes(blob)
    with pytest.raises(DataError) as info:
        load_bin_encoded(path)
    msg = str(info.value)
    assert "\n" not in msg and "evil.bin" in msg and f"'{name}'" in msg
    assert not marker.exists()


def test_malicious_payload_would_run_with_plain_pickle(tmp_path):
    """Control: proves the crafted file above is a live exploit, so the refusal test is meaningful."""
    marker = tmp_path / "PWNED"
    pickle.loads(_evil_pickles(marker)["builtins.eval"])
    assert marker.exists()


def test_codecs_encode_restricted_to_strings(tmp_path):
    blob = b"\x80\x02c_codecs\nencode\nK\x05U\x05latin\x86R."  # encode(5, 'latin') -> refused types
    (tmp_path / "a.bin").write_bytes(blob)
    with pytest.raises(DataError, match="not a valid pickle"):
        load_bin_encoded(tmp_path / "a.bin")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (lambda: py2_bin(_encoded(2), [True])[:-30], "truncated"),
        (lambda: b"", "truncated"),
        (lambda: _encoded(1)[0], "not a valid pickle"),
        (lambda: pickle.dumps({"a": 1}, protocol=2), "expected a pair"),
        (lambda: pickle.dumps((_encoded(2), [True], 3), protocol=2), "expected a pair"),
        (lambda: pickle.dumps((_encoded(3), [True]), protocol=2), "3 images is odd"),
        (lambda: pickle.dumps((_encoded(4), [True]), protocol=2), "issame has 1 entries for 2 image pairs"),
        (lambda: pickle.dumps(([1, 2], [True]), protocol=2), "image 0 is a int"),
        (lambda: pickle.dumps((_encoded(2), ["yes"]), protocol=2), "expected a list of bools"),
        (lambda: pickle.dumps((_encoded(2), [2]), protocol=2), "other than 0/1"),
    ],
)
def test_malformed_bins(tmp_path, content, needle):
    path = tmp_path / "bad.bin"
    path.write_bytes(content())
    with pytest.raises(DataError) as info:
        load_bin_encoded(path)
    msg = str(info.value)
    assert "\n" not in msg and "bad.bin" in msg and needle in msg, msg


def test_missing_file_and_undecodable_image(tmp_path):
    with pytest.raises(DataError, match="cannot read verification bin"):
        load_bin_encoded(tmp_path / "none.bin")
    (tmp_path / "x.bin").write_bytes(py2_bin([b"garbage!", _encoded(1)[0]], [True]))
    with pytest.raises(DataError, match=r"x\.bin image 0: cannot decode image"):
        read_bin(tmp_path / "x.bin")


@pytest.mark.realdata
def test_real_faces_roundtrip(tmp_path, assets_dir):
    crops = sorted((assets_dir / "aligned112" / "barack_obama").glob("*.png"))[:2]
    crops += sorted((assets_dir / "aligned112" / "joe_biden").glob("*.png"))[:1]
    crops += sorted((assets_dir / "aligned112" / "grace_hopper").glob("*.png"))[:1]
    raw = [p.read_bytes() for p in crops]
    write_bin(tmp_path / "real.bin", raw, [True, False])
    images, issame = read_bin(tmp_path / "real.bin")
    assert len(images) == 4 and issame.tolist() == [True, False]
    for img, p in zip(images, crops):
        np.testing.assert_array_equal(img, cv2.imread(str(p), cv2.IMREAD_COLOR)[:, :, ::-1])
