"""Training data pipeline: resumable distributed sampler, augmenting dataset wrapper, DataLoader builder.

The only torch-dependent modules in ``facetrain.data`` are this one and ``samplers``; import it explicitly
(``from facetrain.data.loader import build_train_loader``).

Workers decode and augment; they ship uint8 CHW tensors (4x less to copy and pin than float32). Normalization
``(x / 255 - 0.5) / 0.5`` happens on the device, in the trainer.

Randomness of augmentation is a pure function of ``(seed, epoch, dataset index)``: the same sample gets the same
augmentation whatever the number of workers, the batch it lands in, or whether the run was resumed mid-epoch.

Typical use::

    sampler = ResumableDistributedSampler(len(dataset), num_replicas=world, rank=rank, seed=cfg_seed)
    loader = build_train_loader(dataset, batch_size=128, sampler=sampler, num_workers=4, augment="strong",
                                pin_memory=True, seed=cfg_seed)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)          # keeps the position when resuming into the same epoch
        for images, labels in loader:     # images: (B, 3, H, W) uint8
            ...
            checkpoint["sampler"] = sampler.state_dict()
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from facetrain.errors import DataError

__all__ = ["ResumableDistributedSampler", "TrainTransformDataset", "build_train_loader"]

log = logging.getLogger(__name__)

Augment = Callable[[np.ndarray], np.ndarray]


class ResumableDistributedSampler(Sampler[int]):
    """Split a dataset evenly across ranks, reshuffle per epoch, and resume exactly in the middle of an epoch.

    Each epoch draws one permutation of ``range(num_samples)`` from ``torch.Generator().manual_seed(seed + epoch)``
    (the identity order when ``shuffle=False``), the same on every rank. It is then cut to a multiple of
    ``num_replicas``:

    - ``drop_last=True``: the last ``num_samples % num_replicas`` indices of the permutation are dropped
      (a different few each epoch); every rank gets ``num_samples // num_replicas``.
    - ``drop_last=False`` (padding rule): the permutation is extended by repeating its own first indices until
      its length is ``ceil(num_samples / num_replicas) * num_replicas``; every sample is seen, at most
      ``num_replicas - 1`` of them twice per epoch.

    Rank ``r`` takes every ``num_replicas``-th index starting at ``r`` (``order[r::num_replicas]``), so the ranks
    partition the epoch and after each rank consumed ``p`` samples, exactly the first ``p * num_replicas`` indices
    of the epoch order have been consumed globally.

    Position: :meth:`state_dict` returns ``{"epoch", "position", "num_replicas"}`` where ``position`` is the number of
    this epoch's samples already consumed on this rank. Iterated through :func:`build_train_loader`, "consumed" means
    handed to the training loop in a batch (not merely prefetched by a worker); iterated directly, it means yielded.
    :meth:`load_state_dict` makes the next iteration yield exactly the remaining indices. Resuming with a different
    ``num_replicas`` skips the first ``position * old_num_replicas`` indices of the epoch's permutation (the globally
    consumed ones) and splits the rest evenly (same drop/pad rule), so no sample of the epoch is seen twice.

    Args:
        num_samples: dataset length N (>= 1).
        num_replicas: number of ranks W (default 1).
        rank: this rank in ``[0, W)``.
        shuffle: draw a new permutation per epoch (default True); False keeps dataset order.
        seed: base seed; must be the same on every rank.
        drop_last: drop the tail so ranks get an even split (True), or pad (False), see above.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        num_samples, num_replicas, rank = int(num_samples), int(num_replicas), int(rank)
        if num_samples < 1:
            raise DataError(f"ResumableDistributedSampler: num_samples must be >= 1, got {num_samples} (empty dataset)")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DataError(f"ResumableDistributedSampler: rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and num_samples < num_replicas:
            raise DataError(
                f"ResumableDistributedSampler: {num_samples} samples cannot be split over {num_replicas} ranks "
                "with drop_last=True; use drop_last=False or a larger dataset"
            )
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        self.position = 0  # samples of this epoch consumed on this rank
        self._skip_global = 0  # globally consumed indices to skip at the start of this epoch (set by a resume)
        self._count_on_yield = True  # build_train_loader switches this off and counts delivered batches instead
        self._just_loaded = False  # load_state_dict was called and no pass started since

    def __len__(self) -> int:
        """Samples per rank per epoch (a full epoch, whatever the position)."""
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return math.ceil(self.num_samples / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation. A new epoch restarts at position 0; the current one keeps its position."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.position, self._skip_global = epoch, 0, 0

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The global index order of an epoch before the split across ranks, cut or padded to a multiple of W.

        Returns:
            (len(self) * num_replicas,) int64 dataset indices.
        """
        return self._global_order(self.epoch if epoch is None else int(epoch), self.num_replicas)

    def remaining_indices(self) -> list[int]:
        """The indices this rank has yet to yield in the current epoch (what the next iteration yields)."""
        if self._skip_global:  # resumed from another world size: split what the permutation has left
            perm = self._permutation(self.epoch)
            rest = self._fit(perm[self._skip_global :], self.num_replicas, source=perm)
            return rest[self.rank :: self.num_replicas][self.position :].tolist()
        order = self._global_order(self.epoch, self.num_replicas)
        return order[self.rank :: self.num_replicas][self.position :].tolist()

    def __iter__(self) -> Iterator[int]:
        # A finished epoch iterated again starts over, unless the state was just loaded (a checkpoint taken at the
        # end of an epoch resumes to an empty remainder, then the trainer moves to the next epoch).
        if self.position >= self._rank_total() and not self._just_loaded:
            self.position, self._skip_global = 0, 0
        self._just_loaded = False
        for index in self.remaining_indices():
            if self._count_on_yield:
                self.position += 1
            yield index

    def advance(self, consumed: int) -> None:
        """Record that ``consumed`` more samples of this epoch reached the training loop (used by the loader)."""
        self.position += int(consumed)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "num_replicas", "skip_global"}``: ints only, safe for ``weights_only`` loading."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_replicas": self.num_replicas,
            "skip_global": self._skip_global,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from :meth:`state_dict`, possibly saved with another ``num_replicas``)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"sampler state {state!r} lacks an int 'epoch' and 'position'; not a sampler state") from e
        old_replicas = int(state.get("num_replicas", self.num_replicas))
        old_skip = int(state.get("skip_global", 0))
        if position < 0 or old_replicas < 1:
            raise DataError(f"sampler state {state!r}: position must be >= 0 and num_replicas >= 1")
        self.epoch, self._just_loaded = epoch, True
        if old_replicas == self.num_replicas:
            self.position, self._skip_global = position, old_skip
        else:
            self.position, self._skip_global = 0, old_skip + position * old_replicas

    # -- helpers -------------------------------------------------------------------------------------------------

    def _rank_total(self) -> int:
        if not self._skip_global:
            return len(self)
        rest = max(self.num_samples - self._skip_global, 0)
        return rest // self.num_replicas if self.drop_last else math.ceil(rest / self.num_replicas)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).numpy().astype(np.int64)

    def _global_order(self, epoch: int, replicas: int) -> np.ndarray:
        perm = self._permutation(epoch)
        return self._fit(perm, replicas, source=perm)

    def _fit(self, order: np.ndarray, replicas: int, *, source: np.ndarray) -> np.ndarray:
        """Cut (drop_last) or pad with ``source``'s first indices to a multiple of ``replicas``."""
        if self.drop_last:
            return order[: len(order) // replicas * replicas]
        target = math.ceil(len(order) / replicas) * replicas
        if target == len(order):
            return order
        reps = math.ceil((target - len(order)) / len(source))
        pad = np.tile(source, reps)[: target - len(order)]
        return np.concatenate([order, pad]).astype(np.int64)


class TrainTransformDataset(Dataset):
    """Wrap a face dataset: decode, augment (uint8 RGB in/out), return a uint8 CHW tensor and the label.

    ``dataset[i]`` must return ``(uint8 HxWx3 RGB, int label)`` (every reader of :func:`facetrain.data.open_dataset`
    does). Item keys may be an int index or ``(index, epoch)`` (what :func:`build_train_loader` feeds); the
    augmentation of a sample is drawn from ``numpy.random.default_rng([seed, epoch, index])`` when the augment
    accepts an ``rng`` keyword (all of :func:`facetrain.data.transforms.build_augment`'s do), so it is reproducible
    across workers and resumes.

    Args:
        dataset: the base dataset.
        augment: callable uint8 HxWx3 -> uint8 HxWx3, a preset name for
            :func:`facetrain.data.transforms.build_augment`, or None (no augmentation).
        seed: augmentation seed (default 0).
        image_size: output side for a preset name (default 112).
        return_index: also return the dataset index (for per-sample targets such as teacher embeddings).

    Returns per item:
        ``(image (3, H, W) uint8 tensor, label int)``, or ``(image, label, index)`` with ``return_index``.
    """

    def __init__(
        self,
        dataset: Any,
        augment: Augment | str | None = None,
        *,
        seed: int = 0,
        image_size: int = 112,
        return_index: bool = False,
    ) -> None:
        if isinstance(augment, str):
            from facetrain.data.transforms import build_augment

            augment = build_augment(augment, image_size=image_size, seed=seed)
        self.dataset, self.augment, self.seed, self.return_index = dataset, augment, int(seed), bool(return_index)
        self.epoch = 0  # used when indexed with a bare int
        self._takes_rng = bool(getattr(augment, "accepts_rng", False)) and bool(getattr(augment, "is_random", True))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        image, label = self.dataset[index]
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(
                f"dataset item {index}: expected a uint8 HxWx3 RGB image, got {image.dtype} {tuple(image.shape)}"
            )
        if self.augment is not None:
            if self._takes_rng:
                image = self.augment(image, rng=np.random.default_rng([self.seed, epoch, index]))
            else:
                image = self.augment(image)
        tensor = torch.from_numpy(_hwc_to_chw(image))
        if self.return_index:
            return tensor, int(label), index
        return tensor, int(label)


def build_train_loader(
    dataset: Any,
    *,
    batch_size: int,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    augment: Augment | str | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    seed: int = 0,
    drop_last: bool = True,
    image_size: int = 112,
    return_index: bool = False,
) -> DataLoader:
    """A training DataLoader over ``dataset`` yielding ``(images (B, 3, H, W) uint8, labels (B,) int64)``.

    Wraps ``dataset`` in :class:`TrainTransformDataset` (unless it already is one). When ``sampler`` is a
    :class:`ResumableDistributedSampler`, its position counts the samples of batches handed to the training loop,
    so ``sampler.state_dict()`` taken after a step resumes exactly at the next batch, workers and prefetching
    notwithstanding. ``sampler=None`` uses ``ResumableDistributedSampler(len(dataset), seed=seed, drop_last=False)``
    (reachable as ``loader.resumable_sampler``; ``loader.sampler`` is an internal epoch-tagging wrapper).

    Args:
        dataset: a face dataset (``open_dataset(...)``) or a :class:`TrainTransformDataset`.
        batch_size: per-rank batch size.
        sampler: index sampler (any torch Sampler; resumable one recommended).
        num_workers: decoding/augmenting worker processes (0 = in the main process).
        augment: preset name, callable, or None (see :class:`TrainTransformDataset`).
        pin_memory: page-locked batches for faster host-to-GPU copies (only useful with CUDA).
        persistent_workers: keep workers alive across epochs (ignored with 0 workers).
        prefetch_factor: batches prefetched per worker (ignored with 0 workers).
        seed: seeds augmentation and the worker RNGs (numpy, random, torch) deterministically.
        drop_last: drop the last incomplete batch.
        image_size: output side when ``augment`` is a preset name.
        return_index: batches are ``(images, labels, indices)``.

    Returns:
        a DataLoader; iterate it once per epoch after ``sampler.set_epoch(epoch)``.
    """
    if batch_size < 1:
        raise DataError(f"build_train_loader: batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise DataError(f"build_train_loader: num_workers must be >= 0, got {num_workers}")
    if not isinstance(dataset, TrainTransformDataset):
        dataset = TrainTransformDataset(dataset, augment, seed=seed, image_size=image_size, return_index=return_index)
    elif augment is not None:
        raise DataError("build_train_loader: the dataset is already a TrainTransformDataset; pass augment=None")
    if sampler is None:
        sampler = ResumableDistributedSampler(len(dataset), seed=seed, drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=bool(persistent_workers), prefetch_factor=int(prefetch_factor))
    return _ResumableLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=_EpochTaggedSampler(sampler),
        num_workers=int(num_workers),
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        drop_last=bool(drop_last),
        generator=generator,
        worker_init_fn=_seed_worker,
        **kwargs,
    )


# -- helpers -----------------------------------------------------------------------------------------------------


class _EpochTaggedSampler(Sampler):
    """Yield ``(index, epoch)`` so workers (which hold copies of the dataset) know the epoch of each sample."""

    def __init__(self, base: Sampler) -> None:
        self.base = base
        self._passes = 0
        if isinstance(base, ResumableDistributedSampler):
            base._count_on_yield = False  # the loader counts delivered batches instead

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = getattr(self.base, "epoch", None)
        if epoch is None:  # a sampler without epochs: count passes so augmentation still differs per pass
            epoch, self._passes = self._passes, self._passes + 1
        for index in self.base:
            yield int(index), int(epoch)


class _ResumableLoader(DataLoader):
    """DataLoader that tells a resumable sampler how many samples each delivered batch consumed."""

    @property
    def resumable_sampler(self) -> Sampler:
        """The user's index sampler (``self.sampler`` is the epoch-tagging wrapper around it)."""
        return self.sampler.base  # type: ignore[attr-defined]

    def __iter__(self):
        base = self.sampler.base  # type: ignore[attr-defined]
        counting = isinstance(base, ResumableDistributedSampler)
        for batch in super().__iter__():
            if counting:
                base.advance(len(batch[1]))
            yield batch
        if counting:  # every batch was delivered (a dropped incomplete tail counts as consumed): epoch finished
            base.position = base._rank_total()


def _hwc_to_chw(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> contiguous (3, H, W); cv2.split deinterleaves ~2x faster than a strided numpy copy."""
    out = np.empty((3, *image.shape[:2]), dtype=image.dtype)
    for c, plane in enumerate(cv2.split(np.ascontiguousarray(image))):
        out[c] = plane
    return out


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from torch's per-worker seed (itself derived from the loader seed)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
