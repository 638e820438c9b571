import numpy as np
import pytest
import torch

from facetrain.clean.graph import removal_metrics
from facetrain.clean.quality import (
    BNFeatureExtractor,
    QualityModel,
    fit_quality,
    quality_verification,
    quality_verification_table,
    score_quality,
)
from facetrain.errors import ModelError
from facetrain.models import build_backbone

PAIR_SEEDS = (5, 6, 7)
TRAIN_SEEDS = (0, 1, 2, 3, 4)


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

    # Held-out verification (the before/after report): identities disjoint from training, 25% of the images
    # degraded (heavy blur + noise, low resolution, occlusion; see conftest.degrade), accuracy over all pairs vs over
    # the pairs whose images both survive dropping the lowest 25% by quality. "oracle" drops exactly the degraded ones.
    res, oracle, auc = _held_out_before_after(trained_checkpoint, qpath, 5)
    _print_held_out("tiny model (16 ids, 120 steps)", 5, res, oracle, auc)
    table = quality_verification_table({"held-out": res, "oracle": oracle}, drop_share=0.25)
    print(table)
    assert "lowest 25% dropped" in table and f"{res['accuracy_after']:.4f}" in table
    assert res["pairs_after"] < res["pairs_before"]
    # This 16-identity model barely depends on the degraded images (oracle gain +0.013..+0.037) and its score separates
    # them weakly (AUC ~0.54); measured gain +0.004 / +0.021 / +0.010 for pair seeds 5 / 6 / 7 (one thread). Only
    # "dropping costs little" is asserted; the seed study with a stronger model is the slow test below.
    assert res["accuracy_after"] >= res["accuracy_before"] - 0.05


def _print_held_out(name, seed, res, oracle, auc):
    print(
        f"{name}, pair seed {seed}: accuracy {res['accuracy_before']:.3f} on {res['pairs_before']} pairs -> "
        f"{res['accuracy_after']:.3f} on {res['pairs_after']} (lowest 25% quality dropped; degraded-vs-clean AUC "
        f"{auc:.2f}); oracle {oracle['accuracy_after']:.3f} on {oracle['pairs_after']}"
    )


@pytest.mark.slow
def test_quality_filtering_on_held_out_verification_over_training_seeds(tmp_path):
    """The issue's claim, measured: on held-out identities with 25% degraded images, does dropping the lowest-quality
    25% (and the pairs that lose them) raise verification accuracy? A stronger model than the session fixture (32
    identities, 300 steps; conftest.make_quality_checkpoint), several training seeds x pair seeds (~3 min)."""
    from .conftest import make_quality_checkpoint

    gains, oracle_gains, aucs = [], [], []
    for seed in TRAIN_SEEDS:
        checkpoint, data, _ = make_quality_checkpoint(tmp_path / f"seed{seed}", seed)
        qpath = tmp_path / f"seed{seed}" / "quality.json"
        fit_quality(checkpoint, data, qpath, max_iter=60, max_leaf_nodes=4, progress=False)
        for pair_seed in PAIR_SEEDS:
            res, oracle, auc = _held_out_before_after(checkpoint, qpath, pair_seed)
            _print_held_out(f"training seed {seed}", pair_seed, res, oracle, auc)
            assert res["pairs_after"] < res["pairs_before"]
            gains.append(res["accuracy_after"] - res["accuracy_before"])
            oracle_gains.append(oracle["accuracy_after"] - oracle["accuracy_before"])
            aucs.append(auc)
    gains = np.array(gains).reshape(len(TRAIN_SEEDS), len(PAIR_SEEDS))
    print("gain per training seed (mean over pair seeds):", np.round(gains.mean(axis=1), 3))
    print("mean gain", round(float(gains.mean()), 4), "oracle mean gain", round(float(np.mean(oracle_gains)), 4))
    print("degraded-vs-clean AUC of the score", round(float(np.mean(aucs)), 3))
    # Measured (one thread; training seeds 0..4 x pair seeds 5..7): accuracy before 0.755..0.823; gain from the
    # learned score per training seed +0.027 +0.032 -0.014 -0.006 +0.009 (single runs -0.036..+0.057), mean +0.010
    # (a larger regressor, 200 trees of 8 leaves: -0.003..+0.021 per seed, mean +0.011); dropping exactly the
    # degraded images ("oracle") gains +0.033 on average; the score separates degraded from clean images with AUC
    # 0.50..0.64 only. So the degraded images do cost this model accuracy, but the BN-statistics score does not find
    # them reliably enough for a gain that holds across seeds: the improvement is NOT asserted. Asserted, with
    # margins below the measured values: the protocol has something to find (oracle) and dropping by the learned
    # score does not cost accuracy on average.
    assert np.mean(oracle_gains) >= 0.015  # measured 0.033
    assert np.mean(aucs) >= 0.52  # measured 0.573
    assert gains.mean() >= -0.01  # measured +0.0097


def _held_out_before_after(checkpoint, qpath, seed: int, *, share: float = 0.25):
    from sklearn.metrics import roc_auc_score

    from facetrain.data.synthetic import make_verification_pairs
    from facetrain.models import load_backbone

    from .conftest import DEGRADATIONS, degrade

    images, issame = make_verification_pairs(400, num_identities=50, seed=seed)
    images = np.stack(images)
    rng = np.random.default_rng(100 + seed)
    bad = rng.random(len(images)) < share
    kinds = rng.integers(0, len(DEGRADATIONS), len(images))
    for i in np.flatnonzero(bad):
        images[i] = degrade(images[i], rng, DEGRADATIONS[kinds[i]])
    feats, emb = BNFeatureExtractor(load_backbone(checkpoint))(images)
    qm = QualityModel.load(qpath)
    res = quality_verification(emb, qm.score(feats), issame, drop_share=share)
    oracle = quality_verification(emb, np.where(bad, 0.0, 1.0), issame, drop_share=float(bad.mean()))
    return res, oracle, float(roc_auc_score(bad, -qm.predict(feats)))


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
