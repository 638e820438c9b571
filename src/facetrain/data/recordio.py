"""MXNet RecordIO (``.rec`` + ``.idx`` + ``property``) read and written in pure Python, without MXNet.

Byte layout (public; dmlc-core ``recordio.h``, mxnet ``recordio.py``; see docs/formats.md):

* A **frame** is ``uint32 magic 0xced7230a`` | ``uint32 lrec = cflag << 29 | length`` | ``length`` payload bytes |
  zero padding to a multiple of 4, all little-endian.
* A logical **record** whose payload holds the magic word at a 4-byte-aligned position ``i`` is split there: the
  writer emits the bytes before it as a frame with cflag 1 (first) or 2 (middle), drops the 4 magic bytes, and ends
  with a frame of cflag 3 (last); the reader joins the parts and puts the magic word back between them. cflag 0 is a
  whole record. Parts before the last have lengths that are multiples of 4, so only the last part is padded.
* The **payload** of an image record is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2; 24 bytes), then ``flag``
  float32 extra labels when ``flag > 0``, then the encoded image.
* The **idx** file has one text line ``key<TAB>offset`` per record (offset of its first frame).
* **InsightFace layout**: record 0 is a header with no image whose labels are ``(N + 1, N + 1 + C)``: images are keys
  ``1..N`` (label = identity), keys ``N + 1 .. N + C`` are identity records whose labels ``(a, b)`` give the image-key
  range ``[a, b)`` of identity ``key - N - 1``. **im2rec layout**: every key is an image.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.errors import DataError, closest

log = logging.getLogger(__name__)

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordDataset",
    "RecordReader",
    "RecordWriter",
    "frame_record",
    "pack_record_payload",
    "read_idx",
    "rebuild_idx",
    "unpack_record_payload",
    "write_idx",
    "write_rec_dataset",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_IR_HEAD = struct.Struct("<If")
_F32 = struct.Struct("<f")
_LEN_MASK = (1 << 29) - 1
MAX_PAYLOAD = 1 << 29  # dmlc refuses records of 2**29 bytes or more (29 length bits)
_FLOAT32_EXACT = 1 << 24  # integers above this are not all representable in the float32 header labels
_MAX_FIRST_READ = 1 << 20  # bytes fetched by the first pread of a record; larger records take a second one


# ----------------------------------------------------------------------------------------------------------------------
# Payload: IRHeader + extra labels + image bytes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IRHeader:
    """MXNet image-record header (``struct <IfQQ``, 24 bytes).

    Attributes:
        flag: number of float32 extra labels after the header (0: the label is ``label``).
        label: the label when ``flag == 0`` (0 otherwise).
        id: record id (im2rec writes the list index; InsightFace the key).
        id2: second id (unused by image datasets).
    """

    flag: int
    label: float
    id: int
    id2: int


def pack_record_payload(
    labels: float | Sequence[float] | np.ndarray, image_bytes: bytes, *, id: int = 0, id2: int = 0
) -> bytes:
    """Build an image-record payload exactly as ``mxnet.recordio.pack`` does.

    A number gives ``flag = 0`` and ``header.label = labels``. Anything else (a sequence or array, even of one
    element) is flattened to float32: ``flag = size``, ``header.label = 0``, and the floats precede the image.

    Args:
        labels: one label, or a sequence/array of labels.
        image_bytes: encoded image (may be empty, as in InsightFace header and identity records).
        id: ``IRHeader.id``.
        id2: ``IRHeader.id2``.

    Returns:
        The payload bytes.
    """
    if isinstance(labels, numbers.Number):
        head = _IR.pack(0, float(labels), id, id2)
        return head + bytes(image_bytes)
    extra = np.asarray(labels, dtype=np.float32).reshape(-1)
    return _IR.pack(extra.size, 0.0, id, id2) + extra.astype("<f4").tobytes() + bytes(image_bytes)


def unpack_record_payload(payload: bytes | memoryview) -> tuple[IRHeader, np.ndarray, bytes]:
    """Split an image-record payload into header, labels and image bytes (``mxnet.recordio.unpack``).

    Returns:
        ``(header, labels, image_bytes)`` with ``labels`` a float32 array: ``[header.label]`` when ``flag == 0``,
        else the ``flag`` extra labels.

    Raises:
        DataError: the payload is shorter than its header says.
    """
    if len(payload) < _IR.size:
        raise DataError(f"record payload has {len(payload)} bytes, fewer than the 24-byte IRHeader")
    flag, label, rid, rid2 = _IR.unpack_from(payload, 0)
    header = IRHeader(flag, label, rid, rid2)
    if flag == 0:
        return header, np.array([label], dtype=np.float32), bytes(payload[_IR.size :])
    end = _IR.size + 4 * flag
    if len(payload) < end:
        raise DataError(f"record payload has {len(payload)} bytes but its IRHeader announces {flag} extra labels")
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR.size).astype(np.float32)
    return header, labels, bytes(payload[end:])


# ----------------------------------------------------------------------------------------------------------------------
# Framing
# ----------------------------------------------------------------------------------------------------------------------


def frame_record(payload: bytes) -> bytes:
    """Frame one logical record the way dmlc's ``RecordIOWriter::WriteRecord`` does (split at aligned magic words).

    Raises:
        DataError: the payload is 2**29 bytes or longer.
    """
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    n = len(payload)
    if n >= MAX_PAYLOAD:
        raise DataError(f"record payload of {n} bytes is too large for RecordIO (limit {MAX_PAYLOAD - 1} bytes)")
    out = []
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            out.append(_FRAME.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start)))
            out.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    out.append(_FRAME.pack(MAGIC, ((3 if start else 0) << 29) | (n - start)))
    out.append(payload[start:])
    out.append(b"\0" * (-n % 4))
    return b"".join(out)


class _Short(Exception):
    """Internal: the buffer ends before the record does; ``need`` bytes (from the record start) are required."""

    def __init__(self, need: int):
        self.need = need


class _Corrupt(Exception):
    """Internal: the framing is invalid (message says how)."""


def _unframe(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Parse the logical record starting at ``buf[pos]``; returns ``(payload, next_pos)``.

    Raises:
        _Short: ``buf`` ends too early (``need`` is absolute in ``buf``).
        _Corrupt: bad magic, or parts out of order.
    """
    parts = []
    first = True
    size = len(buf)
    while True:
        if pos + 8 > size:
            raise _Short(pos + 8)
        magic, lrec = _FRAME.unpack_from(buf, pos)
        if magic != MAGIC:
            raise _Corrupt(f"bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if first and cflag not in (0, 1):
            raise _Corrupt(f"frame at offset {pos} has cflag {cflag}, a continuation where a record should start")
        if not first and cflag not in (2, 3):
            raise _Corrupt(f"frame at offset {pos} has cflag {cflag} inside a split record (expected 2 or 3)")
        end = pos + 8 + length
        if end > size:
            raise _Short(end)
        if first and cflag == 0:
            return buf[pos + 8 : end], pos + 8 + ((length + 3) & ~3)
        parts.append(buf[pos + 8 : end])
        pos += 8 + ((length + 3) & ~3)
        if cflag == 3:
            return _MAGIC_BYTES.join(parts), pos
        first = False


# ----------------------------------------------------------------------------------------------------------------------
# idx files
# ----------------------------------------------------------------------------------------------------------------------

_IDX_CHUNK = 1 << 20


def read_idx(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an MXNet ``.idx`` file (lines ``key<TAB>offset``) fast and with little memory.

    The text is parsed with vectorized numpy in 1 MiB chunks (no Python object per line); blank lines are ignored.

    Returns:
        ``(keys, offsets)``, both (N,) int64, in file order.

    Raises:
        DataError: unreadable file, or a malformed line (naming the file and the 1-based line number).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n_lines = 0
            last = b"\n"
            while chunk := f.read(_IDX_CHUNK * 4):
                n_lines += chunk.count(b"\n")
                last = chunk[-1:]
            n_lines += last != b"\n"
            keys = np.empty(n_lines, dtype=np.int64)
            offsets = np.empty(n_lines, dtype=np.int64)
            f.seek(0)
            filled = 0
            line_base = 0
            carry = b""
            while True:
                chunk = f.read(_IDX_CHUNK)
                data = carry + chunk
                if chunk:
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:
                        carry = data
                        continue
                    data, carry = data[:cut], data[cut:]
                if data:
                    k, o, lines = _parse_idx_chunk(data, path, line_base)
                    keys[filled : filled + k.size] = k
                    offsets[filled : filled + k.size] = o
                    filled += k.size
                    line_base += lines
                if not chunk:
                    break
    except OSError as exc:
        raise DataError(f"{path}: cannot read idx file ({exc.strerror or exc})") from exc
    return keys[:filled], offsets[:filled]


def _parse_idx_chunk(data: bytes, path: Path, line_base: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse whole lines of an idx file; returns keys, offsets and the number of lines consumed."""
    a = np.frombuffer(data, dtype=np.uint8)
    if a[-1] != 0x0A:
        a = np.append(a, np.uint8(0x0A))
    is_digit = (a - np.uint8(48)) < 10  # wraps below '0', so one comparison tests for a digit
    newlines = np.flatnonzero(a == 0x0A)
    if np.count_nonzero(is_digit) + np.count_nonzero((a == 0x09) | (a == 0x20) | (a == 0x0D)) + newlines.size != a.size:
        _raise_bad_idx_line(data, path, line_base)
    edges = np.flatnonzero(np.diff(is_digit.view(np.int8), prepend=np.int8(0), append=np.int8(0)))
    starts, ends = edges[0::2], edges[1::2]  # digit runs [start, end)
    line_of_token = np.searchsorted(newlines, starts)
    lens = ends - starts
    # Exactly two tokens per non-blank line: tokens pair up on one line, and pairs are on distinct lines.
    if starts.size % 2 or (lens.size and lens.max() > 18):
        _raise_bad_idx_line(data, path, line_base)
    first_line, second_line = line_of_token[0::2], line_of_token[1::2]
    if np.any(first_line != second_line) or np.any(first_line[1:] == first_line[:-1]):
        _raise_bad_idx_line(data, path, line_base)
    # The text is now known to be lines of exactly two unsigned integers of <= 18 digits: numpy's C parser is exact.
    values = np.fromstring(data, dtype=np.int64, sep=" ")
    if values.size != starts.size:  # cannot happen after the checks above; guards numpy parser differences
        _raise_bad_idx_line(data, path, line_base)
    return values[0::2], values[1::2], int(newlines.size)


def _raise_bad_idx_line(data: bytes, path: Path, line_base: int) -> None:
    for i, line in enumerate(data.split(b"\n")):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() and len(f) <= 18 for f in fields):
            shown = line[:60].decode("utf-8", "replace")
            raise DataError(
                f"{path}: line {line_base + i + 1} is {shown!r}, expected 'key<TAB>offset' (two non-negative "
                "integers); fix the line or delete the idx so it is rebuilt from the .rec"
            )
    raise DataError(f"{path}: malformed idx file near line {line_base + 1}; delete it so it is rebuilt from the .rec")


def write_idx(path: str | os.PathLike, keys: np.ndarray, offsets: np.ndarray) -> None:
    """Write an idx file atomically (``key<TAB>offset`` lines, as MXNet's ``MXIndexedRecordIO`` does)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="\n") as f:
            step = 1 << 16
            for i in range(0, len(keys), step):
                k, o = keys[i : i + step].tolist(), offsets[i : i + step].tolist()
                f.write("".join(f"{a}\t{b}\n" for a, b in zip(k, o)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------------------


class RecordWriter:
    """Write a ``.rec`` and its ``.idx`` atomically.

    Records go to ``<name>.tmp`` files that are renamed at :meth:`close`; on an exception inside ``with`` (or
    :meth:`abort`) the temporary files are removed and nothing appears under the final names.

    Args:
        rec_path: the ``.rec`` to create (parent folders are created).
        idx_path: the idx to create; default: ``rec_path`` with suffix ``.idx``.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._tmp_rec = self.rec_path.with_name(self.rec_path.name + ".tmp")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        try:
            self.rec_path.parent.mkdir(parents=True, exist_ok=True)
            self._rec = open(self._tmp_rec, "wb")  # noqa: SIM115 - closed in close()/abort()
            self._idx = open(self._tmp_idx, "w", newline="\n")  # noqa: SIM115
        except OSError as exc:
            raise DataError(f"{self.rec_path}: cannot create record file ({exc.strerror or exc})") from exc
        self._pos = 0
        self._keys = array("q")
        self._key_set: set[int] | None = None
        self._closed = False

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._keys)

    def write(self, key: int, payload: bytes) -> int:
        """Append one record; returns its offset in the ``.rec``.

        Raises:
            DataError: duplicate key, negative key, or payload too large.
        """
        if self._closed:
            raise DataError(f"{self.rec_path}: write after close")
        key = int(key)
        if key < 0:
            raise DataError(f"{self.rec_path}: record key {key} is negative; keys are non-negative integers")
        # Increasing keys (the usual case) need no set; the first out-of-order key switches to one.
        if self._key_set is None and self._keys and key <= self._keys[-1]:
            self._key_set = set(self._keys)
        if self._key_set is not None:
            if key in self._key_set:
                raise DataError(f"{self.rec_path}: record key {key} written twice; keys must be unique")
            self._key_set.add(key)
        frame = frame_record(payload)
        offset = self._pos
        self._rec.write(frame)
        self._idx.write(f"{key}\t{offset}\n")
        self._pos += len(frame)
        self._keys.append(key)
        return offset

    def _overwrite(self, offset: int, payload: bytes) -> None:
        """Replace a record already written at ``offset`` by one whose frame has the same size."""
        frame = frame_record(payload)
        self._rec.seek(offset)
        old = self._rec.tell()
        assert old == offset
        self._rec.write(frame)
        self._rec.seek(self._pos)

    def close(self) -> None:
        """Flush both files and rename them to their final names."""
        if self._closed:
            return
        self._closed = True
        try:
            for f in (self._rec, self._idx):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            os.replace(self._tmp_rec, self.rec_path)
            os.replace(self._tmp_idx, self.idx_path)
        except BaseException:
            self._remove_temps()
            raise

    def abort(self) -> None:
        """Discard everything written (removes the temporary files)."""
        if self._closed:
            return
        self._closed = True
        self._remove_temps()

    def _remove_temps(self) -> None:
        for f in (self._rec, self._idx):
            try:
                f.close()
            except OSError:
                pass
        self._tmp_rec.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------------------


class RecordReader:
    """Random access to the records of a ``.rec`` through its idx.

    The file is opened lazily and re-opened after ``fork`` (the process id is checked), and all reads use
    ``os.pread``, so one reader can be shared by DataLoader workers without a shared file position.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its idx; default: ``rec_path`` with suffix ``.idx``.
        rebuild_idx: when the idx is missing, rebuild it by scanning the ``.rec`` (and save it next to the ``.rec``
            atomically when the folder is writable, else keep it in memory); when False a missing idx is an error.

    Attributes:
        keys: (N,) int64 record keys in idx-file order.
        offsets: (N,) int64 offsets of the records, same order.
    """

    def __init__(
        self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None, *, rebuild_idx: bool = True
    ):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise DataError(f"{self.rec_path}: no such record file")
        self.size = self.rec_path.stat().st_size
        self._fd: int | None = None
        self._pid: int | None = None
        if self.idx_path.is_file():
            keys, offsets = read_idx(self.idx_path)
        elif rebuild_idx:
            keys, offsets = _rebuild_and_maybe_save(self.rec_path, self.idx_path)
        else:
            raise DataError(f"{self.idx_path}: idx file missing; rebuild it with rebuild_idx('{self.rec_path}')")
        self.keys = keys
        self.offsets = offsets
        self._index_keys()

    # -- indexing ----

    def _index_keys(self) -> None:
        keys, offsets, n = self.keys, self.offsets, len(self.keys)
        if n and offsets.max() >= self.size:
            bad = int(np.flatnonzero(offsets >= self.size)[0])
            raise DataError(
                f"{self.idx_path}: record key {keys[bad]} at offset {offsets[bad]}: offset is past the end of "
                f"{self.rec_path} ({self.size} bytes); the .rec is truncated or the idx belongs to another file"
            )
        if n == 0 or np.all(keys[1:] > keys[:-1]):
            self._order = None
            sorted_keys = keys
        else:
            self._order = np.argsort(keys, kind="stable")
            sorted_keys = keys[self._order]
            dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
            if dup.size:
                k = int(sorted_keys[dup[0]])
                at = offsets[self._order[dup[0] : dup[0] + 2]].tolist()
                raise DataError(
                    f"{self.idx_path}: duplicate record key {k} (at offsets {at[0]} and {at[1]}); "
                    "delete the idx so it is rebuilt from the .rec"
                )
        self._sorted_keys = sorted_keys
        self._key0 = int(sorted_keys[0]) if n else 0
        self._contiguous = n > 0 and int(sorted_keys[-1]) - self._key0 == n - 1
        # Bytes from each record's offset to the next record (or EOF): one pread fetches a whole record.
        if n == 0:
            self._extent = offsets
        elif np.all(offsets[1:] > offsets[:-1]):
            self._extent = np.diff(offsets, append=self.size)
        else:
            by_offset = np.argsort(offsets, kind="stable")
            ext = np.diff(offsets[by_offset], append=self.size)
            self._extent = np.empty_like(ext)
            self._extent[by_offset] = ext

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: int) -> int:
        """Index of ``key`` in :attr:`keys`.

        Raises:
            DataError: unknown key.
        """
        key = int(key)
        n = len(self.keys)
        if self._contiguous:
            i = key - self._key0
            if 0 <= i < n:
                return i if self._order is None else int(self._order[i])
        else:
            j = int(np.searchsorted(self._sorted_keys, key))
            if j < n and self._sorted_keys[j] == key:
                return j if self._order is None else int(self._order[j])
        span = f"keys {self._sorted_keys[0]}..{self._sorted_keys[-1]}" if n else "no keys"
        raise DataError(f"{self.rec_path}: unknown record key {key} ({self.idx_path} has {n} records, {span})")

    def __contains__(self, key: int) -> bool:
        try:
            self.position(key)
        except DataError:
            return False
        return True

    # -- reading ----

    def _file(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # After fork the inherited descriptor is shared with the parent; pread has no shared position, but a
            # fresh descriptor per process keeps closing and reopening independent.
            try:
                self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise DataError(f"{self.rec_path}: cannot open ({exc.strerror or exc})") from exc
            self._pid = pid
        return self._fd

    def read(self, key: int) -> bytes:
        """The payload of record ``key``.

        Raises:
            DataError: unknown key, truncated record or bad framing (one line naming file, key and offset).
        """
        i = self.position(key)
        return self._read_at(self.offsets.item(i), self._extent.item(i), i)[0]

    def read_position(self, i: int) -> bytes:
        """The payload of the ``i``-th record in idx order (``keys[i]``)."""
        return self._read_at(self.offsets.item(i), self._extent.item(i), i)[0]

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """The record starting at byte ``offset``; returns ``(payload, next_offset)``."""
        return self._read_at(int(offset), 8192, None)

    def _read_at(self, offset: int, hint: int, pos: int | None) -> tuple[bytes, int]:
        """Read the record at ``offset`` with one pread of ``hint`` bytes when that covers it (``pos``: its index,
        for error messages)."""
        fd = self._file()
        want = max(8, min(hint, self.size - offset, _MAX_FIRST_READ))
        buf = os.pread(fd, want, offset) if offset < self.size else b""
        while True:
            try:
                payload, end = _unframe(buf, 0)
                return payload, offset + end
            except _Short as short:
                if offset + len(buf) >= self.size:
                    raise DataError(
                        f"{self.rec_path}: {self._what(pos, offset)}: truncated record (needs {short.need} bytes, "
                        f"only {max(0, self.size - offset)} left in the file); the .rec is incomplete: re-create or "
                        "re-download it"
                    ) from None
                buf += os.pread(fd, max(short.need, 2 * len(buf)) - len(buf), offset + len(buf))
            except _Corrupt as bad:
                raise DataError(
                    f"{self.rec_path}: {self._what(pos, offset)}: {bad}; the idx does not match this .rec (delete "
                    "the idx to rebuild it) or the file is corrupt"
                ) from None

    def _what(self, pos: int | None, offset: int) -> str:
        return f"record key {self.keys[pos]} at offset {offset}" if pos is not None else f"record at offset {offset}"

    def scan(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """Read the records sequentially from byte ``start``, validating the framing.

        Yields:
            ``(offset, payload)`` per logical record.

        Raises:
            DataError: bad magic or a truncated record (naming the offset and the record's ordinal).
        """
        yield from _scan_file(self.rec_path, start)

    # -- header fields, vectorized ----

    def header_labels(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The identity label of many records, reading only the first bytes of each.

        The label is ``header.label`` when ``flag == 0``, else the first extra label (what ``MXFaceDataset`` uses).

        Args:
            positions: (M,) indices into :attr:`keys`; default all records.

        Returns:
            (M,) float64 labels (not yet checked to be whole numbers).
        """
        pos = np.arange(len(self.keys)) if positions is None else np.asarray(positions, dtype=np.int64)
        out = np.empty(pos.size, dtype=np.float64)
        if pos.size == 0:
            return out
        width = 8 + _IR.size + 4
        mm = np.memmap(self.rec_path, dtype=np.uint8, mode="r")
        try:
            cols = np.arange(width, dtype=np.int64)
            step = 1 << 16
            for s in range(0, pos.size, step):
                p = pos[s : s + step]
                offs = self.offsets[p]
                near_end = offs + width > self.size
                rows = np.where(near_end, 0, offs)[:, None] + cols
                raw = np.ascontiguousarray(mm[rows])
                words = raw.view("<u4")  # (m, 9): magic, lrec, flag, label, id(2), id2(2), extra0
                magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2]
                length, cflag = lrec & _LEN_MASK, lrec >> 29
                label = raw[:, 12:16].copy().view("<f4")[:, 0].astype(np.float64)
                extra = raw[:, 32:36].copy().view("<f4")[:, 0].astype(np.float64)
                ok = (~near_end) & (magic == MAGIC) & (cflag <= 1) & (length >= np.where(flag > 0, 28, 24))
                out[s : s + p.size] = np.where(flag > 0, extra, label)
                for j in np.flatnonzero(~ok):  # split/short/corrupt headers: the full reader gives the exact error
                    i = int(p[j])
                    header, labels, _ = self._unpack(i)
                    out[s + j] = float(labels[0]) if labels.size else 0.0
        finally:
            del mm
        return out

    def _unpack(self, i: int) -> tuple[IRHeader, np.ndarray, bytes]:
        payload = self.read_position(i)
        try:
            return unpack_record_payload(payload)
        except DataError as exc:
            raise DataError(f"{self.rec_path}: record key {self.keys[i]} at offset {self.offsets[i]}: {exc}") from None

    # -- pickling / cleanup ----

    def close(self) -> None:
        """Close the file descriptor of this process (reads re-open it)."""
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def rebuild_idx(
    rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Recreate the index of a ``.rec`` by scanning it; keys are the record ordinals ``0..N-1``.

    Ordinals are what InsightFace's and im2rec's writers use as keys when the list is written in order. When
    ``idx_path`` is given the idx is also written there (atomically).

    Returns:
        ``(keys, offsets)``, (N,) int64 each.

    Raises:
        DataError: the ``.rec`` is missing, truncated or has bad framing.
    """
    rec_path = Path(rec_path)
    if not rec_path.is_file():
        raise DataError(f"{rec_path}: no such record file")
    offs = array("q")
    for offset, _ in _scan_file(rec_path, 0, payloads=False):
        offs.append(offset)
    offsets = np.frombuffer(offs, dtype=np.int64).copy()
    keys = np.arange(offsets.size, dtype=np.int64)
    if idx_path is not None:
        try:
            write_idx(idx_path, keys, offsets)
        except OSError as exc:
            raise DataError(f"{idx_path}: cannot write rebuilt idx ({exc.strerror or exc})") from exc
    return keys, offsets


def _rebuild_and_maybe_save(rec_path: Path, idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    log.warning("%s: idx missing, rebuilding it by scanning %s", idx_path, rec_path)
    keys, offsets = rebuild_idx(rec_path)
    try:
        write_idx(idx_path, keys, offsets)
    except OSError as exc:
        log.warning("%s: cannot save the rebuilt idx (%s); keeping it in memory", idx_path, exc.strerror or exc)
    return keys, offsets


def _scan_file(rec_path: Path, start: int, payloads: bool = True) -> Iterator[tuple[int, bytes]]:
    """Sequential framing scan reading 4 MiB at a time (yields ``(offset, payload or b'')``)."""
    chunk = 1 << 22
    size = rec_path.stat().st_size
    ordinal = 0
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        buf, base, pos = b"", start, 0  # buf holds file bytes [base, base + len(buf))
        while base + pos < size:
            try:
                payload, nxt = _unframe(buf, pos)
            except _Short as short:
                if base + len(buf) >= size:
                    raise DataError(
                        f"{rec_path}: record #{ordinal} at offset {base + pos}: truncated record (needs "
                        f"{short.need - pos} bytes, only {size - base - pos} left); the .rec is incomplete"
                    ) from None
                buf = buf[pos:] + os.pread(fd, max(chunk, short.need - len(buf)), base + len(buf))
                base, pos = base + pos, 0
                continue
            except _Corrupt as bad:
                raise DataError(
                    f"{rec_path}: record #{ordinal} at offset {base + pos}: {bad}; the file is corrupt or not RecordIO"
                ) from None
            yield base + pos, (payload if payloads else b"")
            ordinal += 1
            pos = nxt
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------


class RecordDataset:
    """A face dataset stored as MXNet RecordIO: InsightFace layout or plain im2rec files, one file or several parts.

    ``dataset[i]`` is ``(rgb, label)``: a (H, W, 3) uint8 RGB image and an int identity. Decoding happens in
    ``__getitem__`` (so in DataLoader workers); construction reads only the idx and record 0 of each part.

    Args:
        path: a folder with ``train.rec``/``train.idx`` (+ ``property``), a ``.rec`` file (its idx next to it; a
            ``property`` in the same folder is used), or a folder of parts ``part-00000.rec/.idx, part-00001...`` (+
            one ``property``) read as one dataset (labels are shared across parts).
        on_bad: ``"raise"``: an undecodable record raises DataError naming file, key and offset. ``"skip"``:
            the next good record is returned instead, a warning is logged once per bad key and the record is listed
            in :attr:`bad_records` (per process: each DataLoader worker keeps its own list).

    Attributes:
        paths: the ``.rec`` files, in dataset order.
        layouts: ``"insightface"`` or ``"plain"`` per part.
        image_size: ``(H, W)`` from ``property``, or None.
        bad_records: records skipped so far (``on_bad="skip"``).
    """

    def __init__(self, path: str | os.PathLike, *, on_bad: str = "raise"):
        if on_bad not in ("raise", "skip"):
            raise DataError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        recs, self.property_path = _resolve_rec_paths(Path(path))
        self.paths = recs
        self._readers = [RecordReader(p) for p in recs]
        self.layouts: list[str] = []
        self._part_positions: list[np.ndarray] = []  # per part: positions (into reader.keys) of the image records
        for reader in self._readers:
            layout, positions = _image_positions(reader)
            self.layouts.append(layout)
            self._part_positions.append(positions)
        sizes = np.array([len(k) for k in self._part_positions], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._len = int(self._starts[-1])
        self._single = len(self._readers) == 1
        self._property = _read_property(self.property_path) if self.property_path else None
        self.image_size = self._property[1] if self._property else None
        self._labels: np.ndarray | None = None
        self._num_classes: int | None = None
        self.bad_records: list = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> tuple[int, int]:
        """``(part, position in that part's reader)`` of image ``i``."""
        n = self._len
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        i %= n
        if self._single:
            return 0, self._part_positions[0].item(i)
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return part, self._part_positions[part].item(i - int(self._starts[part]))

    def locate(self, i: int) -> tuple[Path, int]:
        """``(rec path, record key)`` of image ``i``."""
        part, pos = self._locate(i)
        return self.paths[part], int(self._readers[part].keys[pos])

    def encoded(self, i: int) -> tuple[bytes, int]:
        """``(encoded image bytes, label)`` of image ``i`` without decoding (for conversions)."""
        part, pos = self._locate(i)
        reader = self._readers[part]
        header, labels, image = reader._unpack(pos)
        return image, _whole_label(labels, reader, pos)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self.on_bad == "raise":
            return self._load(int(i))
        n = len(self)
        i = int(i) % n if n else int(i)
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except DataError as exc:
                self._mark_bad(j, exc)
        raise DataError(f"{self.paths[0]}: no decodable record in the dataset ({len(self._bad)} bad records)")

    def _load(self, i: int) -> tuple[np.ndarray, int]:
        from facetrain.data.images import decode_or_reason

        part, pos = self._locate(i)
        reader = self._readers[part]
        payload = reader.read_position(pos)
        # Hot path: read the label and slice the image without building arrays (unpack_record_payload is the spec).
        if len(payload) >= _IR.size:
            flag, label = _IR_HEAD.unpack_from(payload, 0)
            start = _IR.size + 4 * flag
            if flag and len(payload) >= start:
                label = _F32.unpack_from(payload, _IR.size)[0]
            if len(payload) >= start and 0 <= label < 2**53 and label == int(label):
                img, reason = decode_or_reason(memoryview(payload)[start:])
                if img is None:
                    raise DataError(
                        f"{reader.rec_path} record key {reader.keys[pos]} at offset {reader.offsets[pos]}: "
                        f"cannot decode image ({reason}); re-create this record from its source image"
                    )
                return img, int(label)
        _, labels, _ = reader._unpack(pos)  # raises the precise error
        _whole_label(labels, reader, pos)
        raise AssertionError("unreachable")  # pragma: no cover

    def _mark_bad(self, i: int, exc: DataError) -> None:
        from facetrain.data.folders import BadRecord

        self._bad.add(i)
        path, key = self.locate(i)
        part, pos = self._locate(i)
        offset = int(self._readers[part].offsets[pos])
        message = str(exc)
        reason = message.split(f"offset {offset}: ", 1)[-1]  # the message without its location prefix
        self.bad_records.append(BadRecord(f"{path} key {key} offset {offset}", reason))
        log.warning("skipping bad record: %s", exc)

    @property
    def image_keys(self) -> np.ndarray:
        """(N,) int64 record keys of the images in dataset order (keys repeat across parts)."""
        return np.concatenate([r.keys[k] for r, k in zip(self._readers, self._part_positions)])

    def labels(self) -> np.ndarray:
        """(N,) int64 labels of every image, read from the record headers only (cached).

        Raises:
            DataError: a label that is negative, not finite or not a whole number (naming file, key, offset).
        """
        if self._labels is None:
            parts = []
            for reader, positions in zip(self._readers, self._part_positions):
                raw = reader.header_labels(positions)
                bad = ~np.isfinite(raw) | (raw < 0) | (raw != np.floor(raw)) | (raw >= 2**53)
                if bad.any():
                    j = int(np.flatnonzero(bad)[0])
                    _whole_label(np.array([raw[j]]), reader, int(positions[j]))
                parts.append(raw.astype(np.int64))
            self._labels = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._labels

    @property
    def num_classes(self) -> int:
        """Number of identities: ``max label + 1``, checked against ``property`` when there is one.

        Raises:
            DataError: ``property`` disagrees with the labels (naming both numbers and the file).
        """
        if self._num_classes is None:
            labels = self.labels()
            from_labels = int(labels.max()) + 1 if labels.size else 0
            if self._property is not None and self._is_single_part() and from_labels <= self._property[0]:
                # One shard of a multi-part set read on its own (a rank's slice): the shared property counts the
                # classes of all parts, and this part need not hold the highest label.
                from_labels = self._property[0]
            if self._property is not None and self._property[0] != from_labels:
                raise DataError(
                    f"{self.property_path}: says {self._property[0]} classes but the labels of "
                    f"{self.paths[0] if len(self.paths) == 1 else self.paths[0].parent} give {from_labels} "
                    "(max label + 1); fix the property file or delete it"
                )
            self._num_classes = from_labels
        return self._num_classes

    def _is_single_part(self) -> bool:
        return len(self.paths) == 1 and re.fullmatch(r"part-\d+\.rec", Path(self.paths[0]).name) is not None

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


def _whole_label(labels: np.ndarray, reader: RecordReader, pos: int) -> int:
    value = float(labels[0]) if labels.size else float("nan")
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise DataError(
            f"{reader.rec_path}: record key {reader.keys[pos]} at offset {reader.offsets[pos]}: label {value} is not "
            "a non-negative whole number; identity labels must be 0..C-1"
        )
    return int(value)


def _resolve_rec_paths(path: Path) -> tuple[list[Path], Path | None]:
    if path.is_file():
        if path.suffix != ".rec":
            raise DataError(f"{path}: not a .rec file; pass a .rec, a folder holding train.rec, or a folder of parts")
        prop = path.parent / "property"
        return [path], prop if prop.is_file() else None
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    prop = path / "property"
    prop_found = prop if prop.is_file() else None
    if (path / "train.rec").is_file():
        return [path / "train.rec"], prop_found
    parts = sorted(path.glob("part-*.rec"))
    if parts:
        expected = [path / f"part-{i:05d}.rec" for i in range(len(parts))]
        if parts != expected:
            missing = sorted(set(expected) - set(parts))
            extra = sorted(set(parts) - set(expected))
            raise DataError(
                f"{path}: rec parts must be numbered part-00000.rec, part-00001.rec, ... without gaps "
                f"(missing {missing[0].name if missing else 'none'}, unexpected {extra[0].name if extra else 'none'})"
            )
        return parts, prop_found
    recs = sorted(p.name for p in path.glob("*.rec"))
    hint = f"; did you mean {closest('train.rec', recs) or recs[0]}?" if recs else ""
    raise DataError(f"{path}: no train.rec and no part-00000.rec in this folder{hint}")


def _read_property(path: Path) -> tuple[int, tuple[int, int]]:
    """``property`` holds ``num_classes,H,W``."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read property file ({exc})") from exc
    fields = [f.strip() for f in text.split(",")]
    if len(fields) != 3 or not all(f.isdigit() for f in fields):
        raise DataError(f"{path}: property file is {text[:60]!r}, expected 'num_classes,H,W' (e.g. '85742,112,112')")
    c, h, w = (int(f) for f in fields)
    return c, (h, w)


def _image_positions(reader: RecordReader) -> tuple[str, np.ndarray]:
    """Detect the layout of one part; returns it and the positions (into ``reader.keys``) of its image records."""
    if 0 in reader:
        pos0 = reader.position(0)
        header, labels, image = reader._unpack(pos0)
        if header.flag >= 2 and len(image) == 0:
            boundary = _insightface_boundary(reader, labels)
            keys = np.arange(1, boundary, dtype=np.int64)
            if keys.size and (keys[-1] not in reader):
                raise DataError(
                    f"{reader.rec_path}: header record 0 says images are keys 1..{boundary - 1} but key {keys[-1]} "
                    f"is not in {reader.idx_path}; the idx is incomplete (delete it to rebuild)"
                )
            if reader._contiguous and reader._order is None:
                positions = keys - reader._key0
            else:
                positions = np.array([reader.position(k) for k in keys.tolist()], dtype=np.int64)
            return "insightface", positions
    return "plain", np.arange(len(reader), dtype=np.int64)


def _insightface_boundary(reader: RecordReader, labels: np.ndarray) -> int:
    """First non-image key from header labels ``(N + 1, N + 1 + C)``.

    Above 2**24 float32 cannot hold every integer (Glint360K has 17M images), so the stored value may be off by a
    few; the true boundary is then the first nearby key whose record is an identity record (no image bytes).
    """
    first = int(labels[0])
    if first <= _FLOAT32_EXACT:
        return first
    for key in range(first - 4, first + 5):
        if key in reader:
            header, _, image = reader._unpack(reader.position(key))
            if header.flag >= 2 and len(image) == 0:
                return key
    return min(first, int(reader._sorted_keys[-1]) + 1)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------------------------------

_LAYOUTS = ("insightface", "plain")


def write_rec_dataset(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[bytes, int]],
    *,
    image_size: tuple[int, int] = (112, 112),
    layout: str = "insightface",
    prefix: str = "train",
    num_classes: int | None = None,
    write_property: bool = True,
) -> dict:
    """Write encoded face images as ``<prefix>.rec/.idx`` (+ ``property``), atomically.

    ``layout="insightface"``: record 0 is the header, images are keys ``1..N`` and, when the samples come grouped by
    label (each label's images contiguous), identity records ``N + 1 .. N + C`` follow, identity ``c`` at key
    ``N + 1 + c`` with labels ``(a, b)`` = its image-key range (``(0, 0)`` for a label with no image). When labels
    are not grouped (shuffled input) no identity record is written and the header is ``(N + 1, N + 1)``:
    arcface_torch's ``MXFaceDataset`` only uses its first value, so it still reads the file.
    ``layout="plain"`` (im2rec): keys ``0..N-1``, every record an image. Image records carry ``flag = 0``, the label
    in ``header.label`` and ``id = key``.

    Args:
        out_dir: output folder (created).
        samples: ``(encoded image bytes, label)`` pairs; labels are non-negative ints.
        image_size: ``(H, W)`` for ``property``; not checked against the images.
        layout: ``"insightface"`` or ``"plain"``.
        prefix: file name stem (``train`` gives ``train.rec``/``train.idx``).
        num_classes: number of identities; default ``max label + 1``; must exceed every label.
        write_property: write ``property`` (``num_classes,H,W``).

    Returns:
        Summary dict: ``images``, ``classes``, ``layout``, ``identity_records``, ``paths`` (list of written files).

    Raises:
        DataError: unknown layout, empty or non-bytes image, bad label, or ``num_classes`` too small.
    """
    if layout not in _LAYOUTS:
        hint = closest(layout, _LAYOUTS)
        raise DataError(
            f"unknown rec layout {layout!r}; choose one of {list(_LAYOUTS)}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    out = Path(out_dir)
    rec_path, idx_path = out / f"{prefix}.rec", out / f"{prefix}.idx"
    insight = layout == "insightface"
    ranges: dict[int, list[int]] = {}
    grouped = True
    last_label = None
    n = 0
    max_label = -1
    with RecordWriter(rec_path, idx_path) as writer:
        if insight:
            header_offset = writer.write(0, pack_record_payload([0.0, 0.0], b""))
        key = 1 if insight else 0
        for item in samples:
            data, label = item
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise DataError(
                    f"{rec_path}: sample {n} has no image bytes (got {type(data).__name__}); "
                    "pass encoded JPEG/PNG bytes"
                )
            if isinstance(label, (bool, np.bool_)) or not isinstance(label, (numbers.Integral,)) or label < 0:
                raise DataError(f"{rec_path}: sample {n} has label {label!r}; labels must be non-negative ints")
            label = int(label)
            if label >= _FLOAT32_EXACT:
                raise DataError(f"{rec_path}: sample {n} has label {label}, above 2**24 (not exact in float32)")
            writer.write(key, pack_record_payload(float(label), bytes(data), id=key))
            if insight:
                if label != last_label:
                    if label in ranges:
                        grouped = False
                    ranges[label] = [key, key + 1]
                else:
                    ranges[label][1] = key + 1
                last_label = label
            max_label = max(max_label, label)
            key += 1
            n += 1
        classes = max_label + 1 if num_classes is None else int(num_classes)
        if classes <= max_label:
            raise DataError(
                f"{rec_path}: num_classes={classes} but the samples have label {max_label}; "
                f"num_classes must be at least {max_label + 1}"
            )
        identity_records = 0
        if insight:
            first_id = n + 1
            if grouped:
                for c in range(classes):
                    a, b = ranges.get(c, (0, 0))
                    writer.write(first_id + c, pack_record_payload([float(a), float(b)], b"", id=first_id + c))
                identity_records = classes
            else:
                log.debug("%s: labels are not grouped; writing no identity records", rec_path)
            writer._overwrite(
                header_offset, pack_record_payload([float(first_id), float(first_id + identity_records)], b"")
            )
    paths = [rec_path, idx_path]
    if write_property:
        prop = out / "property"
        tmp = prop.with_name("property.tmp")
        tmp.write_text(f"{classes},{int(image_size[0])},{int(image_size[1])}")
        os.replace(tmp, prop)
        paths.append(prop)
    return {
        "images": n,
        "classes": classes,
        "layout": layout,
        "identity_records": identity_records,
        "paths": [str(p) for p in paths],
    }
