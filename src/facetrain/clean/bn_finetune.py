"""BatchNorm fine-tuning: refresh a trained backbone's BatchNorm running statistics on mixed data.

Every parameter is frozen (``requires_grad=False``); the model stays in train mode, so only BatchNorm
``running_mean``/``running_var`` move (PyTorch momentum 0.1). Each batch mixes in-domain images with, optionally,
out-of-domain images (an image folder without faces, ``ood_share`` of the batch), pure N(0, 1) noise images
*appended* to the normalized batch (``int(noise_share * B)``), and Gaussian blur (sigma 3..5) applied to a
``blur_share`` of the images (the open_midas recipe, implemented from its notes). A checkpoint is saved every
``save_every`` steps and evaluated on the given verification pairs; the best one is copied to ``best.pt``. A plot
shows how far each BN layer's running mean and variance moved.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from facetrain.clean.common import atomic_write_json, pyplot, save_figure
from facetrain.errors import DataError, ModelError

log = logging.getLogger(__name__)

__all__ = ["finetune_bn", "BNFinetuneReport", "bn_shift"]


@dataclass
class BNFinetuneReport:
    """One row per evaluated checkpoint (step 0 = the input model) and the best one."""

    rows: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_path: str = ""
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bn_shift(before: dict, after: dict) -> dict[str, tuple[float, float]]:
    """Relative change of each BN layer's running statistics: ``||mu' - mu|| / (||mu|| + 1e-12)`` and the same for
    the variance, keyed by layer name."""
    out = {}
    for key in before:
        if key.endswith("running_mean"):
            layer = key[: -len(".running_mean")]
            mu0, mu1 = before[key].double(), after[key].double()
            v0, v1 = before[f"{layer}.running_var"].double(), after[f"{layer}.running_var"].double()
            out[layer] = (
                float((mu1 - mu0).norm() / (mu0.norm() + 1e-12)),
                float((v1 - v0).norm() / (v0.norm() + 1e-12)),
            )
    return out


def finetune_bn(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 1000,
    save_every: int = 200,
    batch_size: int = 64,
    ood: str | os.PathLike | None = None,
    ood_share: float = 0.05,
    noise_share: float = 0.05,
    blur_share: float = 0.0,
    eval_pairs: dict | None = None,
    seed: int = 0,
    device: str | None = None,
) -> BNFinetuneReport:
    """Fine-tune BatchNorm statistics (see the module docstring).

    Args:
        model: a facetrain checkpoint / ``backbone.pth`` that :func:`facetrain.models.load_backbone` reads.
        data: in-domain dataset (labels unused).
        out_dir: receives ``step_<N>.pt`` (``save_backbone`` format), ``best.pt``, ``table.json``, ``bn_shift.png``.
        steps: batches to run.
        save_every: checkpoint period in steps.
        batch_size: in-domain + out-of-domain images per batch (noise images come on top).
        ood: image folder of out-of-domain images (no faces), or None.
        ood_share, noise_share, blur_share: shares in [0, 1).
        eval_pairs: ``{name: path to a .bin}`` or ``{name: (images (2P,H,W,3) uint8, issame (P,))}``.
        seed: sampling seed.
        device: torch device.

    Raises:
        ModelError: the model has no BatchNorm layer.
    """
    import torch

    from facetrain.data import open_dataset
    from facetrain.models import load_backbone
    from facetrain.models.loading import save_backbone

    for name, share in (("ood_share", ood_share), ("noise_share", noise_share), ("blur_share", blur_share)):
        if not 0.0 <= share < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {share}")
    if steps < 1 or save_every < 1:
        raise DataError(f"steps ({steps}) and save_every ({save_every}) must be >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_backbone(model).to(device)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ModelError(f"{model}: the model has no BatchNorm layer; there is nothing to fine-tune")
    name, kwargs = _recipe(model, net)
    for p in net.parameters():
        p.requires_grad_(False)
    dataset = open_dataset(data)
    ood_set = None
    if ood is not None and ood_share > 0:
        from facetrain.data.folders import ImageFolderDataset

        ood_set = _FlatImages(ood) if not _has_subfolders(ood) else ImageFolderDataset(ood)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_state = {k: v.detach().clone().cpu() for k, v in net.state_dict().items()}
    report = BNFinetuneReport()
    pairs = _load_pairs(eval_pairs or {})
    report.rows.append({"step": 0, "path": str(model), **_evaluate(net, pairs, device)})
    rng = np.random.default_rng(seed)
    n_ood = int(round(ood_share * batch_size)) if ood_set is not None else 0
    n_noise = int(noise_share * batch_size)
    for step in range(1, steps + 1):
        images = [dataset[int(i)][0] for i in rng.integers(0, len(dataset), batch_size - n_ood)]
        images += (
            [_resize(ood_set[int(i)][0], images[0].shape) for i in rng.integers(0, len(ood_set), n_ood)]
            if n_ood
            else []
        )
        batch = np.stack(images)
        if blur_share > 0:
            import cv2

            for i in np.flatnonzero(rng.random(len(batch)) < blur_share):
                batch[i] = cv2.GaussianBlur(batch[i], (0, 0), float(rng.uniform(3.0, 5.0)))
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
        if n_noise:
            gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
            x = torch.cat([x, torch.randn((n_noise, *x.shape[1:]), generator=gen).to(device)])
        net.train()
        with torch.no_grad():
            net(x)
        if step % save_every == 0 or step == steps:
            path = save_backbone(net, out_dir / f"step_{step:06d}.pt", name, **kwargs)
            report.rows.append({"step": step, "path": str(path), **_evaluate(net, pairs, device)})
    net.eval()
    scored = [r for r in report.rows if "mean_accuracy" in r]
    best = max(scored, key=lambda r: (r["mean_accuracy"], -r["step"])) if scored else report.rows[-1]
    report.best_step = int(best["step"])
    best_path = out_dir / "best.pt"
    if best["step"] == 0:
        save_backbone(load_backbone(model), best_path, name, **kwargs)
    else:
        shutil.copyfile(best["path"], best_path)
    report.best_path = str(best_path)
    shift = bn_shift(start_state, {k: v.cpu() for k, v in net.state_dict().items()})
    report.files = [str(best_path), str(out_dir / "table.json")]
    try:
        _plot_shift(shift, out_dir / "bn_shift.png")
        report.files.append(str(out_dir / "bn_shift.png"))
    except Exception as exc:  # matplotlib is optional
        log.warning("no BN shift plot: %s", exc)
    atomic_write_json(out_dir / "table.json", {**report.to_dict(), "bn_shift": shift})
    return report


def _recipe(model, net) -> tuple[str, dict]:
    import torch

    obj = torch.load(model, map_location="cpu", weights_only=True) if Path(model).suffix in (".pt", ".pth") else {}
    if isinstance(obj, dict) and obj.get("backbone_name"):
        kwargs = dict(obj.get("backbone_kwargs") or {})
        kwargs["embedding_size"] = int(obj.get("embedding_size", kwargs.get("embedding_size", 512)))
        return str(obj["backbone_name"]), kwargs
    from facetrain.models.loading import infer_architecture

    return infer_architecture(net.state_dict(), source=str(model))


def _evaluate(net, pairs: dict, device) -> dict:
    if not pairs:
        return {}
    from facetrain.embed import TorchEmbedder
    from facetrain.eval.verification import evaluate, flip_sum_normalize

    embedder = TorchEmbedder(net, device=device)
    row = {}
    for name, (images, issame) in pairs.items():
        a, b = embedder.embed_flip(images)
        row[name] = float(evaluate(flip_sum_normalize(a, b), issame, n_folds=min(10, len(issame))).accuracy_mean)
    row["mean_accuracy"] = float(np.mean(list(row.values())))
    return row


def _load_pairs(eval_pairs: dict) -> dict:
    from facetrain.data import read_bin

    out = {}
    for name, item in eval_pairs.items():
        if isinstance(item, (str, os.PathLike)):
            images, issame = read_bin(item)
            out[name] = (np.stack(images), np.asarray(issame, bool))
        else:
            out[name] = (np.asarray(item[0]), np.asarray(item[1], bool))
    return out


def _plot_shift(shift: dict, path: Path) -> None:
    plt = pyplot()
    names = list(shift)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 4))
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [shift[n][0] for n in names], 0.4, label="running mean")
    ax.bar(pos + 0.2, [shift[n][1] for n in names], 0.4, label="running var")
    ax.set_xticks(pos, names, rotation=90, fontsize=6)
    ax.set_ylabel("relative change")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _has_subfolders(path) -> bool:
    return any(p.is_dir() for p in Path(path).iterdir())


class _FlatImages:
    """Images directly inside a folder (out-of-domain sets need no identity layout)."""

    def __init__(self, root) -> None:
        from facetrain.data.folders import is_image_name

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: out-of-domain image folder not found")
        self.files = sorted(p for p in root.iterdir() if is_image_name(p.name))
        if not self.files:
            raise DataError(f"{root}: no image in the out-of-domain folder")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from facetrain.data.images import read_image_file

        return read_image_file(self.files[i]), -1


def _resize(image: np.ndarray, shape) -> np.ndarray:
    import cv2

    if image.shape[:2] != tuple(shape[:2]):
        image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return image
