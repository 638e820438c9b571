"""Learning-rate schedules and staged hyper-parameters, evaluated per optimizer step.

Every schedule is a pure function of the optimizer step, so a resumed run needs no scheduler state beyond the step
itself. The multiplier of the peak learning rate at 0-based step ``t``, with ``w`` warm-up steps and ``T`` steps in
all:

- warm-up (``t < w``): ``(t + 1) / w`` (linear, reaches the peak at the last warm-up step);
- after warm-up, with ``p = (t - w) / max(1, T - w)`` the fraction of post-warm-up steps done:

  - ``poly``: ``(1 - p) ** power`` (arcface_torch's ``PolyScheduler``, power 2);
  - ``cosine``: ``0.5 * (1 + cos(pi * p))`` (SGDR without restarts, Loshchilov & Hutter 2017);
  - ``step``: ``gamma ** (number of milestones <= t)`` (milestones in optimizer steps);
  - ``constant``: 1.

Stages (``schedule.stages`` in the config) change hyper-parameters of the margin and the learning rate across
training, e.g. margin scale 16 -> 32 -> 64: the active stage at step ``t`` is the first whose ``until_step > t``;
past the last stage the base config applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from facetrain.errors import ConfigError

__all__ = ["SCHEDULES", "lr_multiplier", "active_stage", "apply_lr"]

SCHEDULES = ("poly", "cosine", "step", "constant")


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    name: str = "poly",
    power: float = 2.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based); see the module docstring.

    Args:
        step: optimizer steps already taken.
        total_steps: T, all optimizer steps of the run.
        warmup_steps: w, linear warm-up steps (0 = none).
        name: ``poly``, ``cosine``, ``step`` or ``constant``.
        power: exponent of ``poly``.
        milestones: optimizer steps at which ``step`` multiplies by ``gamma`` (ascending).
        gamma: factor per milestone of ``step``.

    Returns:
        The multiplier (1 at the end of warm-up).

    Raises:
        ConfigError: unknown schedule name.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name: unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if name == "poly":
        return (1.0 - progress) ** power
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        return gamma ** sum(step >= m for m in milestones)
    return 1.0


def active_stage(step: int, stages: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the stage in force at optimizer step ``step`` (first with ``until_step > step``), None past all.

    Raises:
        ConfigError: a stage without an increasing integer ``until_step``.
    """
    previous = 0
    for index, stage in enumerate(stages):
        until = stage.get("until_step")
        if not isinstance(until, int) or until <= previous:
            raise ConfigError(
                f"schedule.stages[{index}].until_step: must be an integer > {previous} (stages in increasing order), "
                f"got {until!r}"
            )
        previous = until
    for index, stage in enumerate(stages):
        if step < stage["until_step"]:
            return index
    return None


def apply_lr(optimizer, base_lrs: Sequence[float], multiplier: float) -> None:
    """Set every parameter group's ``lr`` to ``base * multiplier`` (in place on ``optimizer``)."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * multiplier
