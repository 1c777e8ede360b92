"""Supervised fine-tuning of a Hugging Face causal LM on answer tokens (e.g. a warm start before RL).

A random or weak policy earns no reward, so every GRPO group has equal rewards and zero advantages;
a few SFT steps on reference answers give it a first reward to learn from. The loss is the token mean
of the cross-entropy of the answer tokens given the prompt, over one right-padded batch:

    L = sum_i sum_{t in answer_i} -log p(x_t | x_<t) / sum_i |answer_i|

Token alignment as in ``rlkit.parallel.hf``: the logits at position ``t`` predict token ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlkit.algos.aggregation import aggregate, global_normalizer
from rlkit.algos.losses import sft_loss


def answer_sft_loss(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> torch.Tensor:
    """Token-mean cross-entropy of each answer after its prompt, one forward over the right-padded batch.

    Args:
        model: an HF-style causal LM, ``model(input_ids=).logits`` of shape ``[B, L, V]``; right padding
            needs no attention mask under causal attention (no real token attends to a later pad).
        prompts: ``B`` prompt token-id lists, each ``P_i >= 1`` ids.
        answers: ``B`` answer token-id lists, each ``A_i >= 1`` ids (the targets, e.g. ending in EOS).
        pad_id: id of the right padding, ``L = max_i (P_i + A_i)``.

    Returns:
        The 0-dim float32 loss ``sum(-log p(answer tokens)) / sum_i A_i``, differentiable w.r.t. the model.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts and {len(answers)} answers; pass one answer per prompt, B >= 1")
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        if len(prompt) < 1 or len(answer) < 1:
            raise ValueError(f"row {row}: needs >= 1 prompt and >= 1 answer token, got {len(prompt)} and {len(answer)}")
    device = next(model.parameters()).device
    seqs = [list(prompt) + list(answer) for prompt, answer in zip(prompts, answers, strict=True)]
    width = max(map(len, seqs))
    ids = torch.tensor([q + [pad_id] * (width - len(q)) for q in seqs], device=device)
    mask = torch.tensor(
        [[0] * len(p) + [1] * (len(q) - len(p)) + [0] * (width - len(q)) for p, q in zip(prompts, seqs, strict=True)],
        device=device,
    )
    per_token_loss = sft_loss(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    return aggregate(
        per_token_loss,
        mask[:, 1:],
        mode="token_mean",
        normalizer=global_normalizer(mask[:, 1:].sum(1), mode="token_mean"),
    )
