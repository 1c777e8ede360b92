"""rlkit.rollout: data in, scored samples out.

Modules (import the one you need; this package imports nothing heavy):

- ``sample``: the :class:`Sample` dataclass and group helpers.
- ``data``: ``PromptDataset`` (jsonl/Parquet prompts, chat templates, seeded epochs, resumable).
- ``rewards``: reward functions by ``--rm-type``, user rewards by import path, bounded-time batch scoring.
- ``filters``: dynamic-sampling filters (``check_reward_nonzero_std``).
- ``buffer``: the partial-rollout buffer (``PartialRolloutBuffer``, ``pop_first``).
- ``engines``: the ``RolloutEngine`` protocol, the embedded PyTorch engine and the SGLang client.
- ``manager``: one rollout step (over-sampling, filtering, partial rollouts) and one eval step.
- ``prefetch``: ``RolloutPrefetcher``, rollouts on demand or one ahead in a thread (``--async``), resumable.
"""
