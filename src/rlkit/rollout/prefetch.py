"""Rollouts on demand, or one ahead in a thread while the trainer trains (slime's ``train_async.py``).

With ``async_mode`` the rollout ``k + 1`` is started as soon as rollout ``k`` is handed out, so it is
generated with the weights before step ``k``'s update: one step off-policy (truncated importance sampling,
``PolicyLossConfig.use_tis``, corrects for it). A weight update to the engine waits for the generation in
flight when the engine serialises the two (the embedded and process engines hold a lock).

The rollout in flight has already taken its prompts from the dataset, so a checkpoint must store it with
the dataset position: :meth:`RolloutPrefetcher.in_flight_state` waits for it and returns it as JSON-ready
dicts, and :meth:`RolloutPrefetcher.resumed_rollout` turns them back into the rollout that the resumed run
hands out first.

A *rollout* here is whatever ``make_rollout(rollout_id)`` returns as ``(groups, metrics)``, e.g.
:func:`rlkit.rollout.manager.rollout_step`'s ``list[list[Sample]]`` and its metrics dict.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from rlkit.rollout.sample import Sample

Rollout = tuple[list[list[Sample]], dict[str, Any]]
"""``(groups, metrics)``: one rollout's groups of samples and its metrics."""


class RolloutPrefetcher:
    """Hands out rollouts ``start, start + 1, ...``; with ``async_mode`` the next one is made in a thread meanwhile.

    Args:
        make_rollout: ``rollout_id -> (groups, metrics)``; with ``async_mode`` called from one worker thread.
        num_rollout: rollouts of the run; none is started at or past this id.
        async_mode: make rollout ``k + 1`` while the caller trains on rollout ``k``.
        resumed: a rollout made before the checkpoint the run resumed from (:meth:`resumed_rollout`); it is
            handed out by the first :meth:`get` instead of calling ``make_rollout``.
    """

    def __init__(
        self,
        make_rollout: Callable[[int], Rollout],
        *,
        num_rollout: int,
        async_mode: bool,
        resumed: Rollout | None = None,
    ) -> None:
        self.make_rollout, self.num_rollout, self.resumed = make_rollout, num_rollout, resumed
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if async_mode else None
        self.pending: concurrent.futures.Future | None = None

    def get(self, rollout_id: int) -> Rollout:
        """Rollout ``rollout_id`` (the resumed one, the one made ahead, or made now); starts the next one if async."""
        if self.resumed is not None:
            out, self.resumed = self.resumed, None
        else:
            out = self.pending.result() if self.pending is not None else self.make_rollout(rollout_id)
        self.pending = None
        if self.pool and rollout_id + 1 < self.num_rollout:
            self.pending = self.pool.submit(self.make_rollout, rollout_id + 1)
        return out

    def in_flight_state(self) -> dict[str, Any]:
        """``{"prefetched": groups as Sample dicts or None, "prefetched_metrics": ...}`` for a checkpoint.

        Waits for the rollout being made ahead; it stays the one the next :meth:`get` returns.
        """
        if self.pending is None:
            return {"prefetched": None, "prefetched_metrics": None}
        groups, metrics = self.pending.result()
        return {"prefetched": [[s.to_dict() for s in g] for g in groups], "prefetched_metrics": metrics}

    @staticmethod
    def resumed_rollout(loop_state: dict[str, Any]) -> Rollout | None:
        """The rollout stored by :meth:`in_flight_state` in ``loop_state``, or ``None``."""
        if loop_state.get("prefetched") is None:
            return None
        groups = [[Sample.from_dict(d) for d in g] for g in loop_state["prefetched"]]
        return groups, loop_state["prefetched_metrics"]

    def close(self) -> None:
        """Stop the worker thread; a rollout not yet started is cancelled."""
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
