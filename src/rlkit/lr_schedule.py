"""Learning-rate schedules as multipliers of the base lr, per optimizer step (megatron's ``--lr-decay-style``).

A schedule is a plain function ``step -> factor``: the lr of optimizer step ``step`` (0-based) is
``base_lr * factor(step)``. ``torch.optim.lr_scheduler.LambdaLR`` applies it to a ``torch.optim`` optimizer;
:class:`ParamGroupLR` applies it to any optimizer that exposes ``param_groups`` but is no
``torch.optim.Optimizer`` (megatron-core's ``DistributedOptimizer``), with the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

DecayStyle = Literal["constant", "linear", "cosine"]
DECAY_STYLES = ("constant", "linear", "cosine")


def warmup_decay_schedule(
    *, num_steps: int, warmup_steps: int = 0, decay_style: DecayStyle = "constant"
) -> Callable[[int], float]:
    """``step -> lr factor``: linear warmup over ``warmup_steps``, then decay to 0 at ``num_steps``.

    With ``W = warmup_steps`` and ``D = max(1, num_steps - W)`` decay steps:

    - warmup, ``step < W``: ``(step + 1) / W`` (the first step already trains, at ``1 / W``);
    - then ``p = min(1, (step - W) / D)`` and the factor is ``1`` (constant), ``1 - p`` (linear) or
      ``(1 + cos(pi p)) / 2`` (cosine); it stays at the end value past ``num_steps``.

    Args:
        num_steps: optimizer steps of the whole run (e.g. rollouts x steps per rollout).
        warmup_steps: linear-warmup steps, ``>= 0``.
        decay_style: ``"constant"``, ``"linear"`` or ``"cosine"``.

    Returns:
        The factor as a function of the 0-based optimizer step.
    """
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"decay_style={decay_style!r}: choose one of {DECAY_STYLES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    total = max(1, num_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / total)
        if decay_style == "linear":
            return 1.0 - progress
        if decay_style == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


class ParamGroupLR:
    """``LambdaLR``'s interface for an optimizer that reads its lr from ``param_groups`` (megatron's).

    Sets every group's ``"lr"`` to ``base_lr * factor(num_steps)`` at construction and after each
    :meth:`step`; its state is the step count, so a resumed run continues the schedule.

    Args:
        optimizer: any object with a ``param_groups`` list of dicts.
        base_lr: the lr that ``factor`` multiplies.
        factor: ``step -> multiplier``, e.g. :func:`warmup_decay_schedule`.
    """

    def __init__(self, optimizer: Any, base_lr: float, factor: Callable[[int], float]) -> None:
        self.optimizer, self.base_lr, self.factor, self.num_steps = optimizer, base_lr, factor, 0
        self._apply()

    def _apply(self) -> None:
        self.lr = self.base_lr * self.factor(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        """Advance one optimizer step and set the new lr."""
        self.num_steps += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The lr now set, as a one-element list (``LambdaLR`` returns one per group)."""
        return [self.lr]

    def state_dict(self) -> dict[str, int]:
        """``{"num_steps": n}``."""
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: restore the step count and set its lr."""
        self.num_steps = state["num_steps"]
        self._apply()
