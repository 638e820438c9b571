"""Partial FC: 2 Gloo ranks == one process holding all centres; sampling; independent cross-entropy; re-sharding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from facetrain.engine.comm import free_port
from facetrain.errors import ModelError
from facetrain.heads import build_margin
from facetrain.heads.partial_fc import (
    PartialFC,
    cosine_logits,
    distributed_softmax_cross_entropy,
    sample_centres,
    shard_class_ids,
    unit_rows,
)

HERE = str(Path(__file__).parent)
sys.path.insert(0, HERE)  # spawn children inherit sys.path and import the worker module by name
import _pfc_worker as worker  # noqa: E402

sys.path.remove(HERE)

FULL_CASES = [c for c in worker.CASES if c[5] == 1.0]
SAMPLED_CASES = [c for c in worker.CASES if c[5] < 1.0]
TOL = {"rtol": 1e-7, "atol": 1e-9}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Results of every worker case on 2 Gloo ranks (one spawn for the whole module)."""
    out = tmp_path_factory.mktemp("pfc") / "results"
    sys.path.insert(0, HERE)
    try:
        mp.spawn(worker.pfc_cases, args=(2, free_port(), str(out)), nprocs=2, join=True)
    finally:
        sys.path.remove(HERE)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]


def _double(margin: torch.nn.Module) -> torch.nn.Module:
    """float64 buffers for a standalone reference margin."""
    return margin.double()


def _rows(rank: int) -> slice:
    start = sum(worker.SIZES[:rank])
    return slice(start, start + worker.SIZES[rank])


@pytest.mark.parametrize("case", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_two_ranks_match_one_process(two_ranks, case):
    reference = worker.run_case(case, rank=0, world=1)
    for rank, results in enumerate(two_ranks):
        got = results[case[0]]
        for step, (mine, ref) in enumerate(zip(got["steps"], reference["steps"], strict=True)):
            torch.testing.assert_close(mine["loss"], ref["loss"], **TOL, msg=f"loss, rank {rank} step {step}")
            torch.testing.assert_close(mine["embedding_grad"], ref["embedding_grad"][_rows(rank)], **TOL)
            torch.testing.assert_close(mine["centre_grad"], ref["centre_grad"], **TOL)
            assert mine["centre_grad"].abs().sum() > 0
            if ref["aux"] is not None:
                torch.testing.assert_close(mine["aux"], ref["aux"], **TOL)
        for key, value in reference["margin"].items():
            torch.testing.assert_close(got["margin"][key], value, **TOL, msg=f"margin buffer {key}")
    # the backbone (shared weights) gets, summed over ranks (what DDP all-reduces), the one-process gradient
    for step, ref in enumerate(reference["steps"]):
        summed = sum(results[case[0]]["steps"][step]["backbone_grad"] for results in two_ranks)
        torch.testing.assert_close(summed, ref["backbone_grad"], **TOL)


@pytest.mark.parametrize("case", SAMPLED_CASES, ids=[c[0] for c in SAMPLED_CASES])
def test_two_ranks_sampled_equal_softmax_over_sampled_classes(two_ranks, case):
    """With sampling, the loss and gradients are those of a softmax over the union of the classes the ranks kept."""
    _, name, kwargs, sharding, k, _ = case
    for step in range(worker.STEPS):
        features, labels = worker.batch(step)
        sampled = [results[case[0]]["steps"][step]["sampled"] for results in two_ranks]
        for rank, classes in enumerate(sampled):
            stats = two_ranks[rank][case[0]]["steps"][step]
            shard = shard_class_ids(worker.NUM_CLASSES, rank, 2, sharding)
            positives = set(labels.tolist()) & set(shard.tolist())
            assert positives <= set(classes.tolist())
            assert set(classes.tolist()) <= set(shard.tolist())
            assert stats["num_sampled"] == len(classes) == max(stats["num_sample"], len(positives))
        union = torch.cat(sampled).sort()[0]
        assert len(union) < worker.NUM_CLASSES  # something was left out, or the test proves nothing

        # independent reference in one process: softmax over the union only
        net = worker.backbone()
        centres = worker.full_centres(k).requires_grad_(True)
        embeddings = net(features)
        embeddings.retain_grad()
        cos = F.normalize(embeddings) @ F.normalize(centres[union]).T
        column = torch.searchsorted(union, labels)
        logits = _double(build_margin(name, **kwargs))(cos.clamp(-1, 1), column).logits
        loss = F.cross_entropy(logits, column)
        loss.backward()
        for rank, results in enumerate(two_ranks):
            got = results[case[0]]["steps"][step]
            torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
            torch.testing.assert_close(got["embedding_grad"], embeddings.grad[_rows(rank)], **TOL)
            torch.testing.assert_close(got["centre_grad"], centres.grad, **TOL)


def test_gather_and_reshard_across_world_sizes(two_ranks):
    for sharding in ("block", "mod"):
        one = worker.build(("roundtrip", "arcface", {}, sharding, 2, 1.0), seed=5)
        # initial centres do not depend on the world size or the sharding
        for rank, results in enumerate(two_ranks):
            torch.testing.assert_close(results[f"init-{sharding}"], one.weight.detach(), rtol=0, atol=0)
            ids = shard_class_ids(worker.NUM_CLASSES, rank, 2, sharding)
            expected_local = one.weight.detach().reshape(worker.NUM_CLASSES, 2, -1)[ids].reshape(-1, worker.EMBEDDING)
            torch.testing.assert_close(results[f"local-{sharding}"], expected_local, rtol=0, atol=0)
            torch.testing.assert_close(results[f"reloaded-{sharding}"], worker.full_centres(2), rtol=0, atol=0)
        assert two_ranks[0][f"init-dst1-{sharding}"] is None
        assert two_ranks[1][f"init-dst1-{sharding}"] is not None
        # a full tensor written by 2 ranks resumes on 1
        fresh = worker.build(("roundtrip", "arcface", {}, sharding, 2, 1.0), seed=99)
        fresh.load_full_weight(two_ranks[0][f"reloaded-{sharding}"])
        torch.testing.assert_close(fresh.weight.detach(), worker.full_centres(2), rtol=0, atol=0)
        torch.testing.assert_close(fresh.gather_full_weight(), worker.full_centres(2), rtol=0, atol=0)


def test_two_ranks_refuse_what_cannot_be_exact(two_ranks):
    for results in two_ranks:
        shared_rows, too_few = results["errors"]
        assert "shared_rows=True" in shared_rows
        assert "1 classes cannot be sharded over 2 ranks" in too_few
    PartialFC(8, 1, margin=build_margin("curricularface"))  # one process: both are fine


def test_shard_class_ids_partition_the_classes():
    for num_classes in (1, 7, 10, 11):
        for world in (1, 2, 3, 4):
            for sharding in ("block", "mod"):
                shards = [shard_class_ids(num_classes, r, world, sharding) for r in range(world)]
                assert sorted(torch.cat(shards).tolist()) == list(range(num_classes))
                for r, ids in enumerate(shards):
                    assert len(ids) == num_classes // world + (r < num_classes % world)
            base, extra = divmod(num_classes, world)
            for r in range(world):
                assert shard_class_ids(num_classes, r, world, "block")[:1].tolist() == (
                    [r * base + min(r, extra)] if base + (r < extra) else []
                )


# ---------------------------------------------------------------------------------------------------------------------
# One process: independent formulas


def _inputs(b: int = 9, c: int = 13, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = (torch.randn(b, d, generator=g, dtype=torch.float64) * 20).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g)
    return embeddings, labels


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("arcface", {"scale": 32.0}),
        ("arcface", {"scale": 32.0, "exact_gradient": True}),
        ("cosface", {"scale": 32.0}),
        ("combined", {"scale": 32.0}),
        ("curricularface", {"scale": 32.0}),
        ("adaface", {"scale": 32.0}),
        ("magface", {"scale": 32.0}),
    ],
)
def test_loss_and_gradients_equal_torch_cross_entropy(name, kwargs):
    embeddings, labels = _inputs()
    pfc = PartialFC(8, 13, margin=build_margin(name, **kwargs)).double()
    out = pfc(embeddings, labels)
    out.loss.backward()

    centres = pfc.weight.detach().clone().requires_grad_(True)
    x = embeddings.detach().clone().requires_grad_(True)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (centres / centres.norm(dim=1, keepdim=True)).T
    ref = _double(build_margin(name, **kwargs))(cos.clamp(-1, 1), labels, x.norm(dim=1))
    loss = F.cross_entropy(ref.logits, labels) + (ref.aux_loss if ref.aux_loss is not None else 0)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, **TOL)
    torch.testing.assert_close(embeddings.grad, x.grad, **TOL)
    torch.testing.assert_close(pfc.weight.grad, centres.grad, **TOL)


def test_cosface_loss_by_hand():
    """CosFace softmax written out: -mean(s(cos_y - m) - log(sum_j exp(s cos_j - s m [j = y])))."""
    embeddings, labels = _inputs(seed=4)
    s, m = 30.0, 0.35
    pfc = PartialFC(8, 13, margin=build_margin("cosface", scale=s, additive_margin=m)).double()
    w = pfc.weight.detach()
    cos = (embeddings / embeddings.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    logits = s * (cos - m * F.one_hot(labels, 13).double())
    expected = -(logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)).mean()
    torch.testing.assert_close(pfc(embeddings, labels).loss, expected, **TOL)


def test_distributed_cross_entropy_gradient_is_p_minus_onehot():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    loss = distributed_softmax_cross_entropy(logits, labels)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), labels), **TOL)
    expected = (torch.softmax(logits.detach(), dim=1) - F.one_hot(labels, 5)) / 6
    torch.testing.assert_close(logits.grad, expected, **TOL)
    assert torch.autograd.gradcheck(lambda z: distributed_softmax_cross_entropy(z, labels), (logits,))


def test_unit_rows_equals_normalize_with_gradient():
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(unit_rows(rows), F.normalize(rows))
    assert torch.autograd.gradcheck(unit_rows, (rows,))


def test_cosine_logits_equal_normalized_matmul_with_gradient():
    g = torch.Generator().manual_seed(6)
    unit = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    centres = (torch.randn(9, 4, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    torch.testing.assert_close(cosine_logits(unit, centres), unit @ F.normalize(centres).T)
    assert torch.autograd.gradcheck(cosine_logits, (unit, centres))


def test_subcentres_reduced_by_partial_fc_or_by_margin_agree():
    embeddings, labels = _inputs(seed=2)
    by_pfc = PartialFC(8, 13, margin=build_margin("arcface"), subcenter_k=3).double()
    by_margin = PartialFC(8, 13, margin=build_margin("arcface", subcenter_k=3), subcenter_k=3).double()
    assert by_pfc.weight.shape == (39, 8)
    torch.testing.assert_close(by_pfc(embeddings, labels).loss, by_margin(embeddings, labels).loss, **TOL)
    with pytest.raises(ModelError, match="subcenter_k"):
        PartialFC(8, 13, margin=build_margin("arcface", subcenter_k=2), subcenter_k=3)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


@settings(max_examples=60, deadline=None)
@given(
    num_local=st.integers(1, 40),
    rate=st.floats(0.01, 1.0),
    data=st.data(),
)
def test_sampling_keeps_every_positive_and_exact_count(num_local, rate, data):
    labels = torch.tensor(data.draw(st.lists(st.integers(-1, num_local - 1), min_size=1, max_size=30)))
    num_sample = int(rate * num_local)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    index, remapped = sample_centres(labels, num_local, num_sample, generator)
    positives = set(labels[labels >= 0].tolist())
    assert positives <= set(index.tolist())
    assert len(index) == max(num_sample, len(positives))
    assert index.tolist() == sorted(set(index.tolist()))  # ascending, no repeats
    assert all(0 <= i < num_local for i in index.tolist())
    assert torch.equal(remapped == -1, labels == -1)
    assert torch.equal(index[remapped[labels >= 0]], labels[labels >= 0])


def test_sampled_forward_uses_few_centres_and_is_reproducible():
    embeddings, labels = _inputs(b=6, c=200)
    runs = []
    for _ in range(2):
        pfc = PartialFC(8, 200, margin=build_margin("arcface"), sample_rate=0.1, seed=3).double()
        runs.append([pfc(embeddings, labels, return_logits=True) for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert a.num_sampled == 20 and a.logits.shape == (6, 20)  # never (B, C)
        assert set(labels.tolist()) <= set(a.sampled_classes.tolist())
        assert torch.equal(a.sampled_classes, b.sampled_classes)
        torch.testing.assert_close(a.loss, b.loss)
    assert not torch.equal(runs[0][0].sampled_classes, runs[0][1].sampled_classes)  # fresh draw per step
    # the step counter is saved: a restored module continues the same sequence
    state = pfc.state_dict()
    restored = PartialFC(8, 200, margin=build_margin("arcface"), sample_rate=0.1, seed=3).double()
    restored.load_state_dict(state)
    assert torch.equal(restored(embeddings, labels).sampled_classes, pfc(embeddings, labels).sampled_classes)
    # eval mode: every centre
    assert pfc.eval()(embeddings, labels).num_sampled == 200


def test_full_state_dict_round_trip_through_torch_save(tmp_path):
    margin = build_margin("curricularface")
    pfc = PartialFC(8, 13, margin=margin, sample_rate=0.5, sharding="mod")
    embeddings, labels = _inputs()
    pfc(embeddings.float(), labels)
    torch.save(pfc.full_state_dict(), tmp_path / "pfc.pt")
    state = torch.load(tmp_path / "pfc.pt", weights_only=True)
    other = PartialFC(8, 13, margin=build_margin("curricularface"), sample_rate=0.5, sharding="block", seed=1)
    other.load_full_state_dict(state)
    torch.testing.assert_close(other.gather_full_weight(), pfc.gather_full_weight())
    torch.testing.assert_close(other.margin.t, pfc.margin.t)
    assert float(other.margin.t) != 0.0


def test_errors_name_the_problem():
    margin = build_margin("arcface")
    with pytest.raises(ModelError, match="did you mean 'block'"):
        PartialFC(8, 13, margin=margin, sharding="blocks")
    with pytest.raises(ModelError, match="sample_rate"):
        PartialFC(8, 13, margin=margin, sample_rate=0.0)
    pfc = PartialFC(8, 13, margin=margin)
    with pytest.raises(ModelError, match="label 13 is outside"):
        pfc(torch.randn(2, 8), torch.tensor([0, 13]))
    with pytest.raises(ModelError, match=r"\(B, 8\)"):
        pfc(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ModelError, match="must have 13 rows"):
        pfc.load_full_weight(torch.randn(12, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampled_step_equals_cpu_softmax_over_the_same_classes():
    embeddings, labels = _inputs(b=16, c=300)
    gpu = PartialFC(8, 300, margin=build_margin("arcface", scale=16.0), sample_rate=0.2).double().cuda()
    x_gpu = embeddings.detach().cuda().requires_grad_(True)
    out = gpu(x_gpu, labels.cuda())
    out.loss.backward()
    assert out.num_sampled == 60 and set(labels.tolist()) <= set(out.sampled_classes.tolist())
    # same seed, same initial centres on any device: evaluate on the CPU over the classes the GPU drew
    keep = out.sampled_classes.cpu()
    centres = (
        PartialFC(8, 300, margin=build_margin("arcface", scale=16.0))
        .double()
        .weight.detach()[keep]
        .requires_grad_(True)
    )
    x = embeddings.detach().clone().requires_grad_(True)
    column = torch.searchsorted(keep, labels)
    cos = F.normalize(x) @ F.normalize(centres).T
    ref = F.cross_entropy(build_margin("arcface", scale=16.0)(cos.clamp(-1, 1), column).logits, column)
    ref.backward()
    torch.testing.assert_close(out.loss.cpu(), ref.detach(), **TOL)
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, **TOL)
    torch.testing.assert_close(gpu.weight.grad[keep.cuda()].cpu(), centres.grad, **TOL)
