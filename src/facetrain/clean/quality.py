"""Face-quality scores from BatchNorm input statistics (the "QAA" idea of open_midas, implemented from its notes).

Features: a forward hook on every BatchNorm module whose input is 4-D. For an input ``X (B, C, H, W)`` of layer ``l``:
``m = mean_{H,W}(X)`` and ``v = var_{H,W}(X)`` per channel (unbiased), then per layer

* ``var_of_var = var_c(v)`` and ``mean_of_var = mean_c(v)`` (unbiased variance over channels): open_midas's two
  features (``feature_set="qaa"``: ``2 L`` features for ``L`` BatchNorm2d layers, in module order);
* with ``feature_set="qaa+ratios"`` (the default) also three ratios of the same statistics, which cancel a global
  contrast factor at the first layer (it scales every ``v`` there by its square):
  ``dispersion = var_c(v) / mean_c(v)^2``, ``mean_spread = var_c(m) / mean_c(v)`` and, from the second layer on,
  ``gain = mean_c(v_l) / mean_c(v_{l-1})`` (how the variance grows or shrinks from one BatchNorm input to the next):
  ``5 L - 1`` features. The per-channel spatial variance is dominated by the low-frequency content of the image
  (background, lighting, face shape), which varies far more between clean images than blur, noise or a low
  resolution change it; the ratios cancel part of that. Gradient-boosted trees cannot form such ratios from the raw
  pair themselves (their splits are axis-aligned).

Target: the cosine between an image's embedding and its class centre (the trained classifier row; with sub-centres the
nearest one). Preferably fit on images of its identities that the backbone did not train on: on images it has
memorized that cosine is near its maximum whatever their quality (docs/data_quality.md has the measured difference).
A gradient boosting regressor (scikit-learn ``HistGradientBoostingRegressor``, or CatBoost as in open_midas,
optional) maps features to the target; the score is
``round(100 * clip(prediction, 0, 1))``.

Safe storage: the fitted trees are exported to JSON (feature, threshold, children, NaN direction and leaf value per
node, plus the baseline) and evaluated with numpy; no pickle is ever written or read. The export is checked against
scikit-learn's own ``predict`` at fit time, so an incompatible scikit-learn version fails loudly then, not silently
later.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facetrain.clean.common import (
    atomic_write_text,
    default_device,
    iter_image_batches,
    l2_normalize,
    load_training_checkpoint,
    progress_bar,
    relabel,
    write_subset,
)
from facetrain.errors import DataError, ModelError, require

log = logging.getLogger(__name__)

__all__ = [
    "BNFeatureExtractor",
    "QualityModel",
    "QualityFitReport",
    "fit_quality",
    "fit_quality_arrays",
    "score_quality",
    "quality_verification",
    "quality_verification_bin",
    "quality_verification_table",
]

QUALITY_FORMAT = "facetrain.quality/1"
FEATURE_SETS = ("qaa+ratios", "qaa")
_EPS = 1e-12


class BNFeatureExtractor:
    """Runs a backbone once per batch and returns its BatchNorm-input features and its embeddings.

    Args:
        module: a torch backbone (eager ``nn.Module``; TorchScript hooks are not supported).
        device: torch device (default: the module's).
        batch_size: images per forward.
        feature_set: ``"qaa+ratios"`` (default) or ``"qaa"`` (open_midas's two features per layer); see the module
            docstring.

    Raises:
        ModelError: the module has no BatchNorm layer with a 4-D input, or the feature set is unknown.
    """

    def __init__(
        self, module, *, device: str | None = None, batch_size: int = 128, feature_set: str = "qaa+ratios"
    ) -> None:
        import torch

        if feature_set not in FEATURE_SETS:
            raise ModelError(f"unknown quality feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
        self.feature_set = feature_set
        if isinstance(module, torch.jit.ScriptModule):
            raise ModelError("quality features need an eager PyTorch backbone, not TorchScript (hooks do not run)")
        self.layers = [(name, m) for name, m in module.named_modules() if type(m).__name__.startswith("BatchNorm")]
        if not self.layers:
            raise ModelError(
                f"{type(module).__name__} has no BatchNorm layer; BN-statistics quality needs a backbone with "
                "BatchNorm2d layers (iresnet, mbf, demo_cnn)"
            )
        if device is None:
            param = next(iter(module.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.batch_size = int(batch_size)
        self._buffer: dict[str, torch.Tensor] = {}
        self.layer_names: list[str] = []
        _, emb = self._forward(np.zeros((2, 112, 112, 3), np.uint8))
        self.embedding_size = emb.shape[1]
        if not self.layer_names:
            raise ModelError(
                f"{type(module).__name__}: none of its {len(self.layers)} BatchNorm layers sees a 4-D (B, C, H, W) "
                "input; BN-statistics quality needs BatchNorm2d layers"
            )

    @property
    def feature_names(self) -> list[str]:
        """``<layer>.var_of_var``, ``<layer>.mean_of_var`` per BatchNorm2d layer, then (``qaa+ratios``)
        ``<layer>.dispersion``, ``<layer>.mean_spread`` per layer and ``<layer>.gain`` from the second layer on."""
        names = [f"{n}.{s}" for n in self.layer_names for s in ("var_of_var", "mean_of_var")]
        if self.feature_set == "qaa+ratios":
            names += [f"{n}.{s}" for n in self.layer_names for s in ("dispersion", "mean_spread")]
            names += [f"{n}.gain" for n in self.layer_names[1:]]
        return names

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, 112, 112, 3)`` uint8 RGB -> ``(features (B, F) float32, embeddings (B, D) float32)``, ``F`` =
        ``len(feature_names)``."""
        feats, embs = [], []
        for start in range(0, len(images), self.batch_size):
            f, e = self._forward(images[start : start + self.batch_size])
            feats.append(f)
            embs.append(e)
        return np.concatenate(feats), np.concatenate(embs)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        stats: dict[str, torch.Tensor] = {}

        def hook(name):
            def _record(_module, inputs, _output):
                x = inputs[0]
                if x.ndim == 4:
                    # float64: a variance of variances loses digits in float32 (MPS has no float64)
                    flat = x.flatten(2).to(torch.float32 if x.device.type == "mps" else torch.float64)
                    v = flat.var(dim=2, unbiased=True)  # (B, C)
                    m = flat.mean(dim=2)
                    stats[name] = torch.stack(
                        [v.var(dim=1, unbiased=True), v.mean(dim=1), m.var(dim=1, unbiased=True)], dim=1
                    )

            return _record

        handles = [m.register_forward_hook(hook(name)) for name, m in self.layers]
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
                x = x.permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
                out = self.module(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
        finally:
            for h in handles:
                h.remove()
        if not self.layer_names:
            self.layer_names = [name for name, _ in self.layers if name in stats]
        per_layer = torch.stack([stats[name] for name in self.layer_names], dim=1)  # (B, L, 3)
        var_of_var, mean_of_var, var_of_mean = per_layer.unbind(dim=2)  # (B, L) each
        cols = [per_layer[:, :, :2].flatten(1)]  # var_of_var, mean_of_var per layer, layer-major
        if self.feature_set == "qaa+ratios":
            denom = mean_of_var.clamp_min(_EPS)
            cols.append(torch.stack([var_of_var / denom**2, var_of_mean / denom], dim=2).flatten(1))
            cols.append(mean_of_var[:, 1:] / denom[:, :-1])
        feats = torch.cat(cols, dim=1)
        return feats.cpu().numpy().astype(np.float32), out.float().cpu().numpy()


class QualityModel:
    """A gradient-boosted tree ensemble evaluated with numpy (loaded from the JSON written by :meth:`save`).

    Attributes:
        baseline: the constant initial prediction.
        trees: list of dicts of equal-length node arrays ``feature``, ``threshold``, ``left``, ``right``,
            ``missing_left``, ``is_leaf``, ``value``.
        feature_names: names of the ``F`` input features (:attr:`BNFeatureExtractor.feature_names`).
        meta: provenance (backbone, training figures).
    """

    def __init__(self, baseline: float, trees: list[dict], feature_names: list[str], meta: dict | None = None):
        self.baseline = float(baseline)
        self.trees = [{key: np.asarray(val) for key, val in tree.items()} for tree in trees]
        self.feature_names = list(feature_names)
        self.meta = dict(meta or {})

    @classmethod
    def from_sklearn(cls, regressor, feature_names: list[str], meta: dict | None = None) -> QualityModel:
        """Export a fitted ``HistGradientBoostingRegressor`` (numerical features, squared error)."""
        trees = []
        for iteration in regressor._predictors:
            for predictor in iteration:
                nodes = predictor.nodes
                if np.any(nodes["is_categorical"]):
                    raise ModelError("categorical splits cannot be exported; quality features are all numerical")
                trees.append(
                    {
                        "feature": nodes["feature_idx"].astype(np.int64),
                        "threshold": nodes["num_threshold"].astype(np.float64),
                        "left": nodes["left"].astype(np.int64),
                        "right": nodes["right"].astype(np.int64),
                        "missing_left": nodes["missing_go_to_left"].astype(bool),
                        "is_leaf": nodes["is_leaf"].astype(bool),
                        "value": nodes["value"].astype(np.float64),
                    }
                )
        baseline = float(np.ravel(regressor._baseline_prediction)[0])
        return cls(baseline, trees, feature_names, meta)

    @classmethod
    def from_catboost(cls, regressor, feature_names: list[str], meta: dict | None = None) -> QualityModel:
        """Export a fitted ``catboost.CatBoostRegressor`` (numerical features) through CatBoost's own JSON dump."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            regressor.save_model(str(Path(tmp) / "model.json"), format="json")
            dump = json.loads((Path(tmp) / "model.json").read_text(encoding="utf-8"))
        nan_max = {
            f["flat_feature_index"]: f.get("nan_value_treatment") == "AsTrue" or f.get("nan_value_treatment") == "Max"
            for f in dump["features_info"].get("float_features", [])
        }
        scale, bias = dump.get("scale_and_bias", [1.0, [0.0]])
        trees = []
        for tree in dump["oblivious_trees"]:
            if any(sp.get("split_type") != "FloatFeature" for sp in tree["splits"]):
                raise ModelError("only numerical CatBoost splits can be exported; quality features are all numerical")
            features = np.array([sp["float_feature_index"] for sp in tree["splits"]], np.int64)
            trees.append(
                {
                    "features": features,
                    "borders": np.array([sp["border"] for sp in tree["splits"]], np.float64),
                    "nan_right": np.array([nan_max.get(int(f), False) for f in features], bool),
                    "leaf": float(scale) * np.asarray(tree["leaf_values"], np.float64),
                }
            )
        return cls(float(np.ravel(bias)[0]), trees, feature_names, meta)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw predictions (cosine-to-centre estimates), ``(N, F) -> (N,)`` float64."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ModelError(
                f"quality model expects {len(self.feature_names)} BN features, got shape {x.shape}; "
                "score with the backbone the quality model was fitted on"
            )
        rows = np.arange(len(x))
        out = np.full(len(x), self.baseline)
        for t in self.trees:
            if "leaf" in t:  # oblivious tree (CatBoost): leaf index = sum_j [x_{f_j} > b_j] << j
                bits = x[:, t["features"]] > t["borders"]
                bits |= np.isnan(x[:, t["features"]]) & t["nan_right"]
                out += t["leaf"][(bits.astype(np.int64) << np.arange(len(t["features"]))).sum(axis=1)]
                continue
            node = np.zeros(len(x), np.int64)
            while True:
                active = ~t["is_leaf"][node]
                if not active.any():
                    break
                val = x[rows, t["feature"][node]]
                go_left = np.where(np.isnan(val), t["missing_left"][node], val <= t["threshold"][node])
                node = np.where(active, np.where(go_left, t["left"][node], t["right"][node]), node)
            out += t["value"][node]
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        """Quality scores ``round(100 * clip(prediction, 0, 1))`` in [0, 100], ``(N,)`` float32."""
        return np.round(100.0 * np.clip(self.predict(features), 0.0, 1.0)).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "format": QUALITY_FORMAT,
            "kind": "gradient_boosted_trees",
            "baseline": self.baseline,
            "feature_names": self.feature_names,
            "meta": self.meta,
            "trees": [
                {key: val.astype(int).tolist() if val.dtype == bool else val.tolist() for key, val in t.items()}
                for t in self.trees
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON, atomically (no pickle)."""
        atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityModel:
        """Read a model written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such quality model")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a quality model JSON ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != QUALITY_FORMAT:
            raise ModelError(f"{path}: not a facetrain quality model (format {QUALITY_FORMAT!r} expected)")
        trees = []
        for t in obj["trees"]:
            tree = {key: np.asarray(val) for key, val in t.items()}
            for key in ("missing_left", "is_leaf", "nan_right"):
                if key in tree:
                    tree[key] = tree[key].astype(bool)
            trees.append(tree)
        return cls(obj["baseline"], trees, obj["feature_names"], obj.get("meta"))


@dataclass
class QualityFitReport:
    """Figures of :func:`fit_quality` (held-out = the last ``holdout`` share of a seeded permutation)."""

    images: int
    features: int
    trees: int
    train_rmse: float
    holdout_rmse: float
    holdout_spearman: float
    target_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


def fit_quality_arrays(
    features: np.ndarray,
    targets: np.ndarray,
    feature_names: list[str],
    *,
    max_iter: int = 200,
    learning_rate: float = 0.05,
    max_leaf_nodes: int = 31,
    l2_regularization: float = 1.0,
    holdout: float = 0.2,
    seed: int = 0,
    meta: dict | None = None,
    regressor: str = "hgb",
    depth: int = 10,
) -> tuple[QualityModel, QualityFitReport]:
    """Fit the regressor on precomputed features and targets, export it, and check the export.

    Args:
        features: (N, F) BN features.
        targets: (N,) cosine to the class centre.
        feature_names: names of the features.
        max_iter, learning_rate, max_leaf_nodes, l2_regularization: ``HistGradientBoostingRegressor`` settings
            (for CatBoost: ``iterations = max_iter``, ``l2_leaf_reg = 2 * l2_regularization``).
        holdout: share of images held out for the reported figures (0 = none).
        seed: split and regressor seed.
        meta: provenance stored in the model.
        regressor: ``"hgb"`` (scikit-learn, default) or ``"catboost"`` (optional extra ``catboost``; open_midas used
            ``depth=10, l2_leaf_reg=2, iterations=2500, learning_rate=0.03``).
        depth: CatBoost tree depth.
    """
    spearmanr = require("scipy.stats", "clean", "quality fit").spearmanr
    HistGradientBoostingRegressor = require("sklearn.ensemble", "clean", "quality fit").HistGradientBoostingRegressor  # noqa: N806

    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    if len(x) < 10:
        raise DataError(f"quality fit needs at least 10 images, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise DataError("quality fit: features or targets contain NaN/Inf; check the model and images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_hold = int(round(holdout * len(x))) if holdout > 0 else 0
    hold, train = order[:n_hold], order[n_hold:]
    if regressor == "catboost":
        catboost = require("catboost", "catboost", "the CatBoost quality regressor")
        reg = catboost.CatBoostRegressor(
            depth=depth,
            l2_leaf_reg=2.0 * l2_regularization,
            iterations=max_iter,
            learning_rate=learning_rate,
            random_seed=seed,
            verbose=False,
            allow_writing_files=False,
            thread_count=-1,
        )
        reg.fit(x[train], y[train])
        model = QualityModel.from_catboost(reg, feature_names, meta)
    elif regressor == "hgb":
        reg = HistGradientBoostingRegressor(
            max_iter=max_iter,
            learning_rate=learning_rate,
            max_leaf_nodes=max_leaf_nodes,
            l2_regularization=l2_regularization,
            early_stopping=False,
            random_state=seed,
        )
        reg.fit(x[train], y[train])
        model = QualityModel.from_sklearn(reg, feature_names, meta)
    else:
        raise ModelError(f"unknown quality regressor {regressor!r}; use 'hgb' or 'catboost'")
    check = x[: min(len(x), 512)]
    gap = float(np.max(np.abs(model.predict(check) - reg.predict(check))))
    if gap > 1e-6:
        raise ModelError(
            f"exported quality trees disagree with the {regressor} regressor by {gap:.3g}; this version's tree "
            "layout is not supported"
        )
    rmse = lambda idx: float(np.sqrt(np.mean((model.predict(x[idx]) - y[idx]) ** 2))) if len(idx) else float("nan")  # noqa: E731
    spearman = float(spearmanr(model.predict(x[hold]), y[hold]).statistic) if n_hold > 2 else float("nan")
    report = QualityFitReport(
        images=len(x),
        features=x.shape[1],
        trees=len(model.trees),
        train_rmse=rmse(train),
        holdout_rmse=rmse(hold),
        holdout_spearman=spearman,
        target_mean=float(y.mean()),
    )
    model.meta["fit"] = report.to_dict()
    return model, report


def class_centre_cosine(embeddings: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Target of the regressor: ``max_k cos(e_i, w_{y_i,k})`` for centres ``(C, K, D)``; ``(N,)``."""
    emb = l2_normalize(embeddings)
    cen = centres / np.maximum(np.linalg.norm(centres, axis=2, keepdims=True), 1e-12)
    return np.einsum("bd,bkd->bk", emb, cen[labels]).max(axis=1)


def fit_quality(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_images: int | None = None,
    batch_size: int = 128,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    feature_set: str = "qaa+ratios",
    **regressor_kwargs,
) -> QualityFitReport:
    """Fit a quality model for a backbone from its training checkpoint and dataset; writes ``out`` (JSON).

    Args:
        checkpoint: training checkpoint with ``class_centres`` (the targets) and the backbone (the features).
        data: images of the checkpoint's identities (labels index ``class_centres``), best ones the backbone did not
            train on (its cosine to the centre of a memorized image is near the maximum whatever the quality).
        out: the quality model file (``.json``).
        max_images: fit on a seeded random subset of this many images.
        batch_size, device: feature extraction.
        seed: subset / split / regressor seed.
        feature_set: ``"qaa+ratios"`` or ``"qaa"`` (see :class:`BNFeatureExtractor`); stored in the model.
        **regressor_kwargs: see :func:`fit_quality_arrays`.
    """
    from facetrain.data import open_dataset
    from facetrain.embed import state_dict_hash
    from facetrain.models import load_backbone

    ckpt = load_training_checkpoint(checkpoint)
    backbone = load_backbone(checkpoint)
    extractor = BNFeatureExtractor(
        backbone, device=default_device(device), batch_size=batch_size, feature_set=feature_set
    )
    centres = ckpt["class_centres"].reshape(ckpt["num_classes"], ckpt["subcenter_k"], -1)
    if centres.shape[2] != extractor.embedding_size:
        raise ModelError(
            f"{checkpoint}: class_centres have {centres.shape[2]} dims, the backbone embeds {extractor.embedding_size}"
        )
    dataset = open_dataset(data)
    labels = np.asarray(dataset.labels(), np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= ckpt["num_classes"]):
        raise DataError(f"{data}: labels outside the {ckpt['num_classes']} classes of {checkpoint}")
    indices = np.arange(len(labels))
    if max_images is not None and max_images < len(indices):
        indices = np.sort(np.random.default_rng(seed).choice(len(indices), max_images, replace=False))
    feats, targets = _features_and_targets(extractor, dataset, indices, centres, batch_size, progress)
    meta = {
        "checkpoint": str(checkpoint),
        "backbone_identity": state_dict_hash(backbone.state_dict()),
        "data": str(data),
        "target": "cosine to the class centre",
        "feature_set": feature_set,
    }
    model, report = fit_quality_arrays(
        feats, targets, extractor.feature_names, seed=seed, meta=meta, **regressor_kwargs
    )
    model.save(out)
    return report


def _features_and_targets(extractor, dataset, indices, centres, batch_size, progress):
    feats = np.zeros((len(indices), len(extractor.feature_names)), np.float32)
    targets = np.zeros(len(indices), np.float32)
    bar = progress_bar(len(indices), "quality features", progress)
    pos = 0
    try:
        for _, images, labels in iter_image_batches(dataset, batch_size, indices):
            f, e = extractor(images)
            feats[pos : pos + len(f)] = f
            targets[pos : pos + len(f)] = class_centre_cosine(e, labels, centres)
            pos += len(f)
            bar.update(len(f))
    finally:
        bar.close()
    return feats, targets


def score_quality(
    quality_model: str | os.PathLike,
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    drop_below: float | None = None,
    filtered_out: str | os.PathLike | None = None,
    fmt: str = "rec",
    batch_size: int = 128,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score every image of a dataset; write ``out`` (CSV, or Parquet for a ``.parquet`` name with pyarrow).

    Columns: ``index``, ``label``, ``quality`` (0..100), ``raw`` (prediction). With ``drop_below``, the images
    scoring below it are left out of ``filtered_out`` (a dataset in ``fmt``; labels re-indexed).

    Returns:
        Summary dict: ``images``, ``mean_quality``, ``dropped`` (when filtering), ``out``.
    """
    from facetrain.data import open_dataset

    qm = QualityModel.load(quality_model)
    extractor = _extractor_for(qm, model, device, batch_size)
    if extractor.feature_names != qm.feature_names:
        raise ModelError(
            f"{quality_model} was fitted on {len(qm.feature_names)} BN features of another backbone; {model} gives "
            f"{len(extractor.feature_names)}; score with the backbone it was fitted on"
        )
    dataset = open_dataset(data)
    labels = np.asarray(dataset.labels(), np.int64)
    raw = np.zeros(len(labels), np.float64)
    bar = progress_bar(len(labels), "quality", progress)
    try:
        for idx, images, _ in iter_image_batches(dataset, batch_size):
            raw[idx] = qm.predict(extractor(images)[0])
            bar.update(len(idx))
    finally:
        bar.close()
    quality = np.round(100.0 * np.clip(raw, 0.0, 1.0)).astype(np.float32)
    write_scores(out, labels, quality, raw)
    summary = {"images": len(labels), "mean_quality": float(quality.mean()) if len(quality) else 0.0, "out": str(out)}
    if drop_below is not None:
        if filtered_out is None:
            raise DataError("--drop-below needs --filtered-out (where the filtered dataset goes)")
        keep, new_labels, _ = relabel(quality >= drop_below, labels)
        write_subset(data, filtered_out, keep, new_labels, fmt=fmt, overwrite=overwrite)
        summary.update(dropped=int(len(labels) - len(keep)), filtered_out=str(filtered_out))
    return summary


def _extractor_for(qm: QualityModel, model, device, batch_size) -> BNFeatureExtractor:
    """The feature extractor a quality model was fitted with (models written before feature sets existed: ``qaa``)."""
    from facetrain.models import load_backbone

    feature_set = qm.meta.get("feature_set", "qaa")
    return BNFeatureExtractor(
        load_backbone(model), device=default_device(device), batch_size=batch_size, feature_set=feature_set
    )


def write_scores(path: str | os.PathLike, labels: np.ndarray, quality: np.ndarray, raw: np.ndarray) -> None:
    """Per-image scores as CSV, or Parquet when the name ends in ``.parquet`` (needs pyarrow)."""
    path = Path(path)
    if path.suffix == ".parquet":
        pa = require("pyarrow", "parquet", "Parquet output")
        pq = require("pyarrow.parquet", "parquet", "Parquet output")
        table = pa.table({"index": np.arange(len(labels)), "label": labels, "quality": quality, "raw": raw})
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "label", "quality", "raw"])
    for i in range(len(labels)):
        writer.writerow([i, int(labels[i]), f"{quality[i]:g}", f"{raw[i]:.6f}"])
    atomic_write_text(path, buf.getvalue())


def quality_verification(
    embeddings: np.ndarray, scores: np.ndarray, issame: np.ndarray, *, drop_share: float = 0.05, n_folds: int = 10
) -> dict:
    """Verification accuracy before and after dropping the lowest-quality share of images.

    A pair is removed when either of its images is among the ``drop_share`` lowest scores (the protocol changes:
    figures after dropping are not comparable to the standard protocol).

    Args:
        embeddings: (2P, D) pair embeddings (pair p = rows 2p, 2p+1).
        scores: (2P,) quality of each image.
        issame: (P,) bool.
        drop_share: share of images to drop (0..1).
        n_folds: verification folds.

    Returns:
        ``{"accuracy_before", "accuracy_after", "pairs_before", "pairs_after", "threshold"}``.
    """
    from facetrain.eval.verification import evaluate

    emb = l2_normalize(embeddings)
    issame = np.asarray(issame, bool)
    scores = np.asarray(scores, np.float64)
    cut = float(np.quantile(scores, drop_share)) if drop_share > 0 else -np.inf
    low = scores < cut if drop_share > 0 else np.zeros(len(scores), bool)
    if drop_share > 0 and low.sum() < int(drop_share * len(scores)):  # ties at the cut: drop the lowest by rank
        low = np.zeros(len(scores), bool)
        low[np.argsort(scores, kind="stable")[: int(round(drop_share * len(scores)))]] = True
    pair_ok = ~(low[0::2] | low[1::2])
    before = evaluate(emb, issame, n_folds=min(n_folds, len(issame)))
    keep_rows = np.repeat(pair_ok, 2)
    after = evaluate(emb[keep_rows], issame[pair_ok], n_folds=min(n_folds, int(pair_ok.sum())))
    return {
        "accuracy_before": float(before.accuracy_mean),
        "accuracy_after": float(after.accuracy_mean),
        "pairs_before": int(len(issame)),
        "pairs_after": int(pair_ok.sum()),
        "threshold": cut,
    }


def quality_verification_table(results: dict[str, dict], drop_share: float | None = None) -> str:
    """The before/after report of :func:`quality_verification` as a text table, one row per evaluation set.

    Args:
        results: ``{name: quality_verification(...) result}``.
        drop_share: the dropped share, for the header (optional).
    """
    dropped = f"lowest {drop_share:.0%} dropped" if drop_share is not None else "lowest-quality dropped"
    head = ("set", "accuracy before", "pairs", f"accuracy after ({dropped})", "pairs after", "gain")
    rows = [
        (
            name,
            f"{r['accuracy_before']:.4f}",
            str(r["pairs_before"]),
            f"{r['accuracy_after']:.4f}",
            str(r["pairs_after"]),
            f"{r['accuracy_after'] - r['accuracy_before']:+.4f}",
        )
        for name, r in results.items()
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows])


def quality_verification_bin(
    quality_model: str | os.PathLike,
    model: str | os.PathLike,
    bin_path: str | os.PathLike,
    *,
    drop_share: float = 0.05,
    batch_size: int = 128,
    device: str | None = None,
) -> dict:
    """:func:`quality_verification` on a verification ``.bin`` (embeddings and scores from ``model``)."""
    from facetrain.data import read_bin

    qm = QualityModel.load(quality_model)
    extractor = _extractor_for(qm, model, device, batch_size)
    images, issame = read_bin(bin_path)
    images = np.stack(images)
    feats, emb = extractor(images)
    return quality_verification(emb, qm.score(feats), issame, drop_share=drop_share)
