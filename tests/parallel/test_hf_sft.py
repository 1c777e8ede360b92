"""answer_sft_loss against a float64, one-sequence-at-a-time log-softmax reference (no padding, no cross_entropy)."""

from __future__ import annotations

import copy

import pytest
import torch

from rlkit.models.tiny import build_tiny_qwen3
from rlkit.parallel.hf_sft import answer_sft_loss

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
ANSWERS = [[20, 21, 0], [22, 23, 24, 25, 0], [0]]  # 3 + 5 + 1 = 9 answer tokens, rows of 6, 6 and 6 tokens


def _reference_loss(model: torch.nn.Module) -> torch.Tensor:
    """sum over every answer token of -log softmax(logits)[token], each sequence alone, float64, / #answer tokens."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
        ids = torch.tensor([prompt + answer])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for offset, token in enumerate(answer):
            total = total - log_probs[len(prompt) - 1 + offset, token]  # position t predicts token t + 1
        count += len(answer)
    return total / count


def test_loss_and_gradients_equal_the_unpadded_float64_reference():
    model = build_tiny_qwen3(seed=3)
    reference = copy.deepcopy(model).double()
    loss = answer_sft_loss(model, PROMPTS, ANSWERS, pad_id=1)  # a pad id that is no answer token: masked out
    want = _reference_loss(reference)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    loss.backward()
    want.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_id_does_not_change_the_loss():
    model = build_tiny_qwen3(seed=3)
    a = answer_sft_loss(model, PROMPTS, ANSWERS, pad_id=0)
    b = answer_sft_loss(model, PROMPTS, ANSWERS, pad_id=99)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


def test_bad_batches_name_the_row():
    model = build_tiny_qwen3(seed=3)
    with pytest.raises(ValueError, match="2 prompts and 1 answers"):
        answer_sft_loss(model, [[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="row 1: needs >= 1 prompt and >= 1 answer token, got 1 and 0"):
        answer_sft_loss(model, [[1], [2]], [[3], []], pad_id=0)
