"""Worker for the 2-rank Gloo test of margin buffer sync (imported by torch.multiprocessing.spawn children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def margin_buffers(rank: int, world: int, port: int, cos: torch.Tensor, labels: torch.Tensor, norms, out) -> None:
    """Each rank sees its rows (data-parallel split) and, separately, all rows with only its classes' labels
    (Partial FC split); writes the resulting CurricularFace / AdaFace buffers to ``out[rank]``."""
    from facetrain.heads import build_margin

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = torch.arange(cos.shape[0]).chunk(world)[rank]
        results = {}
        for name in ("curricularface", "adaface"):
            margin = build_margin(name)
            for _ in range(2):  # two steps: EMA applied twice
                margin(cos[rows], labels[rows], norms[rows])
            results[f"dp_{name}"] = {k: v.clone() for k, v in margin.state_dict().items()}
            # Partial FC: every rank holds every row; a row's label is valid only on the rank owning its class
            classes = torch.arange(cos.shape[1]).chunk(world)[rank]
            mine = (labels >= classes[0]) & (labels <= classes[-1])
            sharded = torch.where(mine, labels, torch.full_like(labels, -1))
            margin = build_margin(name)
            for _ in range(2):
                margin(cos, sharded, norms)
            results[f"pfc_{name}"] = {k: v.clone() for k, v in margin.state_dict().items()}
        # CurricularFace's hard-negative thresholds of rows owned by the other rank (first step, fresh t)
        classes = torch.arange(cos.shape[1]).chunk(world)[rank]
        mine = (labels >= classes[0]) & (labels <= classes[-1])
        sharded = torch.where(mine, labels, torch.full_like(labels, -1))
        margin = build_margin("curricularface", shared_rows=True)
        results["pfc_curricular_logits"] = margin(cos, sharded).logits[:, classes].detach()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
