"""Learning-rate schedules per optimizer step against their formulas, and stage selection."""

from __future__ import annotations

import math

import pytest

from facetrain.engine.schedule import active_stage, apply_lr, lr_multiplier
from facetrain.errors import ConfigError

TOTAL, WARMUP = 50, 10


def _expected(name: str, t: int) -> float:
    """Independent formulas: linear warm-up (t+1)/w, then p = (t - w)/(T - w)."""
    if t < WARMUP:
        return (t + 1) / WARMUP
    p = (t - WARMUP) / (TOTAL - WARMUP)
    return {
        "poly": (1 - p) ** 2,  # arcface_torch's PolyScheduler after warm-up: (1 - (t-w)/(T-w)) ** 2
        "cosine": (1 + math.cos(math.pi * p)) / 2,
        "step": 0.1 ** ((t >= 20) + (t >= 35)),
        "constant": 1.0,
    }[name]


@pytest.mark.parametrize("name", ["poly", "cosine", "step", "constant"])
def test_schedules_match_formulas_at_every_step(name):
    for t in range(TOTAL):
        got = lr_multiplier(
            t, total_steps=TOTAL, warmup_steps=WARMUP, name=name, power=2.0, milestones=[20, 35], gamma=0.1
        )
        assert got == pytest.approx(_expected(name, t), abs=1e-12), t


def test_poly_reaches_zero_and_warmup_reaches_the_peak():
    assert lr_multiplier(WARMUP - 1, total_steps=TOTAL, warmup_steps=WARMUP) == 1.0
    assert lr_multiplier(TOTAL, total_steps=TOTAL, warmup_steps=WARMUP) == 0.0
    assert lr_multiplier(0, total_steps=TOTAL, name="cosine") == 1.0  # no warm-up: starts at the peak


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule.name"):
        lr_multiplier(0, total_steps=10, name="linear")


def test_active_stage_and_validation():
    stages = [{"until_step": 100, "loss": {"scale": 16}}, {"until_step": 200, "loss": {"scale": 32}}]
    assert [active_stage(s, stages) for s in (0, 99, 100, 199, 200, 10_000)] == [0, 0, 1, 1, None, None]
    assert active_stage(5, []) is None
    with pytest.raises(ConfigError, match=r"stages\[1\]\.until_step"):
        active_stage(0, [{"until_step": 100}, {"until_step": 50}])


def test_apply_lr_sets_every_group():
    import torch

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.3}], lr=0.1)
    apply_lr(optimizer, [0.1, 0.3], 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.15])
