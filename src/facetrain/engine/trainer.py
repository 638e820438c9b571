"""The training loop: config in, checkpoints + metrics out, on a CPU, one GPU or many (torchrun).

One optimizer step (``train.grad_accum`` micro-steps of ``train.batch_size`` images per rank each):

1. a batch of uint8 faces from :func:`facetrain.data.loader.build_train_loader` (workers augment, the resumable
   distributed sampler splits the epoch over ranks) -> on the device ``(x/255 - 0.5)/0.5``, channels_last;
2. backbone (DDP when there are several ranks; autocast bf16/fp16) -> embeddings ``(B, D)``;
3. :class:`~facetrain.heads.partial_fc.PartialFC`: embeddings of every rank gathered, this rank's class centres
   (positives + ``loss.sample_rate`` of the rest), margin, distributed softmax cross-entropy; plus the optional
   distillation loss against teacher embeddings;
4. backward (loss / grad_accum; DDP ``no_sync`` on all but the last micro-step), GradScaler for fp16, clipping of
   the global gradient norm over every trainable parameter (backbone + all ranks' centres), optimizer step; the
   learning rate follows :func:`facetrain.engine.schedule.lr_multiplier` per optimizer step.

Gradient semantics: the backbone receives the exact gradient of the mean loss over the GLOBAL batch (the embedding
gradient is multiplied by W before DDP's average), so W ranks with batch B train exactly like one process with batch
W*B (tested); arcface_torch's backbone sees that gradient divided by W.

Outputs in ``output.dir``: ``config.yaml`` (resolved config), ``metrics.jsonl`` (train records every
``train.log_every`` steps and eval records), ``checkpoint.pt`` (resumable, see :mod:`facetrain.engine.checkpoint`),
``best.pt`` (best verification score on ``eval.target``), TensorBoard events in ``tb/`` when tensorboard is installed.

Interruptions: SIGINT/SIGTERM finish the current step, write ``checkpoint.pt`` and raise KeyboardInterrupt (exit
code 130 from the CLI); ``--resume auto`` continues exactly. A non-finite loss stops the run before the optimizer
step with :class:`TrainingDiverged`, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetrain.config import Config, save_config
from facetrain.engine import comm
from facetrain.engine import hooks as hooklib
from facetrain.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    capture_rng_state,
    find_resume_checkpoint,
    gather_optimizer_state,
    load_optimizer_state,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from facetrain.engine.schedule import active_stage, apply_lr, lr_multiplier
from facetrain.errors import ConfigError, FacetrainError

logger = logging.getLogger(__name__)

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "train",
    "ClassCentres",
    "margin_loss",
    "embed_images",
    "evaluate_pairs",
    "lr_factor",
    "load_val_sets",
    "normalize_images",
    "clip_global_grad_norm",
]

SYNTHETIC_VAL_OFFSET = 1_000_000  # held-out synthetic identities start here (training uses 0 .. num_identities-1)
BEST_NAME = "best.pt"


class TrainingDiverged(FacetrainError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        steps: optimizer steps done (including those before a resume).
        images_per_sec: training throughput of this process's run, all ranks together (excluding evaluation).
        final_loss: mean loss over the last ``train.log_every`` steps.
        checkpoint_path: the last checkpoint written.
        metrics_path: the JSONL metrics file.
        output_dir: the run folder (also holds ``config.yaml``).
        num_classes: identities in the training data.
        num_images: images in the training data.
        seconds: wall time of the training steps of this process (excluding evaluation and checkpoints).
        evaluations: ``[{"step": int, "<val set>": accuracy, ...}, ...]`` in order (including before a resume).
        completed: False when the run stopped early (``train.stop_after_steps``).
        best_path: ``best.pt`` when a verification score was recorded, else None.
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
    completed: bool = True
    best_path: Path | None = None


def train(
    config: Config,
    *,
    resume: str | None = None,
    evaluate_at_start: bool = False,
    progress: bool | None = None,
    extra_hooks: Sequence[hooklib.HookBase] = (),
) -> TrainResult:
    """Train a backbone + Partial FC class centres with a margin softmax loss, as ``config`` says.

    Under ``torchrun`` every rank calls this; the process group is initialized from the environment.

    Args:
        config: a validated run config (:func:`facetrain.config.load_config`).
        resume: None (fresh run), ``"auto"`` (``output.dir/checkpoint.pt`` if present) or a checkpoint path.
        evaluate_at_start: also run verification before the first step (step 0) of a fresh run.
        progress: show a tqdm bar on rank 0; None = only when stderr is a terminal.
        extra_hooks: more hooks, called after the built-in ones.

    Returns:
        TrainResult.

    Raises:
        TrainingDiverged: non-finite loss.
        KeyboardInterrupt: SIGINT/SIGTERM, after writing a resumable checkpoint.
    """
    return Trainer(
        config, resume=resume, evaluate_at_start=evaluate_at_start, progress=progress, extra_hooks=extra_hooks
    ).train()


class Trainer:
    """Builds everything from the config in ``__init__`` (restoring a checkpoint when resuming); :meth:`train` runs
    the loop with its hooks. Attributes read by hooks: ``step``, ``total_steps``, ``config``, ``is_main``,
    ``completed``, ``resumed_step``, ``last_loss``, ``current_lr``, ``images_per_sec``, ``raw_backbone``, ``device``,
    ``embedding_size``."""

    def __init__(
        self,
        config: Config,
        *,
        resume: str | None = None,
        evaluate_at_start: bool = False,
        progress: bool | None = None,
        extra_hooks: Sequence[hooklib.HookBase] = (),
    ) -> None:
        self.config = config
        comm.init_distributed_from_env()
        self.world_size, self.rank = comm.get_world_size(), comm.get_rank()
        self.is_main = self.rank == 0
        self.device = _rank_device(resolve_device(config.train.device))
        self.out_dir = Path(config.output.dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.metrics_path = self.out_dir / "metrics.jsonl"
        found = find_resume_checkpoint(resume, self.out_dir)
        if found is not None and not found.is_file():
            raise FacetrainError(f"--resume {resume}: {found} does not exist; pass a checkpoint.pt or auto")
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.out_dir / "config.yaml")
        _seed_everything(config.train.seed)
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()
        self._was_cudnn_benchmark = torch.backends.cudnn.benchmark
        if config.train.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: cuDNN times its algorithms once, keeps the best

        # Data: the sampler splits each epoch over the ranks and knows how far this epoch got (resume).
        from facetrain.data.loader import ResumableDistributedSampler, build_train_loader

        self.dataset = build_dataset(config)
        self.num_classes = int(self.dataset.num_classes)
        self.sampler = ResumableDistributedSampler(
            len(self.dataset), num_replicas=self.world_size, rank=self.rank, seed=config.train.seed, drop_last=True
        )
        self.batch_size = min(config.train.batch_size, len(self.sampler))
        self.distill_weight = float(config.loss.distill.weight)
        workers = config.data.num_workers
        self.loader = build_train_loader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            augment=None if config.data.augment == "none" else config.data.augment,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            seed=config.train.seed,
            image_size=config.data.image_size,
            return_index=self.distill_weight > 0,
        )
        self.accum = config.train.grad_accum
        self.steps_per_epoch = max(1, len(self.sampler) // self.batch_size // self.accum)
        self.total_steps = config.train.max_steps or config.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(config.schedule.warmup_epochs * self.steps_per_epoch))
        self.stages = [dict(stage) for stage in config.schedule.stages]
        self.freeze_backbone_steps = config.train.freeze_backbone_steps
        self.stop_after_steps = config.train.stop_after_steps
        active_stage(0, self.stages)  # validates until_step order

        # Model: backbone (DDP-wrapped on several ranks), Partial FC head, optional distillation projection.
        self.raw_backbone = build_model(config).to(self.device)
        self.embedding_size = config.model.embedding_size
        from facetrain.heads.partial_fc import PartialFC

        self.head = PartialFC(
            config.model.embedding_size,
            self.num_classes,
            margin=build_loss_margin(config, shared_rows=True),
            sample_rate=config.loss.sample_rate,
            subcenter_k=config.loss.subcenter_k,
            sharding=config.loss.sharding,
            seed=config.train.seed,
        ).to(self.device)
        self.margin_base = {k: getattr(self.head.margin, k) for k in _STAGE_LOSS_KEYS if hasattr(self.head.margin, k)}
        self.distill, self.teacher = build_distillation(config, len(self.dataset))
        if self.distill is not None:
            self.distill.to(self.device)
        self.optimizer = build_optimizer(config, self.raw_backbone, self.head, self.distill)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.amp_dtype = resolve_amp(config.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.backbone: nn.Module = self.raw_backbone
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # BN statistics stay per rank between checkpoints (rank 0's are saved), as arcface_torch does.
            params = inspect.signature(DistributedDataParallel).parameters
            key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
            self.backbone = DistributedDataParallel(self.raw_backbone, device_ids=ids, **{key: False})
        if config.train.compile:
            self.backbone = torch.compile(self.backbone)

        # Hooks: metrics writers and bar on rank 0; verification and checkpoints on every rank (collectives).
        self.val_sets = load_val_sets(config)
        self.verification = hooklib.Verification(
            self.val_sets,
            every_steps=config.eval.every_steps,
            n_folds=config.eval.n_folds,
            batch_size=config.eval.batch_size,
            at_start=evaluate_at_start,
        )
        self.best = hooklib.BestCheckpoint(self.out_dir / BEST_NAME, target=config.eval.target)
        # Metric writers come first (open before anything emits) and get after_train last (the final evaluation in
        # Verification.after_train still reaches them). TensorBoard: one info line when the package is missing.
        self.writers: list[hooklib.HookBase] = []
        if self.is_main:
            self.writers += [hooklib.JSONLWriter(self.metrics_path), hooklib.TensorBoardWriter(self.out_dir / "tb")]
        self.hooks: list[hooklib.HookBase] = [
            *self.writers,
            hooklib.ProgressBar(progress),
            self.verification,
            self.best,
            hooklib.PeriodicCheckpoint(self.checkpoint_path, config.output.save_every_steps),
            *extra_hooks,
        ]

        self.step = 0
        self.completed = False
        self.resumed_step: int | None = None
        self.images_seen = 0
        self.train_seconds = 0.0
        self.last_loss = float("nan")
        self.recent_losses: list[float] = []
        self.current_lr = self.base_lrs[0]
        self.last_checkpoint: tuple[Path, int] | None = None
        self._stop_requested = False
        self._stage: int | None = -1
        if found is not None:
            self.load_checkpoint(found)
        elif config.model.init_from:
            init_backbone_from(self.raw_backbone, config)
        self._run_start = (self.images_seen, self.train_seconds)

    # -----------------------------------------------------------------------------------------------------------------
    # The loop

    @property
    def images_per_sec(self) -> float:
        images, seconds = self.images_seen - self._run_start[0], self.train_seconds - self._run_start[1]
        return images / seconds if seconds > 0 else 0.0

    def train(self) -> TrainResult:
        """Run from ``self.step`` to the end (or to ``train.stop_after_steps``); see :func:`train`."""
        logger_info = logger.info if self.is_main else logger.debug
        logger_info(
            "training %s on %d images / %d identities, steps %d -> %d (%d per epoch), %d rank(s) on %s",
            self.config.model.backbone,
            len(self.dataset),
            self.num_classes,
            self.step,
            self.total_steps,
            self.steps_per_epoch,
            self.world_size,
            self.device,
        )
        stop_after, first_step = self.stop_after_steps, self.step
        batches = self._batches()
        self.raw_backbone.train()
        self.head.train()
        with _StopSignals(self):
            try:
                for hook in self.hooks:
                    hook.before_train(self)
                while self.step < self.total_steps:
                    started = time.perf_counter()
                    self.run_step(batches)
                    self.step += 1
                    self.train_seconds += time.perf_counter() - started
                    self._log_step()
                    for hook in self.hooks:
                        hook.after_step(self)
                    if self._stop_requested:
                        path = self.save_checkpoint(self.checkpoint_path)
                        logger.warning("interrupted at step %d; resumable checkpoint: %s", self.step, path)
                        raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint {path}")
                    if stop_after and self.step - first_step >= stop_after and self.step < self.total_steps:
                        break
                else:
                    self.completed = True
                self.save_checkpoint(self.checkpoint_path)
            finally:
                for hook in [*(h for h in self.hooks if h not in self.writers), *self.writers]:
                    try:
                        hook.after_train(self)
                    except Exception:  # an after_train failure must not hide the loop's own error
                        logger.exception("hook %s failed in after_train", type(hook).__name__)
                        if self.completed:
                            raise
                torch.use_deterministic_algorithms(self._was_deterministic)
                torch.backends.cudnn.benchmark = self._was_cudnn_benchmark
        comm.barrier()
        return TrainResult(
            steps=self.step,
            images_per_sec=self.images_per_sec,
            final_loss=float(np.mean(self.recent_losses)) if self.recent_losses else float("nan"),
            checkpoint_path=self.checkpoint_path,
            metrics_path=self.metrics_path,
            output_dir=self.out_dir,
            num_classes=self.num_classes,
            num_images=len(self.dataset),
            seconds=self.train_seconds - self._run_start[1],
            evaluations=[dict(r) for r in self.verification.history],
            completed=self.completed,
            best_path=self.best.path if self.best.best_step >= 0 else None,
        )

    def run_step(self, batches: Iterator) -> None:
        """One optimizer step: ``grad_accum`` forward/backward passes, clipping, optimizer and scaler step."""
        self._apply_stage()
        multiplier = lr_multiplier(
            self.step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            name=self.config.schedule.name,
            power=self.config.schedule.power,
            milestones=[m * self.steps_per_epoch for m in self.config.schedule.milestones],
            gamma=self.config.schedule.gamma,
        )
        apply_lr(self.optimizer, self.base_lrs, multiplier * self._stage_value("lr_scale", 1.0))
        self.current_lr = self.optimizer.param_groups[0]["lr"]
        frozen = self.step < self.freeze_backbone_steps or bool(self._stage_value("freeze_backbone", False))
        self.raw_backbone.train(not frozen)
        late_zero = self.device.type == "cpu"
        if not late_zero:
            self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(self.accum):
            batch = next(batches)
            sync = self.world_size == 1 or micro == self.accum - 1 or frozen
            context = contextlib.nullcontext() if sync else self.backbone.no_sync()
            with context:
                loss = self.forward_loss(batch, frozen=frozen)
                if late_zero and micro == 0:
                    # On CPU, drop last step's gradients only after the first forward (nothing before the first
                    # backward reads them): freed before it, glibc hands their heap back to the OS and the forward's
                    # activations fault it in again (~2-4x the page faults per step, most of the Trainer's gap to a
                    # bare loop in benchmarks/bench_train.py). GPUs free them first: lower peak memory, and the
                    # caching allocator has no such cost.
                    self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach().double() / self.accum
            self.images_seen += self.batch_size * self.world_size
        flags = torch.tensor(
            [0.0 if torch.isfinite(loss_sum) else 1.0, float(self._stop_requested)], device=self.device
        )
        flags = comm.all_reduce_max(flags)
        self._stop_requested = bool(flags[1] > 0)
        if flags[0] > 0:
            raise TrainingDiverged(self._divergence_message(float(loss_sum)))
        self.last_loss = float(loss_sum)
        self.scaler.unscale_(self.optimizer)
        if self.distill is not None and self.world_size > 1:
            for p in self.distill.parameters():  # not inside DDP: average its gradient by hand
                if p.grad is not None:
                    p.grad.copy_(comm.all_reduce_sum(p.grad) / self.world_size)
        if self.config.optim.clip_grad_norm:
            replicated = [*self.raw_backbone.parameters(), *(self.distill.parameters() if self.distill else ())]
            clip_global_grad_norm(replicated, [self.head.weight], self.config.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def forward_loss(self, batch, *, frozen: bool = False) -> torch.Tensor:
        """Loss of one micro-batch ``(uint8 images (B, 3, H, W), labels (B,)[, dataset indices (B,)])``."""
        images, labels = batch[0], batch[1]
        images = normalize_images(images.to(self.device, non_blocking=True))
        if self.config.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        autocast = torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )
        with autocast, torch.no_grad() if frozen else contextlib.nullcontext():
            embeddings = self.backbone(images)
        embeddings = embeddings.float()
        pfc_input = _ScaleGrad.apply(embeddings, float(self.world_size)) if self.world_size > 1 else embeddings
        loss = self.head(pfc_input, labels).loss
        if self.distill is not None:
            indices = batch[2].numpy()
            teacher = torch.from_numpy(np.asarray(self.teacher[indices], dtype=np.float32)).to(self.device)
            loss = loss + self.distill_weight * self.distill(embeddings, teacher)
        return loss

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write a resumable, world-size independent checkpoint (collective: every rank calls it)."""
        path = Path(path)
        head_state = self.head.full_state_dict(dst=0)
        optimizer_state = gather_optimizer_state(self.optimizer, self.head)
        rng_states = comm.all_gather_object(capture_rng_state())
        if self.is_main:
            config = self.config
            state: dict[str, Any] = {
                "format": CHECKPOINT_FORMAT,
                "step": int(self.step),
                "backbone_name": config.model.backbone,
                "backbone_kwargs": dict(config.model.backbone_kwargs),
                "embedding_size": int(config.model.embedding_size),
                "num_classes": int(self.num_classes),
                "subcenter_k": int(config.loss.subcenter_k),
                "backbone": {k: v.detach().cpu() for k, v in self.raw_backbone.state_dict().items()},
                "class_centres": head_state["weight"],
                "margin": head_state["margin"],
                "head_sample_step": int(head_state["sample_step"]),
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict(),
                "data": {"sampler": self.sampler.state_dict()},
                "rng": rng_states,
                "world_size": int(self.world_size),
                "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if h.state_dict()},
                "distill": {k: v.detach().cpu() for k, v in self.distill.state_dict().items()} if self.distill else {},
                "progress": {"images_seen": int(self.images_seen), "train_seconds": float(self.train_seconds)},
                "config": config.to_dict(),
            }
            write_checkpoint(path, state)
        comm.barrier()
        if path.name == CHECKPOINT_NAME:
            self.last_checkpoint = (path, self.step)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (checkpoint of any world size)."""
        state = read_checkpoint(path)
        for key, mine in (
            ("num_classes", self.num_classes),
            ("embedding_size", self.embedding_size),
            ("subcenter_k", self.config.loss.subcenter_k),
        ):
            if int(state[key]) != int(mine):
                raise ConfigError(
                    f"{path}: checkpoint has {key}={state[key]} but this run has {mine}; resume the same run"
                )
        if state["backbone_name"] != self.config.model.backbone:
            raise ConfigError(
                f"{path}: checkpoint backbone {state['backbone_name']!r} differs from model.backbone "
                f"{self.config.model.backbone!r}"
            )
        self.raw_backbone.load_state_dict(state["backbone"])
        self.head.load_full_state_dict(
            {"weight": state["class_centres"], "margin": state["margin"], "sample_step": state["head_sample_step"]}
        )
        load_optimizer_state(self.optimizer, self.head, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.distill is not None and state.get("distill"):
            self.distill.load_state_dict(state["distill"])
        self.sampler.load_state_dict(state["data"]["sampler"])
        hook_states = state.get("hooks", {})
        for hook in self.hooks:
            if type(hook).__name__ in hook_states:
                hook.load_state_dict(hook_states[type(hook).__name__])
        self.step = self.resumed_step = int(state["step"])
        self.images_seen = int(state["progress"]["images_seen"])
        self.train_seconds = float(state["progress"]["train_seconds"])
        self.last_checkpoint = (path, self.step)
        rng = state["rng"]
        if int(state["world_size"]) == self.world_size:
            restore_rng_state(rng[self.rank])
        else:  # other rank count: data order continues (sampler); repeatable streams derived from (seed, step, rank)
            _seed_everything(self.config.train.seed + 7919 * self.step + self.rank)
        if self.is_main:
            logger.info("resumed from %s at step %d (written by %d rank(s))", path, self.step, state["world_size"])

    # -----------------------------------------------------------------------------------------------------------------
    # Helpers used by the loop and the hooks

    def emit(self, record: dict[str, Any]) -> None:
        """Send a metrics record to every writer hook."""
        for hook in self.hooks:
            hook.write(record)

    def on_evaluation(self, record: dict[str, float]) -> None:
        """Called by the verification hook with each result (the best-model hook listens)."""
        self.best.on_evaluation(self, record)

    def _batches(self) -> Iterator:
        """Endless batches, epoch after epoch, starting where the sampler's state says."""
        epoch = self.sampler.epoch
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def _log_step(self) -> None:
        self.recent_losses = (self.recent_losses + [self.last_loss])[-self.config.train.log_every :]
        if self.step % self.config.train.log_every == 0 or self.step == self.total_steps:
            self.emit(
                {
                    "kind": "train",
                    "step": self.step,
                    "epoch": self.step / self.steps_per_epoch,
                    "loss": float(np.mean(self.recent_losses)),
                    "lr": self.current_lr,
                    "images_per_sec": self.images_per_sec,
                }
            )

    def _divergence_message(self, value: float) -> str:
        where = (
            f"last good checkpoint: {self.last_checkpoint[0]} (step {self.last_checkpoint[1]}); resume it with "
            "--resume after lowering optim.lr or enabling optim.clip_grad_norm"
            if self.last_checkpoint
            else "no checkpoint was written yet (set output.save_every_steps)"
        )
        return f"loss became {value} at step {self.step + 1} of {self.total_steps}; training stopped; {where}"

    def _apply_stage(self) -> None:
        stage = active_stage(self.step, self.stages)
        if stage == self._stage:
            return
        self._stage = stage
        values = dict(self.margin_base)
        if stage is not None:
            for key, value in dict(self.stages[stage].get("loss") or {}).items():
                if value is None:
                    continue
                if key not in self.margin_base:
                    raise ConfigError(
                        f"schedule.stages[{stage}].loss.{key}: the {self.config.loss.margin} margin has no such "
                        f"setting; known: {', '.join(sorted(self.margin_base))}"
                    )
                values[key] = float(value)
        for key, value in values.items():
            setattr(self.head.margin, key, value)
        if self.is_main and self.stages:
            logger.info("step %d: stage %s, margin %s", self.step, stage, values)

    def _stage_value(self, key: str, default: Any) -> Any:
        if self._stage is None or self._stage < 0:
            return default
        value = self.stages[self._stage].get(key)
        return default if value is None else value


_STAGE_LOSS_KEYS = ("scale", "angular_margin", "additive_margin", "multiplicative_margin")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (W, to undo DDP's average)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class _StopSignals:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step (a second SIGINT raises at once)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.trainer._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer._stop_requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank uses ``cuda:LOCAL_RANK`` (a plain ``cuda`` device means "this rank's GPU")."""
    if device.type == "cuda" and comm.get_world_size() > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
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


def build_model(config: Config) -> nn.Module:
    """The backbone from the model registry, ``(B, 3, H, W) -> (B, D)`` (channels_last when configured)."""
    from facetrain.models import build_backbone

    kwargs = dict(config.model.backbone_kwargs)
    if config.model.dropout:
        kwargs.setdefault("dropout", config.model.dropout)
    if config.model.gradient_checkpointing:
        kwargs.setdefault("gradient_checkpointing", True)
    model = build_backbone(config.model.backbone, embedding_size=config.model.embedding_size, **kwargs)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def init_backbone_from(backbone: nn.Module, config: Config) -> None:
    """Fine-tuning: copy ``model.init_from``'s backbone weights (a facetrain checkpoint or arcface_torch's
    ``backbone.pth``) into ``backbone``; the class centres stay new (new data, new classes)."""
    from facetrain.models import load_backbone

    source = load_backbone(
        config.model.init_from,
        name=config.model.backbone,
        embedding_size=config.model.embedding_size,
        **config.model.backbone_kwargs,
    )
    with torch.no_grad():
        backbone.load_state_dict(source.state_dict())
    logger.info("backbone initialized from %s", config.model.init_from)


def build_loss_margin(config: Config, *, shared_rows: bool = False) -> nn.Module:
    """The margin from :func:`facetrain.heads.margins.build_margin`; the m1/m2/m3 fields go to every method, which
    accepts the ones it lacks only at their neutral value (so a setting is never ignored silently).

    Args:
        config: run config (``loss`` section).
        shared_rows: the margin sees the same rows on every rank (Partial FC's global batch); CurricularFace needs
            to know to stay exact on several ranks.
    """
    from facetrain.heads.margins import build_margin

    loss = config.loss
    extra = dict(loss.margin_kwargs)
    if shared_rows and loss.margin == "curricularface":
        extra.setdefault("shared_rows", True)
    return build_margin(
        loss.margin,
        subcenter_k=loss.subcenter_k,
        interclass_filtering_threshold=loss.interclass_filtering_threshold,
        scale=loss.scale,
        multiplicative_margin=loss.multiplicative_margin,
        angular_margin=loss.angular_margin,
        additive_margin=loss.additive_margin,
        exact_gradient=loss.exact_gradient,
        **extra,
    )


def build_optimizer(
    config: Config, backbone: nn.Module, head: nn.Module, distill: nn.Module | None = None
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; groups: backbone (norm/bias without decay if ``optim.no_decay_norm_bias``), class
    centres, distillation projection. The centres' optimizer state lives with this rank's shard."""
    opt = config.optim
    groups = _param_groups(backbone, opt.weight_decay, opt.no_decay_norm_bias)
    groups.append({"params": list(head.parameters()), "weight_decay": opt.weight_decay})
    if distill is not None and list(distill.parameters()):
        groups.append({"params": list(distill.parameters()), "weight_decay": opt.weight_decay})
    groups = [g for g in groups if g["params"]]
    fused = {"fused": True} if next(backbone.parameters()).device.type == "cuda" else {}
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, **fused)
    return torch.optim.AdamW(groups, lr=opt.lr, **fused)


def build_distillation(config: Config, num_images: int) -> tuple[nn.Module | None, np.ndarray | None]:
    """``loss.distill.*``: the distillation loss module and the teacher embeddings ``(N, D_t)`` (memory-mapped), or
    ``(None, None)`` when ``loss.distill.weight`` is 0.

    Raises:
        ConfigError: missing file, or a file that does not match the training data.
    """
    weight = float(config.loss.distill.weight)
    if weight <= 0:
        return None, None
    path = config.loss.distill.embeddings
    if not path or not Path(path).is_file():
        raise ConfigError(
            f"loss.distill.embeddings: {path!r} is not a file; write one with `facetrain distill-dataset` or set "
            "loss.distill.weight=0"
        )
    teacher = np.load(path, mmap_mode="r")
    if teacher.ndim != 2 or teacher.shape[0] != num_images:
        raise ConfigError(
            f"loss.distill.embeddings: {path} has shape {teacher.shape}, expected ({num_images}, D): one row per "
            "training image in dataset index order"
        )
    sidecar = Path(path).with_suffix(".json")
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if int(meta.get("num_images", num_images)) != num_images:
            raise ConfigError(
                f"loss.distill.embeddings: {sidecar} says {meta['num_images']} images, data has {num_images}"
            )
    from facetrain.heads.distill import build_distill_loss

    kind = config.loss.distill.kind
    module = build_distill_loss(kind, student_dim=config.model.embedding_size, teacher_dim=int(teacher.shape[1]))
    return module, teacher


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


def clip_global_grad_norm(
    replicated: Sequence[nn.Parameter], sharded: Sequence[nn.Parameter], max_norm: float
) -> torch.Tensor:
    """Scale every gradient so the norm over ALL trainable parameters is at most ``max_norm``.

    ``replicated`` parameters have the same gradient on every rank (the DDP backbone); ``sharded`` ones hold a
    different part on each rank (Partial FC centres), so their squared norm is summed over ranks. Total norm
    ``sqrt(sum |g|^2)``; factor ``min(1, max_norm / (norm + 1e-6))`` (as ``torch.nn.utils.clip_grad_norm_``).

    Returns:
        The total norm before clipping (a 0-dim float32 tensor).
    """
    rep = [p.grad for p in replicated if p.grad is not None]
    shard = [p.grad for p in sharded if p.grad is not None]
    device = (rep or shard)[0].device if (rep or shard) else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if rep:
        squares = squares + torch.stack([torch.linalg.vector_norm(g.float()) for g in rep]).square().sum()
    shard_sq = torch.zeros((), dtype=torch.float32, device=device)
    if shard:
        shard_sq = torch.stack([torch.linalg.vector_norm(g.float()) for g in shard]).square().sum()
    total = (squares + comm.all_reduce_sum(shard_sq)).sqrt()
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in rep + shard:
        g.mul_(factor.to(g.dtype))
    return total


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of a step (also used on their own: tests, the demo, evaluation)


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
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) for ``config.schedule`` (milestones in epochs);
    see :func:`facetrain.engine.schedule.lr_multiplier`."""
    sched = config.schedule
    return lr_multiplier(
        step,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        name=sched.name,
        power=sched.power,
        milestones=[m * steps_per_epoch for m in sched.milestones],
        gamma=sched.gamma,
    )


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
