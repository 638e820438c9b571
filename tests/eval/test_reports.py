"""`--report DIR` of `eval ijb`, `eval folder` and `eval calibrate`: report.md, report.json (= --json), valid PNGs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")


def check_png(path, min_colours=4):
    """A readable PNG of plot size that is not blank (several distinct colours, not all white)."""
    img = cv2.imread(str(path))
    assert img is not None and img.size > 0, path
    h, w = img.shape[:2]
    assert 300 <= w <= 2000 and 250 <= h <= 2000, (path, img.shape)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) >= min_colours, path
    assert (img < 250).any(axis=2).mean() > 0.02, f"{path} is almost blank"


def check_report(report, out_json, pngs):
    for name in ("report.md", *pngs):
        assert (report / name).stat().st_size > 0, name
    assert json.loads((report / "report.json").read_text()) == json.loads(out_json.read_text())
    md = (report / "report.md").read_text()
    for png in pngs:
        assert f"]({png})" in md, png
        check_png(report / png)
    return md


# ---------------------------------------------------------------- IJB from saved features (no images needed)


def write_ijb_from_features(root, rng, n_subjects=30, n_templates=160, n_images=700):
    """Meta files, 1:N lists and a features .npz of a synthetic IJB-C: subjects' centres plus noise."""
    (root / "meta").mkdir(parents=True)
    subjects = np.r_[np.arange(n_subjects), rng.integers(0, n_subjects, n_templates - n_subjects)]
    templates = np.r_[np.arange(n_templates), rng.integers(0, n_templates, n_images - n_templates)]
    medias = templates * 10 + rng.integers(0, 3, n_images)
    centres = rng.normal(size=(n_subjects, 16))
    img = centres[subjects[templates]] + 1.4 * rng.normal(size=(n_images, 16))
    feats = np.concatenate([img, img + 0.3 * rng.normal(size=img.shape)], 1).astype(np.float32)
    names = [f"{i}.jpg" for i in range(n_images)]
    faceness = rng.uniform(0.3, 1.0, n_images)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias))
    )
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{n} " + " ".join(["50.0"] * 10) + f" {s:.3f}\n" for n, s in zip(names, faceness))
    )
    t1, t2 = np.triu_indices(n_templates, 1)
    label = (subjects[t1] == subjects[t2]).astype(int)
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in zip(t1, t2, label))
    )
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    g1 = [t for t in range(n_subjects) if t % 2 == 0]
    g2 = [t for t in range(n_subjects) if t % 2 == 1]
    for name, gallery in (("G1", g1), ("G2", g2)):
        (root / "meta" / f"ijbc_1N_gallery_{name}.csv").write_text(
            header + "".join(f"{t},{subjects[t]},x.jpg\n" for t in gallery)
        )
    probes = range(n_subjects, n_templates)
    (root / "meta" / "ijbc_1N_probe_mixed.csv").write_text(
        header + "".join(f"{t},{subjects[t]},x.jpg\n" for t in probes)
    )
    np.savez(root / "feats.npz", img_feats=feats, names=np.asarray(names), faceness_scores=faceness)
    return root / "feats.npz"


def test_ijb_report(tmp_path, run_cli):
    feats = write_ijb_from_features(tmp_path / "IJBC", np.random.default_rng(0))
    out_json, report = tmp_path / "ijb.json", tmp_path / "report"
    code, out, err = run_cli("eval", "ijb", "--data", tmp_path / "IJBC", "--from-features", feats, "--mode", "N1D1F1",
                             "--mode", "N0D0F0", "--json", out_json, "--report", report)  # fmt: skip
    assert code == 0, err
    assert f"wrote {report / 'report.md'}" in out
    pngs = [f"{kind}_IJBC_{mode}.png" for mode in ("N1D1F1", "N0D0F0") for kind in ("roc", "scores")]
    md = check_report(report, out_json, pngs)
    data = json.loads(out_json.read_text())["results"]
    assert [r["mode"] for r in data] == ["N1D1F1", "N0D0F0"]
    first = data[0]
    assert f"| IJBC | N1D1F1 | {100 * first['tar_at_far']['1e-06']:.2f} |" in md
    gallery = first["identification"][0]
    assert f"| IJBC | N1D1F1 | G1 | {100 * gallery['top1']:.2f} |" in md
    assert "below one impostor pair" in md  # 12720 pairs cannot reach FAR 1e-6 or 1e-5


# ---------------------------------------------------------------- folder and calibrate on a tiny model


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 14 * 14, 8)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture
def people(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "people"
    for c in range(10):
        base = cv2.resize(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), (112, 112))
        (root / f"person{c}").mkdir(parents=True)
        for k in range(5):
            img = np.clip(base.astype(int) + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"person{c}" / f"{k}.png"), img)
    model = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet().eval()).save(str(model))
    return root, model


def test_folder_report(tmp_path, run_cli, people):
    root, model = people
    out_json, report = tmp_path / "folder.json", tmp_path / "report"
    code, out, err = run_cli("eval", "folder", model, root, "--far", "0.01", "--far", "0.1", "--json", out_json,
                             "--report", report)  # fmt: skip
    assert code == 0, err
    md = check_report(report, out_json, ["roc.png", "scores.png"])
    res = json.loads(out_json.read_text())["results"]
    assert res["n_pairs"] == 50 * 49 // 2
    assert f"| rank-1, leave-one-out (%) | {100 * res['rank1']:.2f} (50 probes) |" in md
    assert f"| EER (%) | {100 * res['eer']:.2f}" in md and "TAR@FAR=1e-01" in md


def test_calibrate_report(tmp_path, run_cli, people):
    root, model = people
    out_json, report = tmp_path / "cal.json", tmp_path / "report"
    code, out, err = run_cli("eval", "calibrate", model, root, "--far", "0.01", "--json", out_json,
                             "--report", report)  # fmt: skip
    assert code == 0, err
    md = check_report(report, out_json, ["scores.png", "roc.png"])
    res = json.loads(out_json.read_text())["results"]
    assert "scores" not in res and "issame" not in res
    assert f"threshold (cosine) for FAR <= 0.01: {res['threshold']:.4f}" in md


def test_report_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    from facetrain.errors import DependencyError
    from facetrain.eval.calibrate import calibrate_scores
    from facetrain.eval.report import write_calibration_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = calibrate_scores(np.r_[[True] * 5, [False] * 20], np.linspace(0, 1, 25)[::-1], far=0.1)
    with pytest.raises(DependencyError, match="report"):
        write_calibration_report(res, tmp_path / "r")
