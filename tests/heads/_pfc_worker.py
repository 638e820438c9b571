"""Rank code for the 2-Gloo-rank Partial FC and comm tests (imported by name by torch.multiprocessing.spawn children).

``run_case`` is the same code on every world size: with no process group it is the one-process reference holding all
class centres, under 2 ranks each rank feeds its own rows. Everything is float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NUM_CLASSES = 11  # odd: the two shards differ in size
FEATURES = 6
EMBEDDING = 8
SIZES = (5, 3)  # rows per rank: unequal on purpose
STEPS = 2

# (id, margin name, margin kwargs, sharding, subcenter K handled by PartialFC, sample_rate)
CASES = [
    ("arcface-block", "arcface", {"scale": 16.0}, "block", 1, 1.0),
    ("arcface-mod", "arcface", {"scale": 16.0}, "mod", 1, 1.0),
    ("arcface-filter-mod", "arcface", {"scale": 16.0, "interclass_filtering_threshold": 0.1}, "mod", 1, 1.0),
    ("cosface-block", "cosface", {"scale": 16.0}, "block", 1, 1.0),
    ("cosface-mod-subcenter", "cosface", {"scale": 16.0, "subcenter_k": 2}, "mod", 2, 1.0),
    ("curricularface-block", "curricularface", {"scale": 16.0, "shared_rows": True}, "block", 1, 1.0),
    ("curricularface-mod", "curricularface", {"scale": 16.0, "shared_rows": True}, "mod", 1, 1.0),
    ("magface-mod", "magface", {"scale": 16.0}, "mod", 1, 1.0),
    ("arcface-sampled-block", "arcface", {"scale": 16.0}, "block", 1, 0.5),
    ("cosface-sampled-mod", "cosface", {"scale": 16.0}, "mod", 1, 0.5),
]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of step ``step``: (sum(SIZES), FEATURES) float64 features and (sum(SIZES),) labels."""
    g = torch.Generator().manual_seed(100 + step)
    features = torch.randn(sum(SIZES), FEATURES, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(SIZES),), generator=g)
    labels[1] = labels[6]  # a class twice in the batch, on different ranks
    return features, labels


def full_centres(k: int) -> torch.Tensor:
    """(NUM_CLASSES*k, EMBEDDING) float64 centres in global class order."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(NUM_CLASSES * k, EMBEDDING, generator=g, dtype=torch.float64)


def backbone() -> torch.nn.Linear:
    """A tiny float64 'backbone', identical on every rank; norms of its output land inside MagFace's range."""
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Linear(FEATURES, EMBEDDING, dtype=torch.float64)
    with torch.no_grad():
        net.weight.copy_(torch.randn(EMBEDDING, FEATURES, generator=g, dtype=torch.float64) * 10)
        net.bias.copy_(torch.randn(EMBEDDING, generator=g, dtype=torch.float64) * 10)
    return net


def build(case: tuple, seed: int = 0):
    from facetrain.heads import build_margin
    from facetrain.heads.partial_fc import PartialFC

    _, name, kwargs, sharding, k, rate = case
    margin = build_margin(name, **kwargs)
    return PartialFC(
        EMBEDDING, NUM_CLASSES, margin=margin, sample_rate=rate, subcenter_k=k, sharding=sharding, seed=seed
    ).double()


def run_case(case: tuple, rank: int, world: int) -> dict:
    """Two training steps; per step the loss, this rank's embedding gradient, the backbone gradient, the full
    (gathered) centre gradient and what was sampled; finally the margin's buffers."""
    pfc = build(case)
    pfc.load_full_weight(full_centres(case[4]))
    net = backbone()
    start = sum(SIZES[:rank]) if world > 1 else 0
    stop = start + SIZES[rank] if world > 1 else sum(SIZES)
    steps = []
    for step in range(STEPS):
        features, labels = batch(step)
        pfc.zero_grad()
        net.zero_grad()
        embeddings = net(features[start:stop])
        embeddings.retain_grad()
        out = pfc(embeddings, labels[start:stop])
        out.loss.backward()
        steps.append(
            {
                "loss": out.loss.detach(),
                "embedding_grad": embeddings.grad.detach().clone(),
                "backbone_grad": net.weight.grad.detach().clone(),
                "centre_grad": pfc.gather_full(pfc.weight.grad),
                "sampled": out.sampled_classes.clone(),
                "num_sampled": out.num_sampled,
                "num_sample": pfc.num_sample,
                "aux": None if out.aux_loss is None else out.aux_loss.detach(),
            }
        )
    return {"steps": steps, "margin": {k: v.clone() for k, v in pfc.margin.state_dict().items()}}


def pfc_cases(rank: int, world: int, port: int, out: str) -> None:
    """Every case of CASES plus the gather/re-shard round trip; writes ``out.<rank>``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {case[0]: run_case(case, rank, world) for case in CASES}
        for sharding in ("block", "mod"):
            case = ("roundtrip", "arcface", {}, sharding, 2, 1.0)
            pfc = build(case, seed=5)
            results[f"init-{sharding}"] = pfc.gather_full_weight()
            results[f"init-dst1-{sharding}"] = pfc.gather_full_weight(dst=1)
            results[f"local-{sharding}"] = pfc.weight.detach().clone()
            pfc.load_full_weight(full_centres(2))
            results[f"reloaded-{sharding}"] = pfc.gather_full_weight()
        results["errors"] = _construction_errors()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _construction_errors() -> list[str]:
    """Messages of the constructions that must fail on 2 ranks (and only there)."""
    from facetrain.errors import ModelError
    from facetrain.heads import build_margin
    from facetrain.heads.partial_fc import PartialFC

    messages = []
    for margin, classes in ((build_margin("curricularface"), NUM_CLASSES), (build_margin("arcface"), 1)):
        try:
            PartialFC(EMBEDDING, classes, margin=margin)
        except ModelError as exc:
            messages.append(str(exc))
    return messages


def comm_checks(rank: int, world: int, port: int, out: str) -> None:
    """facetrain.engine.comm under 2 ranks; writes ``out.<rank>``."""
    from facetrain.engine import comm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {"world": comm.get_world_size(), "rank": comm.get_rank(), "main": comm.is_main_process()}
        value = torch.tensor([1.0 + rank, 5.0 - 3 * rank], dtype=torch.float64)
        results["sum"] = comm.all_reduce_sum(value)
        results["max"] = comm.all_reduce_max(value)
        results["input_after"] = value
        g = torch.Generator().manual_seed(11)
        rows = torch.randn(sum(SIZES), 4, generator=g, dtype=torch.float64)
        coeffs = torch.randn(world, sum(SIZES), 4, generator=g, dtype=torch.float64)
        start = sum(SIZES[:rank])
        mine = rows[start : start + SIZES[rank]].clone().requires_grad_(True)
        gathered = comm.all_gather_with_grad(mine)
        results["gathered"] = gathered.detach()
        # each rank's own loss of the gathered rows, non-linear so the gradient depends on the gathered values
        (coeffs[rank] * gathered.pow(2)).sum().backward()
        results["grad"] = mine.grad
        results["labels"] = comm.all_gather_tensor(torch.arange(SIZES[rank]) + 10 * rank)
        results["objects"] = comm.all_gather_object({"rank": rank})
        results["broadcast"] = comm.broadcast_object(f"from {rank}", src=1)
        comm.barrier()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
