"""rlkit.algos: the math of RL post-training as plain functions over tensors.

Modules (import them directly; this package re-exports nothing so that importing it stays free):

- ``rlkit.algos.advantages``: GRPO, Dr.GRPO, RLOO, REINFORCE++(-baseline), GAE; registry
  ``ADVANTAGE_ESTIMATORS`` keyed by slime's ``--advantage-estimator`` names.
- ``rlkit.algos.losses``: per-token PPO clip (clip-higher, dual clip), KL k1/k2/k3/low_var_kl, entropy,
  TIS, GSPO, MTP and SFT cross-entropy; ``rl_loss`` assembles them.
- ``rlkit.algos.aggregation``: per-token values to the backpropagated scalar with a global normalizer,
  invariant to micro-batch / DP / CP splits.
- ``rlkit.algos.logprobs``: chunked log-probs and entropy from logits (or hidden states), vocab-parallel.
- ``rlkit.algos.fused_linear_loss``: a per-token RL loss from hidden states with its gradient formed in the
  forward (3 matmuls, no ``[T, V]`` logits).

``rlkit.algos`` imports nothing from the other rlkit packages and does no communication.
See docs/algos.md.
"""
