"""Causal attention over THD-packed sequences: a pure-torch reference and PyTorch's varlen kernel.

The technique
-------------
A packed micro-batch concatenates ``N`` sequences into one stream of ``T`` tokens (see
:mod:`rlkit.parallel.layouts`); ``cu_seqlens`` (``[N + 1]``, int32) marks where each starts. Attention
must be causal *within* a sequence and never cross into a neighbour: a block-diagonal causal mask.
Transformer Engine and flash-attention do this without materialising the mask (``varlen`` kernels).
megatron-core's local layer spec has no THD path, so this module supplies one:

* :func:`packed_causal_attention_reference` runs ``scaled_dot_product_attention`` once per sequence.
  It is the specification and the CPU path.
* :func:`packed_causal_attention` dispatches to ``torch.nn.attention.varlen.varlen_attn`` (PyTorch
  >= 2.10, flash-attention on CUDA, fp16/bf16) when it can, and to the reference otherwise.

Both take and return the same shapes, so a GPU test compares them on the same inputs. Both also
accept separate key ``cu_seqlens_k`` (queries are then the last positions of each key segment, the
causal mask aligned bottom-right), which context parallelism uses to attend a query chunk to its key
prefix (:mod:`rlkit.parallel.megatron.context_parallel`).

Shape legend: ``T`` packed tokens, ``Hq`` query heads, ``Hkv`` key/value heads (GQA groups), ``D`` head dim.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit._optional import require

Backend = Literal["auto", "reference", "varlen"]


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, cu_seqlens_k: Tensor | None) -> None:
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"query must be [T, Hq, D] and key/value [T, Hkv, D]; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on D")
    if cu_seqlens_k is None and query.shape[0] != key.shape[0]:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on T; "
            "pass cu_seqlens_k when keys and queries are packed differently"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"Hq={query.shape[1]} query heads must be a multiple of Hkv={key.shape[1]} key/value heads")
    for name, cu, total in (("cu_seqlens", cu_seqlens, query.shape[0]), ("cu_seqlens_k", cu_seqlens_k, key.shape[0])):
        if cu is None:
            continue
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-D [N + 1], got shape {tuple(cu.shape)}")
        if cu.is_cuda:
            # Reading values would synchronise the GPU once per layer; trust the caller there.
            continue
        if int(cu[0]) != 0:
            raise ValueError(f"{name} must start at 0, got {cu.tolist()}")
        if int(cu[-1]) != total:
            raise ValueError(f"{name}[-1]={int(cu[-1])} must equal the packed length T={total}")
    if cu_seqlens_k is not None and not cu_seqlens_k.is_cuda:
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(
                f"cu_seqlens {tuple(cu_seqlens.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} differ"
            )
        short = torch.nonzero(cu_seqlens_k.diff() < cu_seqlens.to(cu_seqlens_k.device).diff()).flatten()
        if len(short):
            raise ValueError(f"segment {int(short[0])} has fewer keys than queries: a causal query needs its own key")


def packed_causal_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    cu_seqlens_k: Tensor | None = None,
    softmax_scale: float | None = None,
) -> Tensor:
    """Causal self-attention within each packed sequence, one SDPA call per sequence.

    ``out[t] = sum_{s in seq(t), s <= t} softmax_s(scale * q_t . k_s) v_s`` where ``seq(t)`` is the
    sequence holding token ``t``; key/value head ``g`` serves query heads ``g * Hq/Hkv ... (g+1) * Hq/Hkv - 1``
    (GQA, Ainslie et al. 2023), as in HF transformers' ``repeat_kv``.

    With ``cu_seqlens_k``, queries and keys are packed separately: segment ``i`` has ``Lq_i`` queries
    and ``Lk_i >= Lq_i`` keys, and the queries are the *last* ``Lq_i`` positions of the segment
    (the causal mask is aligned bottom-right, as in flash-attention >= 2.1): query ``j`` sees keys
    ``0 .. j + Lk_i - Lq_i``. Context parallelism uses this for a query chunk against its key prefix.

    Args:
        query: ``[Tq, Hq, D]`` float.
        key: ``[Tk, Hkv, D]``, same dtype (``Tk == Tq`` without ``cu_seqlens_k``).
        value: ``[Tk, Hkv, D]``, same dtype.
        cu_seqlens: ``[N + 1]`` int cumulative sequence lengths of the queries, ``cu_seqlens[-1] == Tq``
            (and of the keys when ``cu_seqlens_k`` is ``None``).
        cu_seqlens_k: ``[N + 1]`` int cumulative key lengths, ``cu_seqlens_k[-1] == Tk``.
        softmax_scale: ``1 / sqrt(D)`` when ``None``.

    Returns:
        ``[Tq, Hq, D]`` in the dtype of ``query``.
    """
    _check_inputs(query, key, value, cu_seqlens, cu_seqlens_k)
    groups = query.shape[1] // key.shape[1]
    q_bounds = cu_seqlens.tolist()
    k_bounds = q_bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    outs = []
    for i in range(len(q_bounds) - 1):
        q_len, k_len = q_bounds[i + 1] - q_bounds[i], k_bounds[i + 1] - k_bounds[i]
        if q_len == 0:
            continue
        # [L, H, D] -> [H, L, D]: SDPA wants heads before positions.
        q = query[q_bounds[i] : q_bounds[i + 1]].transpose(0, 1)
        k = key[k_bounds[i] : k_bounds[i + 1]].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[k_bounds[i] : k_bounds[i + 1]].transpose(0, 1).repeat_interleave(groups, dim=0)
        if q_len == k_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
        else:
            # SDPA's is_causal is aligned top-left when q_len < k_len; the bottom-right mask is explicit.
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
        outs.append(out.transpose(0, 1))
    if not outs:
        return query.new_zeros(query.shape)
    return torch.cat(outs, dim=0)


@functools.cache
def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` and its keyword names, or ``None`` on PyTorch < 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN_PARAMS: frozenset[str] = _varlen_attn()[1] if _varlen_attn() is not None else frozenset()


def varlen_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether :func:`packed_causal_attention` would run PyTorch's varlen kernel for this device and dtype."""
    on_cuda = torch.device(device).type == "cuda"
    return _varlen_attn() is not None and on_cuda and dtype in (torch.float16, torch.bfloat16)


def packed_causal_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    max_seqlen: int | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Causal attention within packed sequences: PyTorch's varlen kernel, or the reference.

    Same formula, arguments and result as :func:`packed_causal_attention_reference`.

    Args:
        query: ``[Tq, Hq, D]``.
        key: ``[Tk, Hkv, D]``.
        value: ``[Tk, Hkv, D]``.
        cu_seqlens: ``[N + 1]`` int32 cumulative sequence lengths (of the queries when ``cu_seqlens_k`` is given).
        max_seqlen: longest query segment (computed from ``cu_seqlens`` when ``None``; passing it avoids a sync).
        cu_seqlens_k: ``[N + 1]`` cumulative key lengths; queries are the last positions of their segment.
        max_seqlen_k: longest key segment (``max_seqlen`` without ``cu_seqlens_k``).
        softmax_scale: ``1 / sqrt(D)`` when ``None``.
        backend: ``"auto"`` (varlen on CUDA with fp16/bf16, else the reference), ``"reference"``, ``"varlen"``.

    Returns:
        ``[Tq, Hq, D]``.
    """
    if backend not in ("auto", "reference", "varlen"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'reference' or 'varlen'")
    use_varlen = backend == "varlen" or (backend == "auto" and varlen_available(query.device, query.dtype))
    if not use_varlen:
        return packed_causal_attention_reference(
            query, key, value, cu_seqlens, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale
        )
    found = _varlen_attn()
    if found is None:
        raise RuntimeError(
            f"backend='varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10); this is torch {torch.__version__}"
        )
    _check_inputs(query, key, value, cu_seqlens, cu_seqlens_k)
    cu_q = cu_seqlens.to(device=query.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_q[1:] - cu_q[:-1]).max())
    if cu_seqlens_k is None:
        cu_k, max_seqlen_k = cu_q, max_seqlen
    else:
        _require_bottom_right_causal(query.device)
        cu_k = cu_seqlens_k.to(device=query.device, dtype=torch.int32)
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max())
    return _call_varlen(query, key, value, cu_q, cu_k, max_seqlen, max_seqlen_k, softmax_scale)


def _call_varlen(query, key, value, cu_q, cu_k, max_q: int, max_k: int, softmax_scale: float | None) -> Tensor:
    # Module attribute and a constant set, no cache wrapper or inspect call: torch.compile traces this
    # (rlkit.parallel.megatron.fused_layer calls it inside a compiled graph).
    varlen_attn, params = torch.nn.attention.varlen.varlen_attn, _VARLEN_PARAMS
    kwargs: dict = {"scale": softmax_scale}
    # The causal flag is `window_size=(-1, 0)` in newer releases and `is_causal=True` in the first one.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.cache
def _require_bottom_right_causal(device: torch.device) -> None:
    """Check once per device that varlen's causal mask is aligned bottom-right when ``Lq < Lk``.

    flash-attention >= 2.1 aligns it bottom-right (the last query sees every key); SDPA's ``is_causal``
    aligns it top-left. One query against two keys with equal scores tells them apart: bottom-right
    averages both values, top-left returns the first.
    """
    q = torch.zeros(1, 1, 8, device=device, dtype=torch.bfloat16)
    k = torch.zeros(2, 1, 8, device=device, dtype=torch.bfloat16)
    v = torch.stack([torch.zeros(1, 8), torch.ones(1, 8)]).to(device=device, dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 2], dtype=torch.int32, device=device)
    seen = float(_call_varlen(q, k, v, cu_q, cu_k, 1, 2, None).float().mean())
    if abs(seen - 0.5) > 1e-3:
        raise RuntimeError(
            f"torch {torch.__version__}'s varlen_attn aligns its causal mask top-left when queries are fewer "
            f"than keys (probe gave {seen}, bottom-right gives 0.5); context-parallel attention needs "
            "bottom-right: pass backend='reference'"
        )


@functools.cache
def packed_core_attention_class():
    """Defined lazily: it subclasses megatron-core's ``MegatronModule``."""
    megatron_module = require("megatron.core.transformer.module", purpose="the packed core attention").MegatronModule

    class PackedCoreAttention(megatron_module):
        """Core attention for megatron-core's local spec that accepts THD-packed or padded input.

        Drop-in for ``DotProductAttention`` (same constructor), causal only. Under tensor
        parallelism it sees the rank's local heads; the formula does not change. Under context
        parallelism (``config.context_parallel_size > 1``, the group from ``pg_collection.cp`` or
        megatron's ``parallel_state``) it runs
        :func:`rlkit.parallel.megatron.context_parallel.context_parallel_attention` (all-gather K/V).
        """

        def __init__(
            self,
            config,
            layer_number: int,
            attn_mask_type,
            attention_type: str,
            attention_dropout: float | None = None,
            softmax_scale: float | None = None,
            cp_comm_type: str | None = None,
            pg_collection=None,
        ):
            super().__init__(config=config)
            if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
                raise ValueError("PackedCoreAttention has no dropout; set attention_dropout=0.0")
            if attn_mask_type.name != "causal":
                raise ValueError(f"attn_mask_type={attn_mask_type.name}: PackedCoreAttention is causal only")
            self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
            self.current_max_attn_logits = None
            # CP is all-gather attention whatever cp_comm_type says (TE's p2p/a2a kernels are absent).
            self.cp_group = None
            if config.context_parallel_size > 1:
                cp_group = getattr(pg_collection, "cp", None)
                if cp_group is None:
                    parallel_state = require("megatron.core.parallel_state", purpose="context parallelism")
                    cp_group = parallel_state.get_context_parallel_group()
                if cp_group.size() != config.context_parallel_size:
                    raise ValueError(
                        f"the CP process group has {cp_group.size()} ranks but context_parallel_size="
                        f"{config.context_parallel_size}: initialise megatron's parallel_state with the same size"
                    )
                self.cp_group = cp_group

        def forward(
            self,
            query: Tensor,
            key: Tensor,
            value: Tensor,
            attention_mask: Tensor | None,
            attn_mask_type=None,
            attention_bias: Tensor | None = None,
            packed_seq_params=None,
        ) -> Tensor:
            """``[T, Hq, D]`` (THD) -> ``[T, Hq * D]``, or ``[S, B, Hq, D]`` (padded) -> ``[S, B, Hq * D]``.

            Under context parallelism ``T`` and ``S`` are the rank's local tokens (in
            :func:`rlkit.parallel.context.cp_token_indices` order), and ``packed_seq_params`` carries the
            FULL micro-batch's ``cu_seqlens`` and ``max_seqlen``, as megatron-core with TE expects.
            """
            if attention_bias is not None:
                raise ValueError("attention_bias is not supported by PackedCoreAttention")
            if packed_seq_params is not None:
                if packed_seq_params.qkv_format != "thd":
                    raise ValueError(f"qkv_format={packed_seq_params.qkv_format!r}: only 'thd' packing is supported")
                if packed_seq_params.local_cp_size is not None:
                    raise ValueError("PackedSeqParams.local_cp_size (dynamic CP) is not supported; leave it None")
                # Padding sits at the end of a sequence, so under a causal mask the padded boundaries
                # give real tokens the same result; megatron's RoPE splits by them too.
                cu = packed_seq_params.cu_seqlens_q_padded
                if cu is None:
                    cu = packed_seq_params.cu_seqlens_q
                out = self._attend(query, key, value, cu, packed_seq_params.max_seqlen_q)
                return out.reshape(out.shape[0], -1)
            # Right-padded rows under a causal mask: padding never reaches a real token, so no padding mask.
            if attention_mask is not None:
                raise ValueError("pass attention_mask=None: PackedCoreAttention applies the causal mask itself")
            seq, batch, heads, dim = query.shape
            if self.cp_group is not None:
                # Each row is one sequence of cp * S tokens, split like a packed one: attend as THD.
                q, k, v = (x.transpose(0, 1).reshape(batch * seq, x.shape[2], dim) for x in (query, key, value))
                cu = torch.arange(batch + 1, dtype=torch.int32, device=query.device) * (seq * self.cp_group.size())
                out = self._attend(q, k, v, cu, seq * self.cp_group.size())
                return out.reshape(batch, seq, heads * dim).transpose(0, 1)
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, H, S, D]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
            )
            return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

        def _attend(self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, max_seqlen) -> Tensor:
            if self.cp_group is None:
                return packed_causal_attention(
                    query, key, value, cu_seqlens, max_seqlen=max_seqlen, softmax_scale=self.softmax_scale
                )
            from rlkit.parallel.megatron.context_parallel import context_parallel_attention

            return context_parallel_attention(
                query,
                key,
                value,
                cu_seqlens,
                group=self.cp_group,
                max_seqlen=max_seqlen,
                softmax_scale=self.softmax_scale,
            )

    return PackedCoreAttention
