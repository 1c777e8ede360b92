"""Context-parallel THD attention: every rank's output and q/k/v gradients == the unsplit reference, then split.

The reference is :func:`packed_causal_attention_reference` on the whole micro-batch (one causal SDPA per
sequence, itself tested against a float64 block-diagonal mask); the CP side gathers key prefixes by
index arithmetic and runs bottom-right-aligned attention per chunk, a different code path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_gloo_ranks
from rlkit.parallel.context import cp_split, cp_token_indices, cp_unsplit
from rlkit.parallel.megatron.attention import packed_causal_attention, packed_causal_attention_reference
from rlkit.parallel.megatron.context_parallel import (
    context_parallel_attention,
    cp_attention_plan,
    cp_local_attention,
    cp_local_positions,
)

# Sequences of different lengths (multiples of 2 cp), an empty one, and GQA 6 query heads over 2 kv heads.
CHUNKS = [3, 1, 0, 5, 2]


def _problem(cp_size: int, *, hq: int = 6, hkv: int = 2, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [2 * cp_size * c for c in CHUNKS]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad_out = torch.randn(total, hq, d, generator=gen, dtype=torch.float64)
    return q, k, v, cu, grad_out


def _reference(q, k, v, cu, grad_out):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = packed_causal_attention_reference(q, k, v, cu)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), grads


def test_plan_selects_each_chunks_key_prefix():
    """Gathered row kv_index[m] holds global position p; hand-listed prefixes [start, start + end of chunk)."""
    cp_size = 2
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)  # lengths 8, 4, 12: chunks of 2, 1, 3 tokens
    gathered_positions = torch.cat([cp_token_indices(cu, cp_size=cp_size, cp_rank=r) for r in range(cp_size)])
    # rank 0 holds chunks 0 and 3 of each sequence: its prefixes end after chunk 0 and after chunk 3
    expected = {
        0: [*range(0, 2), *range(0, 8), *range(8, 9), *range(8, 12), *range(12, 15), *range(12, 24)],
        # rank 1 holds chunks 1 and 2: prefixes end after chunk 1 and after chunk 2
        1: [*range(0, 4), *range(0, 6), *range(8, 10), *range(8, 11), *range(12, 18), *range(12, 21)],
    }
    prefix_lengths = {0: [2, 8, 1, 4, 3, 12], 1: [4, 6, 2, 3, 6, 9]}
    for rank in range(cp_size):
        plan = cp_attention_plan(cu, cp_size=cp_size, cp_rank=rank)
        assert gathered_positions[plan.kv_index].tolist() == expected[rank]
        assert plan.cu_seqlens_k.diff().tolist() == prefix_lengths[rank]
        assert plan.cu_seqlens_q.diff().tolist() == [2, 2, 1, 1, 3, 3]  # the rank's two chunks per sequence
        assert plan.max_seqlen_q == 3 and plan.max_seqlen_k == (2 * cp_size - rank) * 3


@pytest.mark.parametrize("cp_size", [1, 2, 3])
def test_local_positions_are_the_original_positions(cp_size):
    lengths = [2 * cp_size * c for c in CHUNKS]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    position = torch.cat([torch.arange(n) for n in lengths])  # position within its sequence, unsplit
    for rank in range(cp_size):
        got = cp_local_positions(cu, cp_size=cp_size, cp_rank=rank, num_local_tokens=sum(lengths) // cp_size)
        assert got.tolist() == position[cp_token_indices(cu, cp_size=cp_size, cp_rank=rank)].tolist()


@pytest.mark.parametrize("cp_size", [2, 3])
def test_local_attention_of_every_rank_equals_reference(cp_size):
    """All ranks simulated in one process: outputs and the gradients through the gather match."""
    q, k, v, cu, grad_out = _problem(cp_size)
    ref_out, ref_grads = _reference(q, k, v, cu, grad_out)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    gathered_k, gathered_v = (
        torch.cat([cp_split(x, cu, cp_size=cp_size, cp_rank=r, dim=0) for r in range(cp_size)]) for x in (k, v)
    )
    outs = []
    for rank in range(cp_size):
        plan = cp_attention_plan(cu, cp_size=cp_size, cp_rank=rank)
        local_q = cp_split(q, cu, cp_size=cp_size, cp_rank=rank, dim=0)
        outs.append(cp_local_attention(local_q, gathered_k, gathered_v, plan, backend="reference"))
    out = cp_unsplit(outs, cu, dim=0)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # float64 on both sides, the same terms summed in a different order: ~1e-15.
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bottom_right_prefix_attention_matches_float64_formula():
    """Queries = the last Lq of Lk positions: query j sees keys 0 .. j + Lk - Lq (explicit loop, float64)."""
    gen = torch.Generator().manual_seed(1)
    q_lens, k_lens = [2, 3, 1], [5, 3, 4]
    q = torch.randn(sum(q_lens), 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(k_lens), 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(k_lens), 2, 8, generator=gen, dtype=torch.float64)
    cu_q = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    out = packed_causal_attention(q, k, v, cu_q, cu_seqlens_k=cu_k)
    expected = torch.empty_like(q)
    for i, (lq, lk) in enumerate(zip(q_lens, k_lens, strict=True)):
        for j in range(lq):
            row = int(cu_q[i]) + j
            keys = slice(int(cu_k[i]), int(cu_k[i]) + j + lk - lq + 1)
            for h in range(4):
                weights = torch.softmax(k[keys, h // 2] @ q[row, h] / math.sqrt(8), dim=0)
                expected[row, h] = weights @ v[keys, h // 2]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="sequence 0 has 6 tokens, not a multiple of 2 \\* cp_size = 4"):
        cp_attention_plan(cu, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        cp_attention_plan(cu, cp_size=2, cp_rank=2)
    q = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="fewer keys than queries"):
        packed_causal_attention_reference(
            q, torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.tensor([0, 3]), cu_seqlens_k=torch.tensor([0, 2])
        )


WORLD = 2


def _worker(rank, results):
    q, k, v, cu, grad_out = _problem(WORLD)
    local = [cp_split(x, cu, cp_size=WORLD, cp_rank=rank, dim=0).requires_grad_() for x in (q, k, v)]
    out = context_parallel_attention(*local, cu, group=dist.group.WORLD, max_seqlen=int(cu.diff().max()))
    grads = torch.autograd.grad(out, local, cp_split(grad_out, cu, cp_size=WORLD, cp_rank=rank, dim=0))
    bad = None
    try:  # the local cu_seqlens instead of the full one: named
        local_cu = torch.tensor([0, q.shape[0] // WORLD], dtype=torch.int32)
        context_parallel_attention(*local, local_cu, group=dist.group.WORLD)
    except ValueError as err:
        bad = str(err)
    results[rank] = (out.detach(), [g.detach() for g in grads], bad)


def test_context_parallel_attention_on_two_gloo_ranks():
    """All-gather forward, reduce-scatter backward: per-rank outputs and q/k/v gradients == reference, split."""
    results = run_on_gloo_ranks(_worker, WORLD)
    q, k, v, cu, grad_out = _problem(WORLD)
    ref_out, ref_grads = _reference(q, k, v, cu, grad_out)
    for rank in range(WORLD):
        out, grads, bad = results[rank]
        ref_out_local, *ref_grads_local = (
            cp_split(x, cu, cp_size=WORLD, cp_rank=rank, dim=0) for x in (ref_out, *ref_grads)
        )
        torch.testing.assert_close(out, ref_out_local, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, ref_grads_local, strict=True):
            # k/v gradients are sums over both ranks' queries, reduced by gloo in float64
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert bad is not None and "pass the FULL micro-batch's cu_seqlens" in bad


def _gpu_problem(dtype):
    lengths = [4, 4 * 37, 4 * 100, 12, 4 * 128]  # multiples of 2 cp = 4, longest 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 128, generator=gen, device="cuda", dtype=dtype) for h in (16, 8, 8))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.gpu
def test_varlen_cp_path_matches_reference_on_gpu():
    """Both ranks of CP=2 in one process: varlen with q/k cu_seqlens (bottom-right causal) vs the reference."""
    from rlkit.parallel.megatron.attention import varlen_available

    dtype = torch.bfloat16
    if not varlen_available("cuda", dtype):
        pytest.skip("torch.nn.attention.varlen is not in this PyTorch")
    cp_size = 2
    q, k, v, cu = _gpu_problem(dtype)
    for t in (q, k, v):
        t.requires_grad_(True)
    ref = packed_causal_attention_reference(q, k, v, cu)
    gathered_k, gathered_v = (
        torch.cat([cp_split(x, cu, cp_size=cp_size, cp_rank=r, dim=0) for r in range(cp_size)]) for x in (k, v)
    )
    outs = []
    for rank in range(cp_size):
        plan = cp_attention_plan(cu.cuda(), cp_size=cp_size, cp_rank=rank, num_tokens=q.shape[0], max_seqlen=512)
        local_q = cp_split(q, cu, cp_size=cp_size, cp_rank=rank, dim=0)
        outs.append(cp_local_attention(local_q, gathered_k, gathered_v, plan, backend="varlen"))
    fast = cp_unsplit(outs, cu, dim=0)
    diff = (fast.float() - ref.float()).abs()
    print(f"CP=2 varlen vs reference bf16: max {diff.max():.3e} mean {diff.mean():.3e}")
    # Both round to bf16 once at the output; O(1) values -> a few ulp (bf16 ulp at 1 is 2**-7).
    assert float(diff.max()) < 2e-2 and float(diff.mean()) < 2e-3
    grad = torch.randn_like(fast)
    g_fast = torch.autograd.grad(fast, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert float((a.float() - b.float()).abs().max()) < 5e-2 * float(b.float().abs().max()) + 1e-2


@pytest.mark.gpu
def test_cp_plan_does_not_synchronise_the_gpu():
    """With num_tokens and max_seqlen given, the plan is device arithmetic only (no device-to-host read)."""
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = cp_attention_plan(cu, cp_size=2, cp_rank=1, num_tokens=24, max_seqlen=12)
        positions = cp_local_positions(cu, cp_size=2, cp_rank=1, num_local_tokens=12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert plan.kv_index.is_cuda and plan.cu_seqlens_k.diff().tolist() == [4, 6, 2, 3, 6, 9]
    assert positions.tolist() == [2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7, 8]  # chunks 1 and 2 of each sequence
