"""The training loop: config in, checkpoint + metrics out, in one readable file.

One step: a batch of uint8 faces -> ``(x/255 - 0.5)/0.5`` -> backbone -> embedding ``(B, D)`` -> cosine against the
normalized class centres ``(B, C)`` -> margin (ArcFace, CosFace, ... from :mod:`facetrain.heads.margins`) ->
softmax cross-entropy -> backward, gradient clipping, optimizer step, per-step learning rate (linear warm-up, then
poly / cosine / step / constant).

Outputs in ``config.output.dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per line:
training logs every ``train.log_every`` steps and verification results), ``checkpoint.pt`` (tensors and primitives
only: ``torch.load(path, weights_only=True)`` reads it).

This is the single-process trainer; Partial FC sharding, DDP, resume and hooks come with the full trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetrain.config import Config, save_config
from facetrain.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "ClassCentres", "embed_images", "evaluate_pairs", "lr_factor", "load_val_sets"]

SYNTHETIC_VAL_OFFSET = 1_000_000  # held-out synthetic identities start here (training uses 0 .. num_identities-1)
CHECKPOINT_FORMAT = "facetrain.checkpoint/1"


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        steps: optimizer steps taken.
        images_per_sec: training throughput over the whole run (excluding evaluation).
        final_loss: mean loss over the last ``train.log_every`` steps.
        checkpoint_path: the final checkpoint.
        metrics_path: the JSONL metrics file.
        output_dir: the run folder (also holds ``config.yaml``).
        num_classes: identities in the training data.
        num_images: images in the training data.
        seconds: wall time of the training loop (excluding evaluation).
        evaluations: ``[{"step": int, "<val set>": accuracy, ...}, ...]`` in order.
    """

    steps: int
    images_per_sec: float
    final_loss: float
    checkpoint_path: Path
    metrics_path: Path
    output_dir: Path
    num_classes: int
    num_images: int
    seconds: float
    evaluations: list[dict[str, float]] = field(default_factory=list)


def train(config: Config, *, evaluate_at_start: bool = False, progress: bool | None = None) -> TrainResult:
    """Train a backbone + class centres with a margin softmax loss, as ``config`` says.

    Args:
        config: a validated run config (:func:`facetrain.config.load_config`).
        evaluate_at_start: also run verification on the val sets before the first step (step 0).
        progress: show a tqdm bar; None = only when stderr is a terminal.

    Returns:
        TrainResult.
    """
    from tqdm import tqdm

    out_dir = Path(config.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)

    dataset = build_dataset(config)
    num_classes = int(dataset.num_classes)
    loader = build_loader(dataset, config, device)
    steps_per_epoch = max(1, len(loader) // config.train.grad_accum)
    total_steps = config.train.max_steps or config.schedule.epochs * steps_per_epoch
    warmup_steps = int(round(config.schedule.warmup_epochs * steps_per_epoch))
    val_sets = load_val_sets(config)

    backbone = build_model(config).to(device)
    centres = ClassCentres(num_classes, config.model.embedding_size).to(device)
    margin = build_loss_margin(config)
    if device.type != "cpu":
        margin = margin.to(device)
    optimizer = build_optimizer(config, backbone, centres)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    amp_dtype = resolve_amp(config.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    logger.info(
        "training %s on %d images / %d identities, %d steps (%d per epoch) on %s",
        config.model.backbone,
        len(dataset),
        num_classes,
        total_steps,
        steps_per_epoch,
        device,
    )

    evaluations: list[dict[str, float]] = []

    def run_eval(step: int) -> None:
        if not val_sets:
            return
        record: dict[str, float] = {"step": step}
        for name, (images, issame) in val_sets.items():
            result = evaluate_pairs(
                backbone, images, issame, n_folds=config.eval.n_folds, batch_size=config.eval.batch_size, device=device
            )
            record[name] = result.accuracy_mean
            logger.info(
                "step %d: %s verification accuracy %.4f +- %.4f", step, name, result.accuracy_mean, result.accuracy_std
            )
        evaluations.append(record)
        _append_jsonl(metrics_path, {"kind": "eval", **record})

    if evaluate_at_start:
        run_eval(0)

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total_steps, disable=not show, desc="train", unit="step", dynamic_ncols=True)
    step, seen, train_seconds = 0, 0, 0.0
    recent_losses: list[float] = []
    batches = _endless(loader)
    backbone.train()
    try:
        while step < total_steps:
            started = time.perf_counter()
            factor = lr_factor(step, total_steps, warmup_steps, steps_per_epoch, config)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for _ in range(config.train.grad_accum):
                images, labels = next(batches)
                images = normalize_images(images.to(device, non_blocking=True))
                if config.model.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    embeddings = backbone(images)
                loss = margin_loss(embeddings.float(), labels, centres, margin) / config.train.grad_accum
                scaler.scale(loss).backward()
                loss_value += float(loss.detach())
                seen += labels.numel()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}; lower optim.lr or check the data")
            scaler.unscale_(optimizer)
            if config.optim.clip_grad_norm:
                nn.utils.clip_grad_norm_(backbone.parameters(), config.optim.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            train_seconds += time.perf_counter() - started
            recent_losses = (recent_losses + [loss_value])[-config.train.log_every :]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
            if step % config.train.log_every == 0 or step == total_steps:
                _append_jsonl(
                    metrics_path,
                    {
                        "kind": "train",
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "loss": float(np.mean(recent_losses)),
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_sec": seen / max(train_seconds, 1e-9),
                    },
                )
            if config.output.save_every_steps and step % config.output.save_every_steps == 0 and step < total_steps:
                save_checkpoint(out_dir / "checkpoint.pt", config, step, backbone, centres, optimizer, num_classes)
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total_steps:
                run_eval(step)
                backbone.train()
    finally:
        bar.close()

    checkpoint_path = save_checkpoint(
        out_dir / "checkpoint.pt", config, step, backbone, centres, optimizer, num_classes
    )
    run_eval(step)
    return TrainResult(
        steps=step,
        images_per_sec=seen / max(train_seconds, 1e-9),
        final_loss=float(np.mean(recent_losses)) if recent_losses else float("nan"),
        checkpoint_path=checkpoint_path,
        metrics_path=metrics_path,
        output_dir=out_dir,
        num_classes=num_classes,
        num_images=len(dataset),
        seconds=train_seconds,
        evaluations=evaluations,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Builders (the only functions here that read the config)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: {name!r} is not a device ({exc}); use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for but CUDA is not available; use train.device=cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` (None = full fp32). ``auto``: bf16 on GPUs that support it, else fp16 on
    GPUs, none on CPU."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def build_dataset(config: Config):
    """The training dataset: ``open_dataset(data.path)`` or synthetic identities when ``data.path`` is null."""
    if config.data.path:
        from facetrain.data import open_dataset

        return open_dataset(config.data.path, on_bad="skip" if config.data.skip_bad else "raise")
    from facetrain.data.synthetic import SyntheticIdentities

    syn = config.data.synthetic
    return SyntheticIdentities(
        syn.num_identities, syn.images_per_identity, seed=syn.seed, image_size=config.data.image_size
    )


def build_loader(dataset, config: Config, device: torch.device) -> torch.utils.data.DataLoader:
    """Shuffled, seeded DataLoader of ``(uint8 (B, 3, H, W), int64 (B,))`` batches; drops the last partial batch."""
    flip = config.data.augment != "none"
    if config.data.augment in ("basic", "strong"):
        logger.warning("data.augment=%s: the minimal trainer applies horizontal flips only", config.data.augment)
    workers = config.data.num_workers
    generator = torch.Generator().manual_seed(config.train.seed)
    batch_size = min(config.train.batch_size, len(dataset))
    return torch.utils.data.DataLoader(
        _TrainView(dataset, flip=flip),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        generator=generator,
        worker_init_fn=_seed_worker,
    )


def build_model(config: Config) -> nn.Module:
    """The backbone from the model registry, ``(B, 3, H, W) -> (B, D)``."""
    from facetrain.models import build_backbone

    kwargs = dict(config.model.backbone_kwargs)
    if config.model.dropout:
        kwargs.setdefault("dropout", config.model.dropout)
    if config.model.gradient_checkpointing:
        kwargs.setdefault("gradient_checkpointing", True)
    model = build_backbone(config.model.backbone, embedding_size=config.model.embedding_size, **kwargs)
    if config.model.init_from:
        raise ConfigError("model.init_from is not supported by the minimal trainer yet; leave it null")
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_loss_margin(config: Config) -> nn.Module:
    """The margin from :func:`facetrain.heads.margins.build_margin`; the m1/m2/m3 fields go to every method, which
    accepts the ones it lacks only at their neutral value (so a setting is never ignored silently)."""
    from facetrain.heads.margins import build_margin

    loss = config.loss
    return build_margin(
        loss.margin,
        subcenter_k=loss.subcenter_k,
        interclass_filtering_threshold=loss.interclass_filtering_threshold,
        scale=loss.scale,
        multiplicative_margin=loss.multiplicative_margin,
        angular_margin=loss.angular_margin,
        additive_margin=loss.additive_margin,
        exact_gradient=loss.exact_gradient,
        **loss.margin_kwargs,
    )


def build_optimizer(config: Config, backbone: nn.Module, centres: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over two groups: the backbone and the class centres."""
    opt = config.optim
    groups = _param_groups(backbone, opt.weight_decay, opt.no_decay_norm_bias)
    groups.append({"params": list(centres.parameters()), "weight_decay": opt.weight_decay})
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum)
    return torch.optim.AdamW(groups, lr=opt.lr)


def load_val_sets(config: Config) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Verification sets by name: every ``data.val_bins`` file, plus held-out synthetic pairs when training on
    synthetic identities (``data.synthetic.val_identities`` identities from offset 1,000,000)."""
    sets: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    for path in config.data.val_bins:
        from facetrain.data import read_bin

        images, issame = read_bin(path)
        sets[Path(path).stem] = (list(images), np.asarray(issame, dtype=bool))
    syn = config.data.synthetic
    if config.data.path is None and syn.val_identities >= 2 and syn.val_pairs >= 2:
        from facetrain.data.synthetic import make_verification_pairs

        sets["synthetic_val"] = make_verification_pairs(
            syn.val_pairs - syn.val_pairs % 2,
            num_identities=syn.val_identities,
            seed=syn.seed,
            identity_offset=SYNTHETIC_VAL_OFFSET,
            image_size=config.data.image_size,
        )
    return sets


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of a step


class ClassCentres(nn.Module):
    """Class centres ``W (C, D)`` of the classifier; ``forward`` gives the cosine logits ``(B, C)`` in [-1, 1]."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` embeddings -> ``(B, C)`` cosine similarities to every centre."""
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        return cos.clamp(-1.0, 1.0)


def margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, centres: ClassCentres, margin: nn.Module):
    """Softmax cross-entropy of margin-adjusted cosine logits (plus the margin's auxiliary loss, e.g. MagFace)."""
    out = margin(centres(embeddings), labels, embeddings.norm(dim=1))
    logits, aux = (out.logits, out.aux_loss) if hasattr(out, "logits") else (out, None)
    loss = F.cross_entropy(logits, labels)
    return loss + aux if aux is not None else loss


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float ``(x/255 - 0.5)/0.5`` in [-1, 1] (InsightFace's input convention)."""
    return (images.float() / 255.0 - 0.5) / 0.5


def lr_factor(step: int, total_steps: int, warmup_steps: int, steps_per_epoch: int, config: Config) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up then the schedule.

    poly: ``(1 - t)^power`` with t the fraction of post-warm-up steps done (arcface_torch's PolyScheduler);
    cosine: ``0.5 (1 + cos(pi t))``; step: ``gamma^(milestones passed)`` (milestones in epochs); constant: 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    sched = config.schedule
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if sched.name == "poly":
        return (1.0 - t) ** sched.power
    if sched.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if sched.name == "step":
        epoch = step / steps_per_epoch
        return sched.gamma ** sum(epoch >= m for m in sched.milestones)
    return 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    flip: bool = True,
) -> np.ndarray:
    """Embeddings of uint8 RGB ``(H, W, 3)`` images, ``(N, D)`` float32.

    With ``flip`` (the flip test): ``normalize(f(x) + f(flip(x)))``, raw embeddings summed before the L2 norm.
    Without: ``normalize(f(x))``.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start : start + batch_size])).permute(0, 3, 1, 2)
            x = normalize_images(batch.to(device))
            emb = model(x).float()
            if flip:
                emb = emb + model(torch.flip(x, dims=[3])).float()
            out.append(F.normalize(emb, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def evaluate_pairs(
    model: nn.Module,
    images: Sequence[np.ndarray],
    issame: np.ndarray,
    *,
    n_folds: int = 10,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
):
    """10-fold verification (InsightFace protocol, :func:`facetrain.eval.verification.evaluate`) of ``model`` on
    pairs ``(images[2i], images[2i+1])`` with the flip test."""
    from facetrain.eval.verification import evaluate

    embeddings = embed_images(model, images, batch_size=batch_size, device=device)
    return evaluate(embeddings, np.asarray(issame, dtype=bool), n_folds=n_folds)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint and small helpers


def save_checkpoint(
    path: Path,
    config: Config,
    step: int,
    backbone: nn.Module,
    centres: ClassCentres,
    optimizer: torch.optim.Optimizer,
    num_classes: int,
) -> Path:
    """Write a checkpoint of tensors and primitives only (``weights_only=True`` loads it), atomically."""
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "backbone_name": config.model.backbone,
        "backbone_kwargs": dict(config.model.backbone_kwargs),
        "embedding_size": int(config.model.embedding_size),
        "num_classes": int(num_classes),
        "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "class_centres": centres.weight.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "config": config.to_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


class _TrainView(torch.utils.data.Dataset):
    """Dataset view yielding ``(uint8 (3, H, W) tensor, label)``, randomly mirrored when ``flip``."""

    def __init__(self, dataset, *, flip: bool) -> None:
        self.dataset, self.flip = dataset, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if self.flip and torch.rand(()) < 0.5:
            image = image[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image).transpose(2, 0, 1).copy()), int(label)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; give numpy-based readers/augmentations the same seed.
    np.random.seed(torch.initial_seed() % 2**32)


def _endless(loader):
    while True:
        yield from loader


def _param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
