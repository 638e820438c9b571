"""Resumable distributed sampler and the training DataLoader: partition, reshuffle, exact mid-epoch resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facetrain.data.loader import ResumableDistributedSampler, TrainTransformDataset, build_train_loader
from facetrain.errors import DataError


def _epoch(n, w, *, epoch=0, seed=0, drop_last=True, shuffle=True):
    samplers = [
        ResumableDistributedSampler(n, num_replicas=w, rank=r, seed=seed, drop_last=drop_last, shuffle=shuffle)
        for r in range(w)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), w=st.integers(1, 8), drop_last=st.booleans())
def test_ranks_partition_the_epoch(n, w, drop_last):
    if drop_last and n < w:
        with pytest.raises(DataError):
            ResumableDistributedSampler(n, num_replicas=w, drop_last=True)
        return
    parts = _epoch(n, w, drop_last=drop_last, seed=5)
    per_rank = n // w if drop_last else math.ceil(n / w)
    assert all(len(p) == per_rank for p in parts)
    assert len(ResumableDistributedSampler(n, num_replicas=w, rank=w - 1, drop_last=drop_last)) == per_rank
    flat = [i for p in parts for i in p]
    assert all(0 <= i < n for i in flat)
    if drop_last:
        assert len(set(flat)) == len(flat) == per_rank * w  # disjoint; only n % w dropped
    else:
        assert set(flat) == set(range(n))  # every sample seen
        # Padding rule: the padded tail repeats the first indices of the epoch order.
        order = ResumableDistributedSampler(n, num_replicas=w, drop_last=False, seed=5).epoch_order()
        perm = order[:n]
        assert sorted(perm.tolist()) == list(range(n))
        pad = order[n:]
        np.testing.assert_array_equal(pad, np.tile(perm, w)[: len(pad)])
        for r, part in enumerate(parts):
            assert part == order[r::w].tolist()


def test_set_epoch_reshuffles_deterministically():
    a0, a1 = _epoch(100, 2, epoch=0)[0], _epoch(100, 2, epoch=1)[0]
    assert a0 != a1
    assert _epoch(100, 2, epoch=1)[0] == a1
    assert _epoch(100, 2, epoch=1, seed=1)[0] != a1
    # Same permutation on every rank: the union of an epoch is the full dataset for every epoch.
    for e in range(3):
        assert sorted(sum(_epoch(100, 4, epoch=e), [])) == list(range(100))
    # Independent check of the permutation: torch.randperm seeded with seed + epoch.
    g = torch.Generator().manual_seed(7 + 3)
    expected = torch.randperm(10, generator=g).tolist()
    assert _epoch(10, 1, epoch=3, seed=7)[0] == expected


def test_no_shuffle_keeps_order():
    assert _epoch(10, 3, shuffle=False, drop_last=False) == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 150),
    w=st.integers(1, 6),
    frac=st.floats(0, 1),
    epoch=st.integers(0, 3),
    drop_last=st.booleans(),
)
def test_state_dict_resume_yields_exactly_the_rest(n, w, frac, epoch, drop_last):
    if drop_last and n < w:
        return
    for rank in range(w):
        s = ResumableDistributedSampler(n, num_replicas=w, rank=rank, seed=11, drop_last=drop_last)
        s.set_epoch(epoch)
        full = list(s)
        s.set_epoch(epoch + 1)
        s.set_epoch(epoch)  # a new epoch (from the sampler's point of view) starts at position 0
        p = int(frac * len(full))
        it = iter(s)
        taken = [next(it) for _ in range(p)]
        state = s.state_dict()
        assert state["epoch"] == epoch and state["position"] == p
        fresh = ResumableDistributedSampler(n, num_replicas=w, rank=rank, seed=11, drop_last=drop_last)
        fresh.load_state_dict(state)
        fresh.set_epoch(epoch)  # what a trainer does at the top of the resumed epoch: keeps the position
        rest = list(fresh)
        assert taken + rest == full
        # After the resumed epoch the next one is complete again.
        fresh.set_epoch(epoch + 1)
        assert len(list(fresh)) == len(full)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(8, 120), w_old=st.integers(1, 4), w_new=st.integers(1, 4), frac=st.floats(0, 1))
def test_resume_on_other_world_size_never_repeats(n, w_old, w_new, frac):
    old = [ResumableDistributedSampler(n, num_replicas=w_old, rank=r, seed=2) for r in range(w_old)]
    per = len(old[0])
    p = int(frac * per)
    consumed = []
    for s in old:
        it = iter(s)
        consumed += [next(it) for _ in range(p)]
    state = old[0].state_dict()
    new = [ResumableDistributedSampler(n, num_replicas=w_new, rank=r, seed=2) for r in range(w_new)]
    for s in new:
        s.load_state_dict(state)
    rest = [list(s) for s in new]
    assert len({len(r) for r in rest}) == 1  # still an even split
    flat = consumed + [i for r in rest for i in r]
    assert len(flat) == len(set(flat))  # nothing seen twice in the epoch
    # Lost: only what drop_last cuts, the old world's tail (not consumed yet) is re-split, at most w_new - 1.
    assert len(flat) >= n - (w_new - 1)


def test_rejects_bad_arguments():
    with pytest.raises(DataError, match="rank 2"):
        ResumableDistributedSampler(10, num_replicas=2, rank=2)
    with pytest.raises(DataError, match="empty"):
        ResumableDistributedSampler(0)
    with pytest.raises(DataError, match="not a sampler state"):
        ResumableDistributedSampler(10).load_state_dict({"step": 3})


def test_state_dict_survives_weights_only_torch_load(tmp_path):
    s = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    s.set_epoch(2)
    it = iter(s)
    [next(it) for _ in range(7)]
    torch.save({"sampler": s.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)["sampler"]
    fresh = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    fresh.load_state_dict(state)
    assert list(fresh) == list(it)


# -- dataset wrapper and loader ----------------------------------------------------------------------------------


class _Faces:
    """Image i is filled with value i (mod 256) in channel 0, 255 - i in channel 1, and label i // 4."""

    def __init__(self, n: int, size: int = 16):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = np.zeros((self.size, self.size, 3), np.uint8)
        img[..., 0], img[..., 1] = i % 256, 255 - i % 256
        img[0, 0, 2] = 1  # a corner marker so flips are visible
        return img, i // 4


def test_train_transform_dataset_returns_uint8_chw():
    ds = TrainTransformDataset(_Faces(10), None)
    x, y = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == 1
    assert int(x[0, 3, 3]) == 5 and int(x[1, 3, 3]) == 250 and int(x[2, 0, 0]) == 1
    x, y, i = TrainTransformDataset(_Faces(10), "flip", image_size=16, return_index=True)[(7, 0)]
    assert i == 7 and y == 1 and x.shape == (3, 16, 16)


def test_augmentation_depends_on_seed_epoch_index_only():
    ds = TrainTransformDataset(_Faces(64), "flip", image_size=16, seed=3)
    first = torch.stack([ds[(i, 0)][0] for i in range(64)])
    again = torch.stack([ds[(i, 0)][0] for i in reversed(range(64))]).flip(0)
    assert torch.equal(first, again)
    flipped0 = [bool(ds[(i, 0)][0][2, 0, -1] == 1) for i in range(64)]
    flipped1 = [bool(ds[(i, 1)][0][2, 0, -1] == 1) for i in range(64)]
    assert flipped0 != flipped1 and 16 < sum(flipped0) < 48


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_and_exact_resume(num_workers):
    n, batch = 40, 4

    def run(stop_after=None, state=None):
        sampler = ResumableDistributedSampler(n, num_replicas=2, rank=1, seed=9)
        if state is not None:
            sampler.load_state_dict(state)
        loader = build_train_loader(
            _Faces(n),
            batch_size=batch,
            sampler=sampler,
            num_workers=num_workers,
            augment="flip",
            pin_memory=False,
            seed=5,
            image_size=16,
            return_index=True,
        )
        seen = []
        for epoch in range(sampler.epoch, 2):
            sampler.set_epoch(epoch)
            for images, labels, index in loader:
                assert images.dtype == torch.uint8 and images.shape == (batch, 3, 16, 16)
                assert labels.dtype == torch.int64 and torch.equal(labels, index // 4)
                seen.append((epoch, index.tolist(), images.clone()))
                if stop_after is not None and len(seen) == stop_after:
                    return seen, sampler.state_dict()
        return seen, sampler.state_dict()

    full, _ = run()
    assert len(full) == 2 * (n // 2 // batch)
    head, state = run(stop_after=7)  # mid-epoch 1 (5 batches per epoch)
    assert state == {**state, "epoch": 1, "position": 2 * batch}  # counts delivered batches, not prefetched ones
    tail, _ = run(state=state)
    assert [(e, i) for e, i, _ in head + tail] == [(e, i) for e, i, _ in full]
    for (_, _, a), (_, _, b) in zip(head + tail, full, strict=True):
        assert torch.equal(a, b)  # augmentation identical after the resume


def test_loader_restarts_epoch_when_iterated_again():
    sampler = ResumableDistributedSampler(12, seed=0)
    loader = build_train_loader(_Faces(12), batch_size=5, sampler=sampler, num_workers=0, augment=None)
    first = [b[1].tolist() for b in loader]
    second = [b[1].tolist() for b in loader]
    assert len(first) == 2 and first == second  # same epoch, full again (tail of 2 dropped)
    assert sampler.state_dict()["position"] == 12


def test_loader_default_sampler_and_errors():
    loader = build_train_loader(_Faces(9), batch_size=4, num_workers=0, augment=None, drop_last=False)
    indices = sorted(i for b in loader for i in b[0][:, 0, 1, 1].tolist())
    assert indices == list(range(9))
    with pytest.raises(DataError, match="batch_size"):
        build_train_loader(_Faces(9), batch_size=0)


def test_resume_from_end_of_epoch_yields_nothing_then_next_epoch():
    s = ResumableDistributedSampler(20, num_replicas=2, rank=0, seed=1)
    s.set_epoch(4)
    list(s)
    assert list(s)  # iterated again without a resume: the epoch starts over
    state = s.state_dict()
    fresh = ResumableDistributedSampler(20, num_replicas=2, rank=0, seed=1)
    fresh.load_state_dict(state)
    fresh.set_epoch(4)
    assert list(fresh) == []
    fresh.set_epoch(5)
    assert sorted(list(fresh) + _epoch(20, 2, epoch=5, seed=1)[1]) == list(range(20))
