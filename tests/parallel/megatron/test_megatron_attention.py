"""Packed (THD) causal attention: the reference against an explicit float64 block-diagonal formula, and varlen."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.parallel.megatron.attention import (
    packed_causal_attention,
    packed_causal_attention_reference,
    varlen_available,
)


def _float64_block_causal(q, k, v, lengths, scale):
    """Independent formula: one [T, T] mask, allowed iff same sequence and key position <= query position."""
    q, k, v = q.double(), k.double(), v.double()
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(q.shape[0])
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        g = h // groups  # query head h reads key/value head h // (Hq/Hkv), HF repeat_kv order
        scores = scale * q[:, h] @ k[:, g].T
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, g]
    return out


def _inputs(lengths, hq=4, hkv=2, d=8, dtype=torch.float32, device="cpu"):
    total = sum(lengths)
    q = torch.randn(total, hq, d, dtype=dtype, device=device)
    k = torch.randn(total, hkv, d, dtype=dtype, device=device)
    v = torch.randn(total, hkv, d, dtype=dtype, device=device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("lengths", [[5], [3, 7, 1, 4], [1, 1, 1], [16, 2]])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_reference_matches_float64_block_diagonal_mask(lengths, heads):
    q, k, v, cu = _inputs(lengths, hq=heads[0], hkv=heads[1])
    scale = 1 / math.sqrt(q.shape[-1])
    out = packed_causal_attention_reference(q, k, v, cu)
    # fp32 SDPA against a float64 softmax over <= 16 keys: error ~ a few ulp of O(1) values.
    torch.testing.assert_close(out.double(), _float64_block_causal(q, k, v, lengths, scale), rtol=1e-5, atol=1e-5)


def test_first_token_of_each_sequence_sees_only_itself():
    # Hand-worked: with one key in view the softmax weight is exactly 1, so out[start] == v[start] (per GQA group).
    q, k, v, cu = _inputs([3, 4], hq=2, hkv=1)
    out = packed_causal_attention_reference(q, k, v, cu)
    for start in (0, 3):
        torch.testing.assert_close(out[start], v[start].expand(2, -1), rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_reordering_sequences_reorders_output(lengths, rnd):
    """A sequence's output depends only on its own tokens: packing order is irrelevant."""
    q, k, v, cu = _inputs(lengths)
    order = list(range(len(lengths)))
    rnd.shuffle(order)
    starts = cu[:-1].tolist()
    pieces = [slice(starts[i], starts[i] + lengths[i]) for i in order]
    perm_lengths = [lengths[i] for i in order]
    perm_cu = torch.tensor([0, *torch.tensor(perm_lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = packed_causal_attention_reference(q, k, v, cu)
    out_perm = packed_causal_attention_reference(
        torch.cat([q[s] for s in pieces]), torch.cat([k[s] for s in pieces]), torch.cat([v[s] for s in pieces]), perm_cu
    )
    torch.testing.assert_close(out_perm, torch.cat([out[s] for s in pieces]), rtol=1e-6, atol=1e-6)


def test_auto_is_reference_on_cpu_and_bad_inputs_are_named():
    q, k, v, cu = _inputs([4, 4])
    assert not varlen_available("cpu", torch.bfloat16)
    torch.testing.assert_close(packed_causal_attention(q, k, v, cu), packed_causal_attention_reference(q, k, v, cu))
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]=7 must equal"):
        packed_causal_attention_reference(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of Hkv=3"):
        packed_causal_attention_reference(q, torch.randn(8, 3, 8), torch.randn(8, 3, 8), cu)
    with pytest.raises(ValueError, match="backend='flash'"):
        packed_causal_attention(q, k, v, cu, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_matches_reference_on_gpu(dtype):
    if not varlen_available("cuda", dtype):
        pytest.skip("torch.nn.attention.varlen is not in this PyTorch")
    lengths = [1, 37, 200, 5, 511]
    q, k, v, cu = _inputs(lengths, hq=16, hkv=8, d=128, dtype=dtype, device="cuda")
    for t in (q, k, v):
        t.requires_grad_(True)
    fast = packed_causal_attention(q, k, v, cu, max_seqlen=511, backend="varlen")
    ref = packed_causal_attention_reference(q, k, v, cu)
    diff = (fast.float() - ref.float()).abs()
    print(f"varlen vs reference {dtype}: max {diff.max():.3e} mean {diff.mean():.3e}")
    # Both round to bf16/fp16 once at the output; O(1) values -> a few ulp (bf16 ulp at 1 is 2**-7).
    assert float(diff.max()) < 2e-2 and float(diff.mean()) < 2e-3
    grad = torch.randn_like(fast)
    g_fast = torch.autograd.grad(fast, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert float((a.float() - b.float()).abs().max()) < 5e-2 * float(b.float().abs().max()) + 1e-2


def test_bottom_right_probe_tells_the_two_alignments_apart(monkeypatch):
    """The one-off probe run before varlen serves queries shorter than keys, fed both mask alignments."""
    import torch.nn.functional as F

    from rlkit.parallel.megatron import attention

    def bottom_right(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return packed_causal_attention_reference(q, k, v, cu_q, cu_seqlens_k=cu_k, softmax_scale=scale)

    def top_left(q, k, v, cu_q, cu_k, max_q, max_k, scale):  # SDPA's is_causal with Lq < Lk
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)

    probe = attention._require_bottom_right_causal.__wrapped__
    monkeypatch.setattr(attention, "_call_varlen", bottom_right)
    probe(torch.device("cpu"))
    monkeypatch.setattr(attention, "_call_varlen", top_left)
    with pytest.raises(RuntimeError, match="aligns its causal mask top-left"):
        probe(torch.device("cpu"))
