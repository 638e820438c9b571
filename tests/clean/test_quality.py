import numpy as np
import pytest
import torch

from facetrain.clean.graph import removal_metrics
from facetrain.clean.quality import BNFeatureExtractor, QualityModel, fit_quality, quality_verification, score_quality
from facetrain.errors import ModelError
from facetrain.models import build_backbone


def test_bn_features_match_float64_formula():
    torch.manual_seed(0)
    model = build_backbone("demo_cnn", embedding_size=32, width=4).eval()
    ext = BNFeatureExtractor(model)
    assert len(ext.layer_names) == 9  # 8 stage BNs + bn2; BatchNorm1d on the embedding is skipped
    images = np.random.default_rng(0).integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    feats, emb = ext(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().sub(127.5).div(127.5)
    with torch.no_grad():
        first = model.stages[0][0].double()(x)  # input of the first BatchNorm2d
    model.float()
    v = first.flatten(2).var(dim=2, unbiased=True)
    np.testing.assert_allclose(feats[:, 0], v.var(dim=1, unbiased=True).numpy(), rtol=1e-4)
    np.testing.assert_allclose(feats[:, 1], v.mean(dim=1).numpy(), rtol=1e-4)
    assert feats.shape == (3, 18) and emb.shape == (3, 32)


def test_model_without_batchnorm_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(8))
    with pytest.raises(ModelError, match="no BatchNorm"):
        BNFeatureExtractor(model)


def test_tree_export_matches_sklearn_and_roundtrips(tmp_path):
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6))
    x[::17, 2] = np.nan
    y = np.sin(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 2])
    reg = HistGradientBoostingRegressor(max_iter=30, random_state=0).fit(x, y)
    model = QualityModel.from_sklearn(reg, [f"f{i}" for i in range(6)])
    np.testing.assert_allclose(model.predict(x), reg.predict(x), atol=1e-9)
    model.save(tmp_path / "q.json")
    loaded = QualityModel.load(tmp_path / "q.json")
    np.testing.assert_allclose(loaded.predict(x), reg.predict(x), atol=1e-9)
    assert b"pickle" not in (tmp_path / "q.json").read_bytes()
    s = loaded.score(x)
    assert s.min() >= 0 and s.max() <= 100


def test_quality_flags_corrupted_images_and_helps_verification(noisy_data, trained_checkpoint, tmp_path):
    qpath = tmp_path / "quality.json"
    report = fit_quality(trained_checkpoint, noisy_data.path, qpath, max_iter=60, max_leaf_nodes=4, progress=False)
    print("quality fit:", report)
    scores_csv = tmp_path / "scores.csv"
    filtered = tmp_path / "filtered"
    summary = score_quality(qpath, trained_checkpoint, noisy_data.path, scores_csv, drop_below=None, progress=False)
    rows = [r.split(",") for r in scores_csv.read_text().splitlines()[1:]]
    q = np.array([float(r[2]) for r in rows])
    assert len(q) == summary["images"] == len(noisy_data.labels)
    n_bad = int(noisy_data.corrupted.sum())
    lowest = np.zeros(len(q), bool)
    lowest[np.argsort(q, kind="stable")[:n_bad]] = True
    m = removal_metrics(noisy_data.corrupted, lowest)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(noisy_data.corrupted, -q)
    print("lowest-quality vs corrupted:", m, "AUC", auc)
    # targets are noisy (label noise, hard images also sit far from their centre), so the ranking is imperfect
    assert auc >= 0.62  # measured 0.69 with this tiny model (192 images, 18 features)
    assert m["precision"] >= 2.0 * noisy_data.corrupted.mean()
    cut = float(np.sort(q)[n_bad])
    summary = score_quality(
        qpath,
        trained_checkpoint,
        noisy_data.path,
        tmp_path / "s.parquet",
        drop_below=cut,
        filtered_out=filtered,
        fmt="folder",
        progress=False,
    )
    assert summary["dropped"] >= 1 and (tmp_path / "s.parquet").is_file()

    # held-out identities: pairs where some images are corrupted; dropping the lowest-quality share must not hurt
    from facetrain.data.synthetic import make_verification_pairs
    from facetrain.embed import load_embedder
    from facetrain.models import load_backbone

    from .conftest import corrupt

    images, issame = make_verification_pairs(200, num_identities=40, seed=5)
    images = np.stack(images)
    rng = np.random.default_rng(1)
    bad = rng.random(len(images)) < 0.1
    for i in np.flatnonzero(bad):
        images[i] = corrupt(images[i], rng)
    feats, _ = BNFeatureExtractor(load_backbone(trained_checkpoint))(images)
    scores = QualityModel.load(qpath).score(feats)
    emb = load_embedder(trained_checkpoint, device="cpu").embed(images)
    res = quality_verification(emb, scores, issame, drop_share=0.1)
    print("held-out verification, learned score:", res)
    assert res["pairs_after"] < res["pairs_before"]
    # With this tiny model neither the learned score nor even dropping exactly the corrupted images changes held-out
    # accuracy reliably (measured -0.03..+0.01); assert only that dropping costs little. The gain where low-quality
    # images do break verification is checked on constructed embeddings in test_quality_verification_protocol.
    assert res["accuracy_after"] >= res["accuracy_before"] - 0.05


def test_quality_verification_protocol():
    rng = np.random.default_rng(0)
    p, d = 400, 32
    ids = rng.standard_normal((2 * p, d))
    issame = np.arange(p) % 2 == 0
    emb = ids.copy()
    emb[1::2][issame] = ids[0::2][issame]  # genuine pairs share an identity
    emb += 0.5 * rng.standard_normal(emb.shape)
    low = np.zeros(2 * p, bool)
    low[rng.choice(2 * p, 2 * p // 10, replace=False)] = True  # exactly the 10% share that gets dropped
    emb[low] = rng.standard_normal((low.sum(), d)) * 3  # unusable faces: embeddings unrelated to the identity
    scores = np.where(low, 5.0, 80.0) + rng.random(2 * p)
    res = quality_verification(emb, scores, issame, drop_share=0.1)
    print("protocol:", res)
    assert res["pairs_after"] == int((~(low[0::2] | low[1::2])).sum())
    assert res["accuracy_after"] >= res["accuracy_before"] + 0.05
    same = quality_verification(emb, scores, issame, drop_share=0.0)
    assert same["pairs_after"] == p and same["accuracy_after"] == same["accuracy_before"]


def test_catboost_export_matches_catboost(tmp_path):
    pytest.importorskip("catboost")
    from facetrain.clean.quality import fit_quality_arrays

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = np.sin(x[:, 0]) + 0.3 * x[:, 1]
    model, report = fit_quality_arrays(x, y, [f"f{i}" for i in range(6)], regressor="catboost", max_iter=40, depth=4)
    assert report.trees == 40 and report.holdout_spearman > 0.5
    model.save(tmp_path / "cb.json")
    loaded = QualityModel.load(tmp_path / "cb.json")
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), atol=1e-12)
