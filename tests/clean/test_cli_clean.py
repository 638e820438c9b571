import importlib.util

import numpy as np

from facetrain.data import open_dataset, write_bin
from facetrain.data.synthetic import make_verification_pairs


def test_cli_commands(noisy_data, trained_checkpoint, tmp_path, run_cli):
    code, out, err = run_cli(
        "clean", "subcenter", trained_checkpoint, noisy_data.path, "--out", tmp_path / "sc", "--format", "folder"
    )
    assert code == 0, err
    assert "kept" in out and len(open_dataset(tmp_path / "sc")) < len(noisy_data.labels)

    code, out, err = run_cli(
        "distill-dataset", trained_checkpoint, noisy_data.path, "--out", tmp_path / "t.npy", "--fp16"
    )
    assert code == 0, err
    assert np.load(tmp_path / "t.npy").shape == (len(noisy_data.labels), 64)

    code, out, err = run_cli(
        "clean", "graph", tmp_path / "t.npy", noisy_data.path, "--out", tmp_path / "g", "--format", "list"
    )
    assert code == 0, err
    assert "vs DBSCAN" in out and (tmp_path / "g" / "cleaned.lst").is_file()

    images, issame = make_verification_pairs(20, num_identities=10, seed=2)
    write_bin(tmp_path / "v.bin", images, issame)
    regressor = "catboost" if importlib.util.find_spec("catboost") else "hgb"
    code, out, err = run_cli(
        "quality",
        "fit",
        trained_checkpoint,
        noisy_data.path,
        "--out",
        tmp_path / "q.json",
        "--max-iter",
        "20",
        "--regressor",
        regressor,
        "--depth",
        "4",
    )
    assert code == 0, err
    code, out, err = run_cli(
        "quality",
        "score",
        tmp_path / "q.json",
        trained_checkpoint,
        noisy_data.path,
        "--out",
        tmp_path / "s.csv",
        "--eval-bin",
        tmp_path / "v.bin",
        "--drop-share",
        "0.1",
    )
    assert code == 0, err
    assert "after dropping the lowest 10%" in out
    code, out, err = run_cli(
        "clean",
        "graph",
        tmp_path / "t.npy",
        noisy_data.path,
        "--out",
        tmp_path / "g2",
        "--quality",
        tmp_path / "s.csv",
        "--no-dbscan",
        "--tsne",
    )
    assert code == 0, err
    assert (tmp_path / "g2" / "clusters.png").is_file()

    code, out, err = run_cli(
        "finetune-bn",
        trained_checkpoint,
        noisy_data.path,
        "--out",
        tmp_path / "bn",
        "--steps",
        "2",
        "--save-every",
        "1",
        "--batch-size",
        "8",
        "--bin",
        tmp_path / "v.bin",
    )
    assert code == 0, err
    assert "| step | v | mean |" in out and "best: step" in out


def test_cli_errors_are_one_line(noisy_data, tmp_path, run_cli):
    x = np.zeros((len(noisy_data.labels), 8), np.float32)
    x[3, 2] = np.nan
    np.save(tmp_path / "bad.npy", x)
    code, out, err = run_cli("clean", "graph", tmp_path / "bad.npy", noisy_data.path, "--out", tmp_path / "o")
    assert code == 1 and "NaN" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("quality", "fit", tmp_path / "missing.pt", noisy_data.path, "--out", tmp_path / "q.json")
    assert code == 1 and "no such checkpoint" in err
