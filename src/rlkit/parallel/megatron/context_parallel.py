"""Context-parallel (CP) causal attention over THD-packed sequences: all-gather K/V, in plain torch.

The technique
-------------
Under CP the ``cp`` ranks of a group share one packed micro-batch. Every sequence of length ``n``
(a multiple of ``2 cp``) is cut into ``2 cp`` chunks of ``c = n / 2cp`` tokens and rank ``i`` holds
chunks ``i`` and ``2cp-1-i`` (the load-balanced split of :mod:`rlkit.parallel.context`, as in
Megatron-LM and Transformer Engine). Everything but attention is per token; attention needs, for a
query chunk at positions ``[a, b)`` of sequence ``s``, the keys and values ``[0, b)`` of ``s``.

Transformer Engine computes this with ring attention (K/V blocks passed around the ring, partial
softmaxes merged). Without TE this module does what Llama 3 does (Dubey et al. 2024, section 3.3.2):

1. all-gather K and V of the micro-batch over the CP group (one collective per layer, K and V
   concatenated; its backward is a reduce-scatter that sums every rank's key/value gradient back to
   the owner of the token);
2. for each local query chunk, select its key prefix ``[0, b)`` from the gathered tokens
   (:func:`cp_attention_plan` gives the rows, without host synchronisation on the GPU);
3. run causal varlen attention with separate query and key ``cu_seqlens``: chunk ``[a, b)`` is the
   *last* ``b - a`` positions of its key segment, so the causal mask is aligned bottom-right
   (:func:`rlkit.parallel.megatron.attention.packed_causal_attention` with ``cu_seqlens_k``).

Cost against ring attention, per layer and rank, for ``T`` tokens in the micro-batch, ``Hkv``
key/value heads of dimension ``D`` (GQA keeps ``Hkv`` small):

* communication: an all-gather of ``(cp-1)/cp * T * 2 Hkv D`` elements forward and a reduce-scatter
  of the same size backward: the volume ring attention sends in its ``cp - 1`` steps, but here it is
  not overlapped with compute.
* memory: the gathered K/V (``T * 2 Hkv D``) and the key prefixes the kernel reads and saves for
  backward (``(2cp+1)/2cp * T * 2 Hkv D``: a rank's two chunks need overlapping prefixes), where
  ring attention holds ``O(T / cp)`` key/value tokens at a time. Queries and outputs stay ``T / cp``.
* compute: the same causal FLOPs as ring attention, balanced across ranks by the chunk split.

Shape legend: ``T`` tokens of the micro-batch (all ranks), ``T / cp`` local tokens, ``N`` sequences,
``Hq`` query heads, ``Hkv`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from rlkit.parallel.megatron.attention import Backend, packed_causal_attention


@dataclasses.dataclass(frozen=True)
class CpAttentionPlan:
    """Which gathered keys each local query chunk attends to, in varlen terms.

    Local queries form ``2N`` segments (chunks ``i`` and ``2cp-1-i`` of every sequence, in the local
    order of :func:`rlkit.parallel.context.cp_token_indices`); key segment ``m`` is the prefix of its
    sequence up to the end of query chunk ``m``.

    Attributes:
        kv_index: ``[Tk]`` int64 rows of the rank-major gathered K/V (rank ``r``'s local tokens at rows
            ``r T/cp .. (r+1) T/cp - 1``) forming the key segments, ``Tk = (2cp+1) T / 2cp``.
        cu_seqlens_q: ``[2N + 1]`` int32 cumulative query chunk lengths (``cu_seqlens_q[-1] == T / cp``).
        cu_seqlens_k: ``[2N + 1]`` int32 cumulative key prefix lengths (``cu_seqlens_k[-1] == Tk``).
        max_seqlen_q: an upper bound of the query chunk lengths.
        max_seqlen_k: an upper bound of the key prefix lengths.
    """

    kv_index: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def cp_attention_plan(
    cu_seqlens: Tensor,
    *,
    cp_size: int,
    cp_rank: int,
    num_tokens: int | None = None,
    max_seqlen: int | None = None,
) -> CpAttentionPlan:
    """The key prefixes of CP rank ``cp_rank``'s query chunks, as rows of the all-gathered K/V.

    A key at offset ``o`` of sequence ``s`` (chunk ``j = o // c``, ``c = n_s / 2cp``) lives on rank
    ``r = j`` if ``j < cp`` else ``2cp-1-j``, at local slot ``start_s / cp + (0 if j < cp else c) + o % c``,
    hence at gathered row ``r T/cp + slot``. Built from tensor arithmetic on the device of
    ``cu_seqlens`` (no host synchronisation when ``num_tokens`` and ``max_seqlen`` are given).

    Args:
        cu_seqlens: ``[N + 1]`` int cumulative lengths of the FULL (all ranks) packed micro-batch, every
            length a multiple of ``2 * cp_size``.
        cp_size: context-parallel size.
        cp_rank: this rank in ``[0, cp_size)``.
        num_tokens: ``T = cu_seqlens[-1]`` (read from ``cu_seqlens`` when ``None``).
        max_seqlen: an upper bound of the sequence lengths (read from ``cu_seqlens`` when ``None``).

    Returns:
        A :class:`CpAttentionPlan`.

    Raises:
        ValueError: for a bad ``cp_size``/``cp_rank``, or (``cu_seqlens`` on the CPU) a sequence length
            that is not a multiple of ``2 * cp_size``.
    """
    if not isinstance(cp_size, int) or cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(
            f"cp_size={cp_size!r}, cp_rank={cp_rank!r}: need an int cp_size >= 1 and 0 <= cp_rank < cp_size"
        )
    cu = cu_seqlens.to(torch.long)
    lens = cu[1:] - cu[:-1]
    if not cu.is_cuda:
        bad = torch.nonzero(lens % (2 * cp_size)).flatten()
        if len(bad):
            raise ValueError(
                f"sequence {int(bad[0])} has {int(lens[bad[0]])} tokens, not a multiple of 2 * cp_size = "
                f"{2 * cp_size}: pack with seq_multiple=2*cp (rlkit.parallel.layouts.padding_multiples)"
            )
    if num_tokens is None:
        num_tokens = int(cu[-1])
    if max_seqlen is None:
        max_seqlen = int(lens.max()) if len(lens) else 0
    if num_tokens % (2 * cp_size):
        raise ValueError(f"num_tokens={num_tokens} is not a multiple of 2 * cp_size = {2 * cp_size}")
    chunk = lens // (2 * cp_size)  # [N]
    q_lens = torch.stack([chunk, chunk], dim=1).flatten()  # [2N]: chunks i and 2cp-1-i
    k_lens = torch.stack([(cp_rank + 1) * chunk, (2 * cp_size - cp_rank) * chunk], dim=1).flatten()
    zero = cu.new_zeros(1)
    cu_q = torch.cat([zero, q_lens.cumsum(0)])
    cu_k = torch.cat([zero, k_lens.cumsum(0)])
    num_keys = (2 * cp_size + 1) * (num_tokens // (2 * cp_size))
    # output_size spares repeat_interleave a device-to-host read of the total.
    segment = torch.arange(len(k_lens), device=cu.device).repeat_interleave(k_lens, output_size=num_keys)
    offset = torch.arange(num_keys, device=cu.device) - cu_k[:-1][segment]  # position within the sequence
    seq = segment // 2
    seq_chunk = chunk[seq]
    j = offset // seq_chunk
    early = j < cp_size
    owner = torch.where(early, j, 2 * cp_size - 1 - j)
    slot = cu[:-1][seq] // cp_size + torch.where(early, 0, seq_chunk) + offset - j * seq_chunk
    max_chunk = math.ceil(max_seqlen / (2 * cp_size))
    return CpAttentionPlan(
        kv_index=owner * (num_tokens // cp_size) + slot,
        cu_seqlens_q=cu_q.to(torch.int32),
        cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=max_chunk,
        max_seqlen_k=(2 * cp_size - cp_rank) * max_chunk,
    )


def cp_local_positions(cu_seqlens: Tensor, *, cp_size: int, cp_rank: int, num_local_tokens: int) -> Tensor:
    """Position within its sequence of each local token of CP rank ``cp_rank`` (for rotary embeddings).

    The local stream holds, per sequence (``c`` tokens per chunk), chunk ``i`` then chunk ``2cp-1-i``;
    local offset ``o`` maps to position ``i c + o`` when ``o < c``, else ``(2cp-1-i) c + o - c``. Equal
    to ``cp_token_indices(...) - cu_seqlens[seq]``, computed on the device of ``cu_seqlens`` without a
    host synchronisation (megatron-core's unfused THD RoPE reads ``cu_seqlens`` back per layer).

    Args:
        cu_seqlens: ``[N + 1]`` cumulative lengths of the FULL micro-batch, each a multiple of ``2 cp``.
        cp_size: context-parallel size.
        cp_rank: this rank.
        num_local_tokens: ``T / cp``.

    Returns:
        ``[T / cp]`` int64 positions.
    """
    cu = cu_seqlens.to(torch.long)
    local_starts = cu // cp_size
    slots = torch.arange(num_local_tokens, device=cu.device)
    # The last local start <= slot: empty sequences share their start with the next one and are skipped.
    seq = torch.searchsorted(local_starts, slots, right=True) - 1
    offset = slots - local_starts[seq]
    chunk = (cu[1:] - cu[:-1])[seq] // (2 * cp_size)
    late = offset >= chunk
    return torch.where(late, (2 * cp_size - 1 - cp_rank) * chunk + offset - chunk, cp_rank * chunk + offset)


def cp_local_attention(
    query: Tensor,
    gathered_key: Tensor,
    gathered_value: Tensor,
    plan: CpAttentionPlan,
    *,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """One CP rank's causal attention, given every rank's keys and values (no communication).

    ``out[t] = sum_{u in seq(t), pos(u) <= pos(t)} softmax_u(scale * q_t . k_u) v_u`` over the whole
    sequence, although only the rank's queries are here.

    Args:
        query: ``[T / cp, Hq, D]`` the rank's queries in its local order.
        gathered_key: ``[T, Hkv, D]`` rank-major: rank ``r``'s local keys at rows ``r T/cp ...``.
        gathered_value: ``[T, Hkv, D]`` the same for values.
        plan: from :func:`cp_attention_plan` for this rank.
        softmax_scale: ``1 / sqrt(D)`` when ``None``.
        backend: as :func:`~rlkit.parallel.megatron.attention.packed_causal_attention`.

    Returns:
        ``[T / cp, Hq, D]``.
    """
    return packed_causal_attention(
        query,
        gathered_key.index_select(0, plan.kv_index),
        gathered_value.index_select(0, plan.kv_index),
        plan.cu_seqlens_q,
        max_seqlen=plan.max_seqlen_q,
        cu_seqlens_k=plan.cu_seqlens_k,
        max_seqlen_k=plan.max_seqlen_k,
        softmax_scale=softmax_scale,
        backend=backend,
    )


class _AllGatherTokens(torch.autograd.Function):
    """Forward: all-gather along dim 0 (rank-major). Backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        # Every rank's queries read this rank's keys: their gradients add up on the owner.
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_tokens(x: Tensor, group) -> Tensor:
    """``[L, ...]`` per rank -> ``[cp * L, ...]`` rank-major on every rank; the backward sums gradients to owners."""
    return _AllGatherTokens.apply(x, group)


def context_parallel_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    group,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Causal attention of this CP rank's packed tokens against their sequences' full prefixes.

    Every rank of ``group`` calls it with its local tokens (in
    :func:`rlkit.parallel.context.cp_token_indices` order). The result equals
    :func:`~rlkit.parallel.megatron.attention.packed_causal_attention` on the unsplit micro-batch
    followed by :func:`rlkit.parallel.context.cp_split`, and so do the gradients of ``query``, ``key``
    and ``value`` (the backward reduce-scatters key/value gradients to the ranks holding those tokens).

    Args:
        query: ``[T / cp, Hq, D]`` local queries.
        key: ``[T / cp, Hkv, D]`` local keys (after rotary embedding).
        value: ``[T / cp, Hkv, D]`` local values.
        cu_seqlens: ``[N + 1]`` int cumulative lengths of the FULL micro-batch, each a multiple of ``2 cp``.
        group: the CP process group.
        max_seqlen: longest sequence of the full micro-batch (passing it avoids a host sync).
        softmax_scale: ``1 / sqrt(D)`` when ``None``.
        backend: as :func:`~rlkit.parallel.megatron.attention.packed_causal_attention`.

    Returns:
        ``[T / cp, Hq, D]``.
    """
    if key.shape != value.shape or key.shape[0] != query.shape[0]:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}: "
            "need [T/cp, Hq, D] and two [T/cp, Hkv, D] with the same local token count"
        )
    cp_size = dist.get_world_size(group)
    num_tokens = cp_size * query.shape[0]
    if not cu_seqlens.is_cuda and int(cu_seqlens[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens[-1]={int(cu_seqlens[-1])} but {cp_size} ranks x {query.shape[0]} local tokens = "
            f"{num_tokens}: pass the FULL micro-batch's cu_seqlens (not the local one)"
        )
    plan = cp_attention_plan(
        cu_seqlens, cp_size=cp_size, cp_rank=dist.get_rank(group), num_tokens=num_tokens, max_seqlen=max_seqlen
    )
    heads_kv = key.shape[1]
    gathered = all_gather_tokens(torch.cat([key, value], dim=1), group)  # one collective for K and V
    return cp_local_attention(
        query,
        gathered[:, :heads_kv],
        gathered[:, heads_kv:],
        plan,
        softmax_scale=softmax_scale,
        backend=backend,
    )
