"""Atomic output: the destination appears only complete, an old file survives a failed rewrite, no temp is left."""

from __future__ import annotations

import numpy as np
import pytest

from facetrain.fileio import atomic_path, atomic_write_bytes, atomic_write_text


def test_success_renames_and_leaves_no_temp(tmp_path):
    out = tmp_path / "sub" / "a.npy"
    with atomic_path(out, suffix=".npy") as tmp:
        assert not out.exists() and tmp.parent == out.parent
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(out), np.arange(3))
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.npy"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    out = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert atomic_write_bytes(out, b"new").read_bytes() == b"new"
