"""A small synthetic GRPO batch for the megatron step tests (one place for its recipe of random draws)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlkit.parallel.megatron.step import RLBatch


def synthetic_rl_batch(
    lengths: Sequence[int], responses: Sequence[int], *, vocab: int, with_loss_masks: bool = False
) -> RLBatch:
    """Tokens in ``[1, vocab)``, one advantage per sample, old log-probs near ``-log(200)`` (some ratios clip).

    Args:
        lengths: prompt + response length of each sample.
        responses: response length of each sample.
        vocab: token ids are drawn below it.
        with_loss_masks: also draw 0/1 loss masks (~70% ones).
    """
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    advantages = [torch.full((r,), float(torch.randn(1, generator=g))) for r in responses]
    old = [-5.3 + 0.5 * torch.randn(r, generator=g) for r in responses]
    masks = [(torch.rand(r, generator=g) > 0.3).float() for r in responses] if with_loss_masks else None
    return RLBatch(
        tokens=tokens, response_lengths=list(responses), advantages=advantages, old_log_probs=old, loss_masks=masks
    )
