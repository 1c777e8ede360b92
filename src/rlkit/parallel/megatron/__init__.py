"""The bridge to megatron-core: model building from an HF config, THD-packed attention, the train step.

Importing this package does not import megatron-core; the functions that need it import it and raise
an error naming ``pip install "rlkit[megatron]"`` when it is missing.

* :mod:`~rlkit.parallel.megatron.attention`: causal attention over packed sequences (reference and varlen).
* :mod:`~rlkit.parallel.megatron.spec`: the local layer spec with the packed core attention.
* :mod:`~rlkit.parallel.megatron.model`: ``GPTModel`` from an HF Qwen3 config, weights via ``rlkit.ckpt``.
* :mod:`~rlkit.parallel.megatron.step`: one GRPO/PPO optimizer step over DataPacker micro-batches.
* :mod:`~rlkit.parallel.megatron.cpu_patches`: what megatron-core needs to run on a CPU-only PyTorch.
"""
