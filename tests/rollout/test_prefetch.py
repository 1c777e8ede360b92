"""RolloutPrefetcher: order, one-ahead generation with the weights before the update, checkpoint round trip."""

from __future__ import annotations

import json
import threading

from rlkit.rollout.prefetch import RolloutPrefetcher
from rlkit.rollout.sample import Sample, SampleStatus


class FakeTrainer:
    """``make_rollout`` that records which weights version and thread made each rollout."""

    def __init__(self) -> None:
        self.version = 0  # bumped by each "weight update"
        self.calls: list[tuple[int, int, str]] = []

    def make_rollout(self, rollout_id: int):
        self.calls.append((rollout_id, self.version, threading.current_thread().name))
        sample = Sample(prompt=f"p{rollout_id}", tokens=[1, 2, 3], response_length=1, reward=float(rollout_id),
                        status=SampleStatus.COMPLETED, metadata={"rollout_id": rollout_id})  # fmt: skip
        return [[sample]], {"rollout/num_groups": 1.0, "version": self.version}


def test_sync_mode_makes_each_rollout_on_demand_in_the_caller():
    trainer = FakeTrainer()
    rollouts = RolloutPrefetcher(trainer.make_rollout, num_rollout=3, async_mode=False)
    for rollout_id in range(3):
        groups, metrics = rollouts.get(rollout_id)
        assert groups[0][0].prompt == f"p{rollout_id}" and metrics["version"] == rollout_id
        assert rollouts.in_flight_state() == {"prefetched": None, "prefetched_metrics": None}
        trainer.version += 1
    rollouts.close()
    assert trainer.calls == [(k, k, threading.current_thread().name) for k in range(3)]


def test_async_mode_makes_the_next_rollout_with_the_weights_before_the_update():
    trainer = FakeTrainer()
    rollouts = RolloutPrefetcher(trainer.make_rollout, num_rollout=4, async_mode=True)
    for rollout_id in range(4):
        groups, metrics = rollouts.get(rollout_id)
        assert groups[0][0].prompt == f"p{rollout_id}"
        # rollout 0 runs at version 0; rollout k >= 1 was started when k-1 was handed out, before update k-1
        assert metrics["version"] == max(0, rollout_id - 1)
        if rollouts.pending is not None:
            rollouts.pending.result()  # the fake generation is instant; wait so the update comes after it
        trainer.version += 1
    rollouts.close()
    assert [c[0] for c in trainer.calls] == [0, 1, 2, 3]  # none past num_rollout
    assert trainer.calls[0][2] == threading.current_thread().name
    assert all(name != threading.current_thread().name for _, _, name in trainer.calls[1:])


def test_checkpoint_of_the_rollout_in_flight_is_handed_out_first_after_resume():
    trainer = FakeTrainer()
    rollouts = RolloutPrefetcher(trainer.make_rollout, num_rollout=4, async_mode=True)
    rollouts.get(0)
    state = json.loads(json.dumps(rollouts.in_flight_state()))  # what a checkpoint's loop_state holds
    assert state["prefetched"][0][0]["prompt"] == "p1"
    want_groups, want_metrics = rollouts.get(1)  # in_flight_state left rollout 1 to be handed out
    rollouts.close()
    calls_before = len(trainer.calls)

    resumed = RolloutPrefetcher(trainer.make_rollout, num_rollout=4, async_mode=True,
                                resumed=RolloutPrefetcher.resumed_rollout(state))  # fmt: skip
    groups, metrics = resumed.get(1)
    assert [[s.to_dict() for s in g] for g in groups] == [[s.to_dict() for s in g] for g in want_groups]
    assert metrics == want_metrics
    resumed.pending.result()
    resumed.close()
    assert [c[0] for c in trainer.calls[calls_before:]] == [2]  # rollout 1 was not made again, rollout 2 started
    assert RolloutPrefetcher.resumed_rollout({"prefetched": None, "prefetched_metrics": None}) is None
