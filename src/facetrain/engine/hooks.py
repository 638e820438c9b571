"""Trainer hooks (detectron2-style): ``before_train``, ``after_step``, ``after_train`` (called in a ``finally``).

Each hook may keep state (``state_dict`` / ``load_state_dict``) that the trainer saves in the checkpoint, so a resumed
run continues its verification history, best score and metric averages. Hooks that write metrics receive every
record the trainer emits (``write(record)``): one metrics store, several writers (JSONL always, TensorBoard when
installed, the tqdm bar). Only rank 0 writes files or shows a bar; verification runs on every rank (each embeds a
slice of the images). The trainer calls ``before_train`` and ``after_step`` in order, and ``after_train`` in order
with the metric writers last, so the final evaluation (made in :class:`Verification`'s ``after_train``) reaches them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from facetrain.engine.trainer import Trainer

__all__ = [
    "HookBase",
    "JSONLWriter",
    "TensorBoardWriter",
    "ProgressBar",
    "Verification",
    "BestCheckpoint",
    "PeriodicCheckpoint",
]

logger = logging.getLogger(__name__)


class HookBase:
    """A hook; every method is optional. ``trainer`` exposes ``step``, ``total_steps``, ``config``, ``is_main``,
    ``completed`` (the loop ran to the end), ``emit(record)`` and ``save_checkpoint(path)``."""

    def before_train(self, trainer: Trainer) -> None:
        """Called once before the first step (after a resume restored the state)."""

    def after_step(self, trainer: Trainer) -> None:
        """Called after every optimizer step; ``trainer.step`` is the number of steps done."""

    def after_train(self, trainer: Trainer) -> None:
        """Called once at the end, also after an error or an interrupt (``trainer.completed`` says which)."""

    def write(self, record: dict[str, Any]) -> None:
        """Receive a metrics record (``{"kind": "train" | "eval", "step": int, ...}``)."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (primitives and tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class JSONLWriter(HookBase):
    """Append every record as one JSON line to ``path`` (rank 0). A fresh run truncates the file; a resumed run
    drops lines past the resumed step so the file reads as one uninterrupted run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        kept = []
        if trainer.resumed_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by kill -9
                if record.get("step", 0) <= trainer.resumed_step:
                    kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class TensorBoardWriter(HookBase):
    """Scalars to TensorBoard (``torch.utils.tensorboard``), tag ``"<kind>/<key>"`` (``train/loss``, ``train/lr``,
    ``train/images_per_sec``, ``train/epoch``, ``eval/<val set>``) at the record's step.

    Without the ``tensorboard`` package (``pip install facetrain[tensorboard]``) the hook logs one info line and does
    nothing. Like :class:`JSONLWriter`, the log reads as one uninterrupted run: a fresh run hides the events an earlier
    run left in ``log_dir`` and a resumed run hides those past the resumed step (TensorBoard's ``purge_step``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None

    @staticmethod
    def available() -> bool:
        """Whether the ``tensorboard`` package is installed."""
        import importlib.util

        return importlib.util.find_spec("tensorboard") is not None

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        try:
            if not self.available():
                raise ImportError("No module named 'tensorboard'")
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            logger.info("no TensorBoard events (%s); pip install tensorboard to get them in %s", exc, self.log_dir)
            return
        # purge_step P hides earlier events with step >= P: everything on a fresh run, what follows the checkpoint's
        # step on a resume (its own records at that step were written before the checkpoint and are kept).
        purge = 0 if trainer.resumed_step is None else trainer.resumed_step + 1
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def after_train(self, trainer: Trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ProgressBar(HookBase):
    """tqdm bar with img/s, loss, lr and ETA (rank 0; disabled when stderr is not a terminal unless forced)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = enabled
        self._bar = None

    def before_train(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        show = sys.stderr.isatty() if self.enabled is None else self.enabled
        self._bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.step,
            disable=not (show and trainer.is_main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    def after_step(self, trainer: Trainer) -> None:
        if self._bar.disable:  # hidden bar: skip formatting the postfix every step
            return
        self._bar.update(1)
        self._bar.set_postfix(
            loss=f"{trainer.last_loss:.3f}", lr=f"{trainer.current_lr:.3g}", img_s=f"{trainer.images_per_sec:.0f}"
        )

    def after_train(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()


class Verification(HookBase):
    """10-fold verification on ``.bin`` pairs every ``every_steps`` steps and at the end.

    The images are split in contiguous slices over the ranks; each embeds its slice (flip test) and the embeddings
    are all-gathered, so every rank computes the same accuracy (the best-model hook needs it everywhere).

    Args:
        val_sets: name -> (list of uint8 HxWx3 RGB images, (N_pairs,) bool issame).
        every_steps: evaluate every this many steps (0 = only at the end).
        n_folds: cross-validation folds.
        batch_size: images per forward pass.
        at_start: also evaluate before the first step (step 0) of a fresh run.
    """

    def __init__(
        self, val_sets: dict, *, every_steps: int, n_folds: int = 10, batch_size: int = 256, at_start: bool = False
    ) -> None:
        self.val_sets = val_sets
        self.every_steps = int(every_steps)
        self.n_folds = int(n_folds)
        self.batch_size = int(batch_size)
        self.at_start = at_start
        self.history: list[dict[str, float]] = []

    def before_train(self, trainer: Trainer) -> None:
        if self.at_start and trainer.step == 0:
            self.evaluate(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if self.every_steps and trainer.step % self.every_steps == 0 and trainer.step < trainer.total_steps:
            self.evaluate(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.completed and (not self.history or self.history[-1]["step"] != trainer.step):
            self.evaluate(trainer)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Evaluate every val set now; emits an ``eval`` record and returns it."""
        from facetrain.engine import comm
        from facetrain.eval.verification import evaluate

        if not self.val_sets:
            return {}
        record: dict[str, float] = {"step": trainer.step}
        for name, (images, issame) in self.val_sets.items():
            embeddings = embed_sharded(trainer, images, self.batch_size, comm)
            result = evaluate(embeddings, np.asarray(issame, dtype=bool), n_folds=self.n_folds)
            record[name] = float(result.accuracy_mean)
            if trainer.is_main:
                logger.info(
                    "step %d: %s verification accuracy %.4f +- %.4f",
                    trainer.step,
                    name,
                    result.accuracy_mean,
                    result.accuracy_std,
                )
        self.history.append(record)
        trainer.emit({"kind": "eval", **record})
        trainer.on_evaluation(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state.get("history", [])]


def embed_sharded(trainer: Trainer, images, batch_size: int, comm) -> np.ndarray:
    """(N, D) flip-test embeddings of ``images``: this rank embeds its contiguous slice, then all-gather."""
    import torch

    from facetrain.engine.trainer import embed_images

    world, rank = comm.get_world_size(), comm.get_rank()
    bounds = np.linspace(0, len(images), world + 1).astype(int)
    mine = images[bounds[rank] : bounds[rank + 1]]
    model = trainer.raw_backbone
    if len(mine):
        local = embed_images(model, mine, batch_size=batch_size, device=trainer.device)
    else:
        local = np.zeros((0, trainer.embedding_size), dtype=np.float32)
    if world == 1:
        return local
    tensor = torch.from_numpy(local).to(trainer.device)
    sizes = [int(bounds[r + 1] - bounds[r]) for r in range(world)]
    return comm.all_gather_tensor(tensor, sizes=sizes).cpu().numpy()


class BestCheckpoint(HookBase):
    """Save ``best.pt`` whenever the target val set's accuracy beats the best so far.

    Args:
        path: where the best checkpoint goes.
        target: val set name (None = the first one evaluated).
    """

    def __init__(self, path: str | Path, target: str | None = None) -> None:
        self.path = Path(path)
        self.target = target
        self.best: float = -math.inf
        self.best_step: int = -1

    def on_evaluation(self, trainer: Trainer, record: dict[str, float]) -> None:
        names = [k for k in record if k != "step"]
        if not names:
            return
        target = self.target or names[0]
        if target not in record:
            from facetrain.errors import ConfigError, closest

            hint = closest(target, names)
            raise ConfigError(
                f"eval.target: no val set named {target!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; evaluated: {', '.join(names)}"
            )
        if record[target] > self.best:
            self.best, self.best_step = float(record[target]), int(record["step"])
            trainer.save_checkpoint(self.path)
            if trainer.is_main:
                logger.info("step %d: new best %s %.4f -> %s", trainer.step, target, self.best, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", -math.inf))
        self.best_step = int(state.get("best_step", -1))


class PeriodicCheckpoint(HookBase):
    """Write the resumable checkpoint every ``every_steps`` optimizer steps (the trainer writes the final one)."""

    def __init__(self, path: str | Path, every_steps: int) -> None:
        self.path = Path(path)
        self.every_steps = int(every_steps)

    def after_step(self, trainer: Trainer) -> None:
        if self.every_steps and trainer.step % self.every_steps == 0 and trainer.step < trainer.total_steps:
            trainer.save_checkpoint(self.path)
