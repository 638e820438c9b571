"""IJB-B/C: meta parsing, pooling per mode, pair scoring, TAR@FAR and 1:N against float64 upstream-style loops."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve as sk_roc_curve
from torch import nn

from facetrain.errors import EvalError
from facetrain.eval.ijb import (
    IJBMeta,
    IJBMode,
    evaluate_ijb,
    evaluate_ijb_features,
    identification_metrics,
    pool_templates,
    read_ijb_meta,
    score_template_pairs,
)

MODES = [f"N{n}D{d}F{f}" for n in (0, 1) for d in (0, 1) for f in (0, 1)]


# ---------------------------------------------------------------- float64 reference (the published loops)


def ref_image_feats(img_feats, faceness, mode):
    n, d, f = (c == "1" for c in mode[1::2])
    half = img_feats.shape[1] // 2
    x = img_feats[:, :half] + img_feats[:, half:] if f else img_feats[:, :half]
    x = x.astype(np.float64)
    if not n:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if d:
        x = x * faceness[:, None]
    return x


def ref_pool(feats, templates, medias):
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), feats.shape[1]))
    for i, t in enumerate(unique_templates):
        ft, mt = feats[templates == t], medias[templates == t]
        media_feats = []
        for u in np.unique(mt):
            media_feats.append(ft[mt == u].mean(0))
        out[i] = np.sum(media_feats, 0)
    return unique_templates, out / np.linalg.norm(out, axis=1, keepdims=True)


def ref_tar_at_far(labels, scores):
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        _, i = min(zip(abs(fpr - far), range(len(fpr))))
        out[far] = tpr[i]
    return out


def ref_identification(q, qs, g, gs, fpirs=(1e-2, 1e-1)):
    sims = q @ g.T
    top = {1: 0, 5: 0, 10: 0}
    pos, neg, nonmated = [], [], []
    for i, s in enumerate(qs):
        if s in gs:
            p = sims[i][gs == s].max()
            rank = 1 + np.sum(sims[i] > p)
            for k in top:
                top[k] += rank <= k
            pos.append(p)
            neg.append(sims[i][gs != s].max())
        else:
            nonmated.append(sims[i].max())
    pos, neg, nonmated = np.array(pos), np.array(neg), np.sort(nonmated)[::-1]
    tpir = {}
    for fpir in fpirs:
        thr = nonmated[max(int(len(nonmated) * fpir) - 1, 0)]
        tpir[fpir] = np.sum((pos > neg) & (pos > thr)) / len(pos)
    return {k: v / len(pos) for k, v in top.items()}, tpir


# ---------------------------------------------------------------- synthetic features


def synthetic_meta(rng, n_templates=120, n_images=900):
    subjects = rng.integers(0, 30, n_templates)
    templates = np.r_[np.arange(n_templates), rng.integers(0, n_templates, n_images - n_templates)] + 1000
    rng.shuffle(templates)
    medias = rng.integers(0, 4, n_images) + 10 * templates
    centres = rng.normal(size=(30, 16))
    img = centres[subjects[templates - 1000]] + 1.2 * rng.normal(size=(n_images, 16))
    img_feats = np.concatenate([img, img + 0.3 * rng.normal(size=img.shape)], 1).astype(np.float32)
    t1, t2 = np.meshgrid(np.arange(n_templates), np.arange(n_templates), indexing="ij")
    keep = (t1 < t2).ravel() & (rng.random(t1.size) < 0.5)
    t1, t2 = t1.ravel()[keep], t2.ravel()[keep]
    meta = IJBMeta(
        target="IJBC",
        names=[f"img/{i}.jpg" for i in range(n_images)],
        templates=templates,
        medias=medias,
        landmarks=np.zeros((n_images, 5, 2), np.float32),
        faceness=rng.uniform(0.3, 1.0, n_images).astype(np.float32),
        pair_t1=t1 + 1000,
        pair_t2=t2 + 1000,
        pair_label=subjects[t1] == subjects[t2],
    )
    return meta, img_feats, subjects


@pytest.mark.parametrize("mode", MODES)
def test_modes_pooling_scoring_and_tar_match_reference(mode):
    rng = np.random.default_rng(5)
    meta, img_feats, _ = synthetic_meta(rng)
    result = evaluate_ijb_features(img_feats, meta, mode=mode, identification=False)
    feats = ref_image_feats(img_feats, meta.faceness.astype(np.float64), mode)
    ids, tfeats = ref_pool(feats, meta.templates, meta.medias)
    ours_ids, ours = pool_templates(feats.astype(np.float32), meta.templates, meta.medias)
    np.testing.assert_array_equal(ours_ids, ids)
    np.testing.assert_allclose(ours, tfeats, atol=2e-6)
    lookup = {t: i for i, t in enumerate(ids)}
    scores = np.array([tfeats[lookup[a]] @ tfeats[lookup[b]] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    np.testing.assert_allclose(result.scores, scores, atol=2e-6)
    # TAR@FAR on the float64 reference scores vs ours on the same scores (exact rule), and on ours (tolerance)
    ref = ref_tar_at_far(meta.pair_label, scores)
    from facetrain.eval.roc import roc_curve, tar_at_far_nearest

    fpr, tpr, _ = roc_curve(meta.pair_label, scores)
    assert tar_at_far_nearest(fpr, tpr) == pytest.approx(ref, abs=0)
    assert result.mode == mode and result.n_templates == 120 and result.n_pairs == meta.pair_t1.size


def test_gram_block_and_gather_paths_agree():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    ids = np.arange(50) * 3
    dense_t1, dense_t2 = np.meshgrid(ids[:10], ids[10:], indexing="ij")
    sparse_t1, sparse_t2 = ids[rng.integers(0, 50, 20)], ids[rng.integers(0, 50, 20)]
    for t1, t2 in ((dense_t1.ravel(), dense_t2.ravel()), (sparse_t1, sparse_t2)):
        got = score_template_pairs(feats, ids, t1, t2)
        want = np.einsum("ij,ij->i", feats[t1 // 3].astype(np.float64), feats[t2 // 3])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(EvalError, match="template 7"):
        score_template_pairs(feats, ids, np.array([0, 7]), np.array([3, 3]))


def test_identification_matches_reference():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(40, 8))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    gs = np.arange(40)
    qs = rng.integers(0, 60, 300)  # subjects >= 40 are not enrolled
    q = np.where((qs < 40)[:, None], g[np.minimum(qs, 39)], 0) + 0.8 * rng.normal(size=(300, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    res = identification_metrics(q, qs, g, gs, chunk=64)
    top, tpir = ref_identification(q, qs, g, gs)
    assert (res.top1, res.top5, res.top10) == pytest.approx((top[1], top[5], top[10]))
    assert res.tpir_at_fpir == pytest.approx(tpir)
    assert res.n_mated_probes == int((qs < 40).sum())


# ---------------------------------------------------------------- on disk: layout, images, errors, CLI


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 14 * 14, 8)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


TEMPLATE = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])


def make_ijb(root, rng, target="ijbc"):
    """10 photos (200x180), 4 templates of 2 subjects, landmarks = template scaled and shifted."""
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    faces = [cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (180, 200)) for _ in range(2)]
    rows_tid, rows_pts = [], []
    layout = [(1, 11, 0), (1, 11, 0), (1, 12, 0), (2, 21, 1), (2, 21, 1), (3, 31, 0), (3, 32, 0), (4, 41, 1),
              (4, 41, 1), (4, 42, 1)]  # fmt: skip
    for i, (template, media, subject) in enumerate(layout):
        img = np.clip(faces[subject].astype(int) + rng.integers(-15, 16, faces[subject].shape), 0, 255)
        name = f"{i + 1}.jpg"
        cv2.imwrite(str(root / "loose_crop" / name), img.astype(np.uint8))
        pts = TEMPLATE * 1.3 + [10 + i, 5]
        rows_tid.append(f"{name} {template} {media}")
        rows_pts.append(name + " " + " ".join(f"{v:.2f}" for v in pts.ravel()) + f" {0.5 + 0.05 * i:.3f}")
    (root / "meta" / f"{target}_face_tid_mid.txt").write_text("\n".join(rows_tid) + "\n")
    (root / "meta" / f"{target}_name_5pts_score.txt").write_text("\n".join(rows_pts) + "\n")
    pairs = ["1 2 0", "1 3 1", "1 4 0", "2 3 0", "2 4 1", "3 4 0"]
    (root / "meta" / f"{target}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    g1 = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,100,1.jpg\n1,100,2.jpg\n"
    g2 = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n2,200,4.jpg\n"
    probe = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n3,100,6.jpg\n4,200,8.jpg\n"
    (root / "meta" / f"{target}_1N_gallery_G1.csv").write_text(g1)
    (root / "meta" / f"{target}_1N_gallery_G2.csv").write_text(g2)
    (root / "meta" / f"{target}_1N_probe_mixed.csv").write_text(probe)
    return layout


def test_end_to_end_on_disk_matches_reference_features(tmp_path):
    from facetrain.align.template import norm_crop
    from facetrain.embed import TorchEmbedder

    make_ijb(tmp_path, np.random.default_rng(0))
    net = TinyNet().eval()
    meta = read_ijb_meta(tmp_path, "IJBC")
    assert meta.names[0] == "1.jpg" and meta.landmarks.shape == (10, 5, 2) and meta.pair_label.sum() == 2
    faces = []
    for name, pts in zip(meta.names, meta.landmarks):
        bgr = cv2.imread(str(tmp_path / "loose_crop" / name))
        faces.append(cv2.cvtColor(norm_crop(bgr, pts, 112), cv2.COLOR_BGR2RGB))
    x = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).double()
    with torch.no_grad():
        ref_net = TinyNet().double()
        ref_net.load_state_dict(net.state_dict())
        a, b = ref_net((x / 255 - 0.5) / 0.5).numpy(), ref_net((x.flip(3) / 255 - 0.5) / 0.5).numpy()
    ref = evaluate_ijb_features(np.concatenate([a, b], 1), meta, mode="N1D1F1")
    feats_file = tmp_path / "feats.npz"
    got = evaluate_ijb(tmp_path, target="IJBC", embedder=TorchEmbedder(net, "cpu", batch_size=3),
                       save_features=feats_file)  # fmt: skip
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4)
    assert [r.gallery for r in got.identification] == ["G1", "G2"]
    assert got.identification[0].n_mated_probes == 1 and got.identification[0].n_nonmated_probes == 1
    again = evaluate_ijb(tmp_path, target="IJBC", features=feats_file, mode="N0D0F0")
    assert again.mode == "N0D0F0" and again.n_pairs == 6


def test_malformed_meta_and_missing_image_name_file_and_line(tmp_path):
    make_ijb(tmp_path, np.random.default_rng(0))
    pts = tmp_path / "meta" / "ijbc_name_5pts_score.txt"
    lines = pts.read_text().splitlines()
    good = list(lines)
    lines[3] = lines[3].rsplit(" ", 2)[0]  # drop two fields
    pts.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalError, match=r"ijbc_name_5pts_score.txt line 4"):
        read_ijb_meta(tmp_path, "IJBC")
    pts.write_text("\n".join(good) + "\n")
    pairs = tmp_path / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text("1 2 0\n1 3 x\n")
    with pytest.raises(EvalError, match=r"ijbc_template_pair_label.txt line 2"):
        read_ijb_meta(tmp_path, "IJBC")
    pairs.write_text("1 2 0\n1 3 1\n")
    (tmp_path / "loose_crop" / "7.jpg").unlink()
    from facetrain.embed import TorchEmbedder

    with pytest.raises(EvalError, match=r"7.jpg.*line 7"):
        evaluate_ijb(tmp_path, target="IJBC", embedder=TorchEmbedder(TinyNet(), "cpu"))
    with pytest.raises(EvalError, match="N1D1F1"):
        IJBMode.parse("N2D1")


def test_cli_ijb_json(tmp_path, run_cli):
    make_ijb(tmp_path / "IJBC", np.random.default_rng(0))
    model = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet().eval()).save(str(model))
    out_json = tmp_path / "ijb.json"
    code, out, err = run_cli("eval", "ijb", model, "--data", tmp_path / "IJBC", "--target", "IJBC", "--mode", "N1D1F1",
                             "--json", out_json, "--save-features", tmp_path / "f.npz")  # fmt: skip
    assert code == 0, err
    assert "1e-04" in out and "G1" in out
    data = json.loads(out_json.read_text())
    assert data["results"][0]["n_pairs"] == 6 and set(data["results"][0]["tar_at_far"]) >= {"1e-06", "0.1"}
    code, out, err = run_cli("eval", "ijb", "--data", tmp_path / "IJBC", "--from-features", tmp_path / "f.npz",
                             "--mode", "N0D1F1", "--mode", "N1D0F0")  # fmt: skip
    assert code == 0, err
    assert "N0D1F1" in out and "N1D0F0" in out
