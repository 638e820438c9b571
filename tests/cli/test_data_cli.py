"""`facetrain data ...` in-process: info, convert, verify, make-bin, synth; exit codes and one-line errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.fixture
def faces(tmp_path) -> Path:
    """root/<identity>/<image>.png: 4 identities with 3, 2, 3, 2 images of 12x12 random pixels."""
    rng = np.random.default_rng(1)
    root = tmp_path / "faces"
    for k, n in enumerate([3, 2, 3, 2]):
        (root / f"id_{k}").mkdir(parents=True)
        for j in range(n):
            rgb = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            (root / f"id_{k}" / f"{j}.png").write_bytes(cv2.imencode(".png", rgb)[1].tobytes())
    return root


def test_info_prints_counts_and_size(run_cli, faces):
    code, out, err = run_cli("data", "info", faces)
    assert code == 0, err
    assert "format:        folder" in out
    assert "images:        10" in out and "identities:    4" in out
    assert "min 2  median 2.5  max 3" in out and "image size:    12x12" in out


def test_convert_verify_and_info_of_a_sharded_shuffled_rec(run_cli, faces, tmp_path):
    dst = tmp_path / "rec"
    code, out, err = run_cli(
        "data", "convert", faces, dst, "--shuffle", "--seed", "3", "--parts", "2", "--workers", "0"
    )
    assert code == 0, err
    assert "wrote 10 images of 4 identities" in out and "2 parts" in out and "shuffled (seed 3" in out
    assert (dst / "part-00000.rec").is_file() and (dst / "part-00001.rec").is_file()
    code, out, _ = run_cli("data", "info", dst)
    assert code == 0 and "rec-parts (2 parts)" in out and "images:        10" in out
    code, out, _ = run_cli("data", "verify", dst, "--workers", "0")
    assert code == 0 and "10 records checked, 0 bad" in out


def test_convert_to_folder_and_list(run_cli, faces, tmp_path):
    assert run_cli("data", "convert", faces, tmp_path / "rec", "--workers", "0")[0] == 0
    code, out, err = run_cli("data", "convert", tmp_path / "rec", tmp_path / "back", "--to", "folder", "--workers", "0")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["id_0", "id_1", "id_2", "id_3"]
    code, _, err = run_cli("data", "convert", faces, tmp_path / "train.lst", "--to", "list", "--workers", "0")
    assert code == 0, err
    assert len((tmp_path / "train.lst").read_text().splitlines()) == 10


def test_convert_errors_are_one_line_with_exit_1(run_cli, faces, tmp_path):
    (tmp_path / "rec").mkdir()
    code, out, err = run_cli("data", "convert", faces, tmp_path / "rec", "--workers", "0")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "--overwrite" in err
    code, _, err = run_cli("data", "convert", tmp_path / "nothing", tmp_path / "x", "--workers", "0")
    assert code == 1 and "no such file or folder" in err and err.count("\n") == 1
    code, _, err = run_cli("data", "convert", faces, tmp_path / "y", "--to", "tfrecord")
    assert code == 2  # usage error from click


def test_convert_bad_image_stops_or_is_skipped(run_cli, faces, tmp_path):
    (faces / "id_1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code, _, err = run_cli("data", "convert", faces, tmp_path / "rec", "--workers", "0")
    assert code == 1 and "0.png" in err and "--skip-bad" in err
    assert not (tmp_path / "rec").exists()
    code, out, err = run_cli("data", "convert", faces, tmp_path / "rec", "--workers", "0", "--skip-bad")
    assert code == 0, err
    assert "wrote 9 images" in out and "skipped:" in out and "id_1/0.png" in out


def test_verify_exit_code_and_list_of_bad_records(run_cli, faces):
    (faces / "id_0" / "1.png").write_bytes(b"")
    (faces / "id_3" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code, out, _ = run_cli("data", "verify", faces, "--workers", "0")
    assert code == 1
    bad_lines = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert len(bad_lines) == 2
    assert any("id_0/1.png" in line for line in bad_lines) and any("id_3/0.png" in line for line in bad_lines)
    assert "10 records checked, 2 bad" in out
    code, out, _ = run_cli("data", "verify", faces, "--workers", "0", "--skip-bad")
    assert code == 0 and "2 bad" in out


def test_make_bin_and_synth(run_cli, faces, tmp_path):
    from facetrain.data.bins import read_bin

    code, out, err = run_cli("data", "make-bin", faces, tmp_path / "val.bin", "--pairs", "4", "--seed", "1")
    assert code == 0, err
    images, issame = read_bin(tmp_path / "val.bin")
    assert len(images) == 16 and issame.sum() == 4 and "8 pairs (4 genuine)" in out
    code, _, err = run_cli("data", "make-bin", faces, tmp_path / "big.bin", "--pairs", "500")
    assert code == 1 and "lower --pairs" in err

    code, out, err = run_cli(
        "data", "synth", tmp_path / "syn", "--identities", "3", "--images-per-identity", "2", "--image-size", "32"
    )
    assert code == 0, err
    from facetrain.data import open_dataset

    ds = open_dataset(tmp_path / "syn")
    assert len(ds) == 6 and ds.num_classes == 3 and ds[0][0].shape == (32, 32, 3)
    code, _, err = run_cli(
        "data",
        "synth",
        tmp_path / "synf",
        "--identities",
        "2",
        "--images-per-identity",
        "2",
        "--format",
        "folder",
        "--image-size",
        "32",
    )
    assert code == 0, err
    assert open_dataset(tmp_path / "synf").labels().tolist() == [0, 0, 1, 1]
    code, _, err = run_cli(
        "data",
        "synth",
        tmp_path / "p.bin",
        "--identities",
        "4",
        "--format",
        "bin",
        "--pairs",
        "4",
        "--image-size",
        "32",
    )
    assert code == 0, err
    images, issame = read_bin(tmp_path / "p.bin")
    assert len(images) == 8 and issame.tolist() == [True, False, True, False]


def test_preview_augment_writes_grid(run_cli, faces, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(
        "data", "preview-augment", faces, "--preset", "strong", "--out", out, "--n", "6", "--columns", "3"
    )
    assert code == 0, err
    assert "wrote 6 strong samples" in stdout
    grid = cv2.imread(str(out))
    assert grid.shape == (2 * 114 - 2, 3 * 114 - 2, 3)  # 2 rows x 3 tiles of 112 px with 2 px gaps
    code, _, err = run_cli("data", "preview-augment", faces, "--preset", "strog", "--out", out)
    assert code == 1 and "did you mean 'strong'" in err and len(err.strip().splitlines()) == 1
