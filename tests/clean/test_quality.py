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
    assert feats.shape == (3, 9 * 4 + 8) and emb.shape == (3, 32) and len(ext.feature_names) == 44
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().sub(127.5).div(127.5)
    with torch.no_grad():
        stage = model.stages[0].double()
        first = stage[0](x)  # input of the first BatchNorm2d
        second = stage[3](stage[2](stage[1](first)))  # input of the second
    model.float()
    col = {name: i for i, name in enumerate(ext.feature_names)}
    prev_mean = None
    for layer, bn_input in (("stages.0.1", first), ("stages.0.4", second)):
        v = bn_input.flatten(2).var(dim=2, unbiased=True)
        m = bn_input.flatten(2).mean(dim=2)
        mean_v, var_v = v.mean(dim=1).numpy(), v.var(dim=1, unbiased=True).numpy()
        np.testing.assert_allclose(feats[:, col[f"{layer}.var_of_var"]], var_v, rtol=1e-4)
        np.testing.assert_allclose(feats[:, col[f"{layer}.mean_of_var"]], mean_v, rtol=1e-4)
        np.testing.assert_allclose(feats[:, col[f"{layer}.dispersion"]], var_v / mean_v**2, rtol=1e-4)
        np.testing.assert_allclose(feats[:, col[f"{layer}.mean_spread"]], m.var(dim=1).numpy() / mean_v, rtol=1e-4)
        if prev_mean is not None:
            np.testing.assert_allclose(feats[:, col[f"{layer}.gain"]], mean_v / prev_mean, rtol=1e-4)
        prev_mean = mean_v
    assert "stages.0.1.gain" not in col
    qaa = BNFeatureExtractor(model, feature_set="qaa")  # open_midas's two features per layer, in module order
    qaa_feats, _ = qaa(images)
    assert qaa.feature_names == ext.feature_names[:18]
    np.testing.assert_allclose(qaa_feats, feats[:, :18], rtol=1e-6)
    with pytest.raises(ModelError, match="unknown quality feature set"):
        BNFeatureExtractor(model, feature_set="qaa2")


def test_cli_feature_set_is_stored_and_reused_for_scoring(noisy_data, trained_checkpoint, tmp_path, run_cli):
    args = (trained_checkpoint, noisy_data.path, "--out", tmp_path / "q.json", "--max-iter", "10")
    code, out, err = run_cli("quality", "fit", *args, "--features", "qaa")
    assert code == 0, err
    assert "on 18 features" in out
    qm = QualityModel.load(tmp_path / "q.json")
    assert qm.meta["feature_set"] == "qaa"
    assert qm.feature_names[:2] == ["stages.0.1.var_of_var", "stages.0.1.mean_of_var"]
    code, out, err = run_cli(
        "quality", "score", tmp_path / "q.json", trained_checkpoint, noisy_data.path, "--out", tmp_path / "s.csv"
    )
    assert code == 0, err
    assert len((tmp_path / "s.csv").read_text().splitlines()) == len(noisy_data.labels) + 1
    code, out, err = run_cli("quality", "fit", *args, "--features", "nope")
    assert code != 0 and "nope" in err


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
    assert auc >= 0.62  # measured 0.68 with this tiny model (192 images, 44 features; 0.69 with qaa's 18)
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
    res, oracle, auc = _held_out_before_after(trained_checkpoint, qpath, _held_out_pairs(5))
    _print_held_out("tiny model (16 ids, 120 steps)", 5, res, oracle, auc)
    table = quality_verification_table({"held-out": res, "oracle": oracle}, drop_share=0.25)
    print(table)
    assert "lowest 25% dropped" in table and f"{res['accuracy_after']:.4f}" in table
    assert res["pairs_after"] < res["pairs_before"]
    # This 16-identity model depends little on the degraded images (oracle gain +0.026 / +0.013 / +0.037 for pair seeds
    # 5 / 6 / 7) and its score separates them weakly (AUC ~0.55); measured gain (one thread) +0.024 / +0.011 / +0.038
    # with the default qaa+ratios features, +0.004 / +0.021 / +0.010 with open_midas's two features (qaa). 400 pairs
    # are too few for a per-run claim (+-0.03 from the pair draw), so only "dropping costs nothing" is asserted here;
    # the seed study with a stronger model and 1200 pairs per run is the slow test below.
    assert res["accuracy_after"] >= res["accuracy_before"] - 0.01


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
    identities, 300 steps; conftest.make_quality_checkpoint), five training seeds x three pair seeds of 1200 pairs
    (~5 min on one thread).

    Four quality models per backbone, same regressor settings: fitted on 960 images of the training identities that
    the backbone never saw, half of them degraded ("unseen", what the docs recommend), or on the backbone's own
    training set ("training", the earlier setup), each with the default ``qaa+ratios`` features or open_midas's
    ``qaa`` pair."""
    from .conftest import make_quality_checkpoint

    fits = {  # name -> (fit set, feature set)
        "unseen": ("fit_data", "qaa+ratios"),
        "training": ("train_data", "qaa+ratios"),
        "unseen, qaa": ("fit_data", "qaa"),
        "training, qaa": ("train_data", "qaa"),
    }
    gains = {name: [] for name in fits}
    aucs = {name: [] for name in fits}
    oracle_gains = []
    # 1200 pairs per pair seed: with 400 the accuracy after dropping (on ~225 pairs) varies by +-0.03 from the pair
    # draw alone, as much as the effect measured
    held_out = {pair_seed: _held_out_pairs(pair_seed, num_pairs=1200) for pair_seed in PAIR_SEEDS}
    for seed in TRAIN_SEEDS:
        setup = make_quality_checkpoint(tmp_path / f"seed{seed}", seed)
        qpaths = {name: tmp_path / f"seed{seed}" / f"q{i}.json" for i, name in enumerate(fits)}
        for name, (data, feature_set) in fits.items():
            fit_quality(
                setup.checkpoint,
                getattr(setup, data),
                qpaths[name],
                max_iter=60,
                max_leaf_nodes=4,
                feature_set=feature_set,
                progress=False,
            )
        for pair_seed in PAIR_SEEDS:
            res, oracle, auc = _held_out_before_after(setup.checkpoint, qpaths, held_out[pair_seed])
            for name in fits:
                _print_held_out(f"training seed {seed}, {name} fit", pair_seed, res[name], oracle, auc[name])
                assert res[name]["pairs_after"] < res[name]["pairs_before"]
                gains[name].append(res[name]["accuracy_after"] - res[name]["accuracy_before"])
                aucs[name].append(auc[name])
            oracle_gains.append(oracle["accuracy_after"] - oracle["accuracy_before"])
    shape = (len(TRAIN_SEEDS), len(PAIR_SEEDS))
    for name in fits:
        g, a = np.reshape(gains[name], shape), np.reshape(aucs[name], shape)
        print(f"{name} fit: gain per training seed {np.round(g.mean(axis=1), 3)}, mean {g.mean():+.4f}, runs > 0: ")
        print(f"  {(g > 0).sum()}/{g.size}; AUC per training seed {np.round(a.mean(axis=1), 3)}, mean {a.mean():.3f}")
    print("oracle gain per training seed", np.round(np.reshape(oracle_gains, shape).mean(axis=1), 3))
    print(f"oracle mean gain {np.mean(oracle_gains):+.4f}")
    # Measured (one thread; table in docs/data_quality.md): unseen fit, qaa+ratios: gain per training seed +0.012
    # +0.018 +0.040 +0.025 +0.034, mean +0.026, all 15 runs > 0 (min +0.008), AUC 0.62; training fit, qaa (the earlier
    # setup): mean +0.013, 13/15 runs > 0, AUC 0.59; oracle +0.053. AUC with qaa+ratios 0.62 / 0.66 (unseen / training
    # fit) vs 0.59 / 0.59 with qaa. Asserted, with margins below those values:
    g, a = np.reshape(gains["unseen"], shape), np.reshape(aucs["unseen"], shape)
    assert np.mean(oracle_gains) >= 0.02  # the protocol has something to find
    assert g.mean() >= 0.015
    assert (g.mean(axis=1) > 0).sum() >= 4 and g.min() > -0.02  # a gain for (nearly) every seed, no run loses much
    assert a.mean() >= 0.57
    with_ratios = np.mean(aucs["unseen"] + aucs["training"])
    assert with_ratios >= np.mean(aucs["unseen, qaa"] + aucs["training, qaa"]) + 0.02  # measured 0.64 vs 0.59


def _held_out_pairs(seed: int, *, num_pairs: int = 400, share: float = 0.25):
    """Verification pairs over ``num_pairs / 8`` identities disjoint from training, ``share`` of the images degraded
    (mixed :data:`conftest.DEGRADATIONS`); returns ``(images (2P, 112, 112, 3), issame (P,), degraded (2P,))``."""
    from facetrain.data.synthetic import make_verification_pairs

    from .conftest import DEGRADATIONS, degrade

    images, issame = make_verification_pairs(num_pairs, num_identities=num_pairs // 8, seed=seed)
    images = np.stack(images)
    rng = np.random.default_rng(100 + seed)
    bad = rng.random(len(images)) < share
    kinds = rng.integers(0, len(DEGRADATIONS), len(images))
    for i in np.flatnonzero(bad):
        images[i] = degrade(images[i], rng, DEGRADATIONS[kinds[i]])
    return images, issame, bad


def _held_out_before_after(checkpoint, qpaths, pairs, *, share: float = 0.25):
    """Accuracy on held-out ``pairs`` (from :func:`_held_out_pairs`) before and after dropping the lowest ``share`` by
    each quality model in ``qpaths`` (a path or ``{name: path}``), the oracle that drops exactly the degraded images,
    and each score's degraded-vs-clean ROC AUC; returns ``(results, oracle, AUCs)`` keyed like ``qpaths``."""
    from sklearn.metrics import roc_auc_score

    from facetrain.models import load_backbone

    images, issame, bad = pairs
    backbone = load_backbone(checkpoint)
    named = qpaths if isinstance(qpaths, dict) else {"": qpaths}
    res, aucs, feats = {}, {}, {}
    for name, qpath in named.items():
        qm = QualityModel.load(qpath)
        feature_set = qm.meta.get("feature_set", "qaa")
        if feature_set not in feats:
            feats[feature_set], emb = BNFeatureExtractor(backbone, feature_set=feature_set)(images)
        res[name] = quality_verification(emb, qm.score(feats[feature_set]), issame, drop_share=share)
        aucs[name] = float(roc_auc_score(bad, -qm.predict(feats[feature_set])))
    oracle = quality_verification(emb, np.where(bad, 0.0, 1.0), issame, drop_share=float(bad.mean()))
    if not isinstance(qpaths, dict):
        return res[""], oracle, aucs[""]
    return res, oracle, aucs


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
