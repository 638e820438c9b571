"""PK sampler: batches of P identities x K images each, for triplet / metric losses.

The only torch-dependent module in ``facetrain.data`` besides the loader; import it explicitly
(``from facetrain.data.samplers import PKSampler``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from facetrain.errors import DataError

__all__ = ["PKSampler"]


class PKSampler(Sampler[int]):
    """Yield dataset indices so every consecutive block of ``P*K`` holds P distinct identities with K images each.

    Each epoch visits the identities in a seeded random order, P at a time (the last incomplete group is dropped),
    so every identity appears at most once per epoch. An identity with at least K images contributes K distinct
    images drawn without replacement; one with fewer contributes all of them plus repeats drawn with replacement.
    The order depends only on (seed, epoch): call :meth:`set_epoch` each epoch, like ``DistributedSampler``.
    Use it with ``DataLoader(dataset, batch_size=P*K, sampler=sampler, drop_last=True)``.

    With ``num_replicas > 1``, batch b goes to rank ``b % num_replicas`` and each rank gets the same number of
    batches (the surplus is dropped), so ranks never see the same batch.

    Args:
        labels: (N,) identity of each dataset index (e.g. ``dataset.labels()``).
        identities_per_batch: P (>= 2 for triplet losses to have negatives).
        images_per_identity: K (>= 2 for triplet losses to have positives).
        seed: base seed shared by all ranks.
        num_replicas: number of ranks (default 1).
        rank: this rank (default 0).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        identities_per_batch: int,
        images_per_identity: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = np.asarray(labels).reshape(-1)
        if labels.size == 0:
            raise DataError("PKSampler: the dataset has no labels (empty dataset)")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"PKSampler: labels must be integers, got dtype {labels.dtype}")
        p, k = int(identities_per_batch), int(images_per_identity)
        if p < 1 or k < 1:
            raise DataError(f"PKSampler: identities_per_batch and images_per_identity must be >= 1, got {p}, {k}")
        if not 0 <= int(rank) < int(num_replicas):
            raise DataError(f"PKSampler: rank {rank} is not in [0, num_replicas={num_replicas})")
        order = np.argsort(labels, kind="stable")
        identities, starts = np.unique(labels[order], return_index=True)
        if len(identities) < p:
            raise DataError(
                f"PKSampler: the dataset has {len(identities)} identities, fewer than identities_per_batch={p}; "
                "lower identities_per_batch"
            )
        self._members = np.split(order, starts[1:])  # dataset indices of each identity, ascending
        self.identities_per_batch, self.images_per_identity = p, k
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        """P*K."""
        return self.identities_per_batch * self.images_per_identity

    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch."""
        return (len(self._members) // self.identities_per_batch) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields next."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        p, k = self.identities_per_batch, self.images_per_identity
        visit = rng.permutation(len(self._members))
        n_batches = self.batches_per_epoch() * self.num_replicas
        for b in range(n_batches):
            group = visit[b * p : (b + 1) * p]
            # draw for every batch on every rank so all ranks consume the generator identically
            picks = [self._draw(rng, self._members[i], k) for i in group]
            if b % self.num_replicas == self.rank:
                for chosen in picks:
                    yield from (int(i) for i in chosen)

    @staticmethod
    def _draw(rng: np.random.Generator, members: np.ndarray, k: int) -> np.ndarray:
        if len(members) >= k:
            return rng.choice(members, size=k, replace=False)
        extra = rng.choice(members, size=k - len(members), replace=True)
        return np.concatenate([rng.permutation(members), extra])
