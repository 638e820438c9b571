"""`facetrain eval verify` in-process on a TorchScript tiny model and a synthetic .bin."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from facetrain.eval.verification import evaluate, flip_sum_normalize


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 14 * 14, 16)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _faces(n_ids: int, rng) -> list[np.ndarray]:
    """One smooth random 112x112 'face' per identity."""
    out = []
    for _ in range(n_ids):
        small = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        out.append(cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC))
    return out


def make_bin(path, n_pairs: int, seed: int = 0, size: int = 112):
    rng = np.random.default_rng(seed)
    ids = _faces(n_pairs + 1, rng)
    images, issame = [], []
    for i in range(n_pairs):
        same = bool(i % 2 == 0)
        a = ids[i]
        b = ids[i] if same else ids[i + 1]
        for img in (a, b):
            noisy = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
            if size != 112:
                noisy = cv2.resize(noisy, (size, size))
            images.append(cv2.imencode(".png", cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR))[1].tobytes())
        issame.append(same)
    with open(path, "wb") as fh:
        pickle.dump((images, issame), fh, protocol=2)
    return images, np.array(issame)


@pytest.fixture
def scripted(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(net).save(str(path))
    return net, path


def _expected(net, images, issame):
    decoded = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), 1), cv2.COLOR_BGR2RGB) for b in images])
    x = torch.from_numpy(decoded).permute(0, 3, 1, 2).double()
    with torch.no_grad():
        net = net.double()
        a = net((x / 255 - 0.5) / 0.5).numpy()
        b = net((x.flip(3) / 255 - 0.5) / 0.5).numpy()
    return evaluate(flip_sum_normalize(a, b), issame, raw=(a, b))


def test_verify_table_json_and_report(tmp_path, run_cli, scripted):
    net, model = scripted
    images, issame = make_bin(tmp_path / "syn.bin", 43)
    make_bin(tmp_path / "other.bin", 20, seed=1)
    out_json = tmp_path / "res.json"
    report = tmp_path / "report"
    code, out, err = run_cli(
        "eval",
        "verify",
        model,
        "--bin",
        tmp_path / "syn.bin",
        "--bin",
        tmp_path / "other.bin",
        "--batch-size",
        "7",
        "--json",
        out_json,
        "--report",
        report,
    )
    assert code == 0, err
    assert "| syn | 43 |" in out and "| other | 20 |" in out
    data = json.loads(out_json.read_text())
    got = data["results"]["syn"]
    ref = _expected(net, images, issame)
    assert got["accuracy_mean"] == pytest.approx(ref.accuracy_mean, abs=1e-9)
    assert got["thresholds"] == pytest.approx(list(ref.thresholds))
    assert got["xnorm"] == pytest.approx(ref.xnorm, rel=1e-4)
    assert got["n_pairs"] == 43 and data["model"]["embedding_size"] == 16
    for name in ("report.md", "report.json", "roc_syn.png", "scores_syn.png", "roc_other.png"):
        assert (report / name).stat().st_size > 0
    assert "roc_syn.png" in (report / "report.md").read_text()


def test_verify_resizes_non_112_bins(tmp_path, run_cli, scripted):
    _, model = scripted
    make_bin(tmp_path / "big.bin", 12, size=128)
    code, out, err = run_cli("eval", "verify", model, "--bin", tmp_path / "big.bin")
    assert code == 0, err and "| big | 12 |" in out


def test_bad_bins_give_one_line_errors(tmp_path, run_cli, scripted):
    _, model = scripted
    images, issame = make_bin(tmp_path / "ok.bin", 10)
    with open(tmp_path / "odd.bin", "wb") as fh:
        pickle.dump((images[:-1], list(issame)), fh)
    with open(tmp_path / "mismatch.bin", "wb") as fh:
        pickle.dump((images, list(issame)[:-2]), fh)
    code, _, err = run_cli("eval", "verify", model, "--bin", tmp_path / "odd.bin")
    assert code == 1 and "odd" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", "verify", model, "--bin", tmp_path / "mismatch.bin")
    assert code == 1 and "issame" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", "verify", model, "--bin", tmp_path / "missing.bin")
    assert code == 1 and "missing.bin" in err
