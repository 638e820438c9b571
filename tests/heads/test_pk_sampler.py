"""PKSampler: exactly P identities x K images per batch, deterministic by (seed, epoch), rank-disjoint."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facetrain.data.samplers import PKSampler
from facetrain.errors import DataError


def _labels():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 9, size=23)  # some identities have fewer than K images
    return np.repeat(np.arange(23) * 10, counts)  # non-contiguous identity ids


def test_every_batch_is_p_identities_times_k_images():
    labels = _labels()
    p, k = 4, 3
    sampler = PKSampler(labels, identities_per_batch=p, images_per_identity=k, seed=1)
    indices = list(sampler)
    assert len(indices) == len(sampler) == (23 // p) * p * k
    seen = Counter()
    for b in range(0, len(indices), p * k):
        batch = indices[b : b + p * k]
        per_id = Counter(labels[i] for i in batch)
        assert len(per_id) == p and set(per_id.values()) == {k}
        for ident in per_id:
            members = np.flatnonzero(labels == ident)
            chosen = [i for i in batch if labels[i] == ident]
            if len(members) >= k:
                assert len(set(chosen)) == k  # distinct images when the identity has enough
            else:
                assert set(chosen) == set(members.tolist())  # all of them, plus repeats
        seen.update(per_id)
    assert max(seen.values()) == k  # each identity at most once per epoch


def test_deterministic_by_seed_and_epoch():
    labels = _labels()
    make = lambda seed: PKSampler(labels, identities_per_batch=3, images_per_identity=2, seed=seed)  # noqa: E731
    a, b = make(5), make(5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make(6)) != first


def test_ranks_get_disjoint_equal_batches_and_dataloader_works():
    labels = _labels()
    kw = {"identities_per_batch": 2, "images_per_identity": 2, "seed": 3, "num_replicas": 2}
    r0, r1 = PKSampler(labels, rank=0, **kw), PKSampler(labels, rank=1, **kw)
    assert len(r0) == len(r1) > 0
    single = list(PKSampler(labels, **{**kw, "num_replicas": 1}))
    b0 = [tuple(list(r0)[i : i + 4]) for i in range(0, len(r0), 4)]
    b1 = [tuple(list(r1)[i : i + 4]) for i in range(0, len(r1), 4)]
    all_batches = [tuple(single[i : i + 4]) for i in range(0, len(single), 4)]
    assert b0 == all_batches[0::2][: len(b0)] and b1 == all_batches[1::2][: len(b1)]
    loader = torch.utils.data.DataLoader(torch.as_tensor(labels), batch_size=4, sampler=r0, drop_last=True)
    for batch in loader:
        assert sorted(Counter(batch.tolist()).values()) == [2, 2]


def test_errors():
    with pytest.raises(DataError, match="fewer than identities_per_batch"):
        PKSampler([0, 0, 1], identities_per_batch=3, images_per_identity=2)
    with pytest.raises(DataError, match="integers"):
        PKSampler([0.5, 1.0], identities_per_batch=1, images_per_identity=2)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(1, 6), min_size=2, max_size=15),
    p=st.integers(1, 4),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_pk_property(counts, p, k, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    if len(counts) < p:
        with pytest.raises(DataError):
            PKSampler(labels, identities_per_batch=p, images_per_identity=k)
        return
    indices = list(PKSampler(labels, identities_per_batch=p, images_per_identity=k, seed=seed))
    assert len(indices) == (len(counts) // p) * p * k
    assert all(0 <= i < len(labels) for i in indices)
    for b in range(0, len(indices), p * k):
        per_id = Counter(labels[i] for i in indices[b : b + p * k])
        assert len(per_id) == p and set(per_id.values()) == {k}
