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

Both take and return the same shapes, so a GPU test compares them on the same inputs.

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


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor) -> None:
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"query must be [T, Hq, D] and key/value [T, Hkv, D]; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on T or D")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"Hq={query.shape[1]} query heads must be a multiple of Hkv={key.shape[1]} key/value heads")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_cuda:
        # Reading values would synchronise the GPU once per layer; megatron_forward builds them on the CPU.
        return
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu_seqlens.tolist()}")
    if int(cu_seqlens[-1]) != query.shape[0]:
        raise ValueError(f"cu_seqlens[-1]={int(cu_seqlens[-1])} must equal the packed length T={query.shape[0]}")


def packed_causal_attention_reference(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, *, softmax_scale: float | None = None
) -> Tensor:
    """Causal self-attention within each packed sequence, one SDPA call per sequence.

    ``out[t] = sum_{s in seq(t), s <= t} softmax_s(scale * q_t . k_s) v_s`` where ``seq(t)`` is the
    sequence holding token ``t``; key/value head ``g`` serves query heads ``g * Hq/Hkv ... (g+1) * Hq/Hkv - 1``
    (GQA, Ainslie et al. 2023), as in HF transformers' ``repeat_kv``.

    Args:
        query: ``[T, Hq, D]`` float.
        key: ``[T, Hkv, D]``, same dtype.
        value: ``[T, Hkv, D]``, same dtype.
        cu_seqlens: ``[N + 1]`` int cumulative sequence lengths, ``cu_seqlens[-1] == T``.
        softmax_scale: ``1 / sqrt(D)`` when ``None``.

    Returns:
        ``[T, Hq, D]`` in the dtype of ``query``.
    """
    _check_inputs(query, key, value, cu_seqlens)
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        # [L, H, D] -> [H, L, D]: SDPA wants heads before positions.
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.cache
def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` and its keyword names, or ``None`` on PyTorch < 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


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
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Causal attention within packed sequences: PyTorch's varlen kernel, or the reference.

    Same formula, arguments and result as :func:`packed_causal_attention_reference`.

    Args:
        query: ``[T, Hq, D]``.
        key: ``[T, Hkv, D]``.
        value: ``[T, Hkv, D]``.
        cu_seqlens: ``[N + 1]`` int32 cumulative sequence lengths.
        max_seqlen: longest sequence (computed from ``cu_seqlens`` when ``None``; passing it avoids a sync).
        softmax_scale: ``1 / sqrt(D)`` when ``None``.
        backend: ``"auto"`` (varlen on CUDA with fp16/bf16, else the reference), ``"reference"``, ``"varlen"``.

    Returns:
        ``[T, Hq, D]``.
    """
    if backend not in ("auto", "reference", "varlen"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'reference' or 'varlen'")
    use_varlen = backend == "varlen" or (backend == "auto" and varlen_available(query.device, query.dtype))
    if not use_varlen:
        return packed_causal_attention_reference(query, key, value, cu_seqlens, softmax_scale=softmax_scale)
    found = _varlen_attn()
    if found is None:
        raise RuntimeError(
            f"backend='varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10); this is torch {torch.__version__}"
        )
    _check_inputs(query, key, value, cu_seqlens)
    varlen_attn, params = found
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
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
    return varlen_attn(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


def packed_core_attention_class():
    """Defined lazily: it subclasses megatron-core's ``MegatronModule``."""
    megatron_module = require("megatron.core.transformer.module", purpose="the packed core attention").MegatronModule

    class PackedCoreAttention(megatron_module):
        """Core attention for megatron-core's local spec that accepts THD-packed or padded input.

        Drop-in for ``DotProductAttention`` (same constructor), causal only. Under tensor
        parallelism it sees the rank's local heads; the formula does not change.
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
            if config.context_parallel_size > 1:
                raise ValueError(f"context_parallel_size={config.context_parallel_size} is not supported yet; use 1")
            if attn_mask_type.name != "causal":
                raise ValueError(f"attn_mask_type={attn_mask_type.name}: PackedCoreAttention is causal only")
            self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
            self.current_max_attn_logits = None

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
            """``[T, Hq, D]`` (THD) -> ``[T, Hq * D]``, or ``[S, B, Hq, D]`` (padded) -> ``[S, B, Hq * D]``."""
            if attention_bias is not None:
                raise ValueError("attention_bias is not supported by PackedCoreAttention")
            if packed_seq_params is not None:
                if packed_seq_params.qkv_format != "thd":
                    raise ValueError(f"qkv_format={packed_seq_params.qkv_format!r}: only 'thd' packing is supported")
                out = packed_causal_attention(
                    query,
                    key,
                    value,
                    packed_seq_params.cu_seqlens_q,
                    max_seqlen=packed_seq_params.max_seqlen_q,
                    softmax_scale=self.softmax_scale,
                )
                return out.reshape(out.shape[0], -1)
            # Right-padded rows under a causal mask: padding never reaches a real token, so no padding mask.
            if attention_mask is not None:
                raise ValueError("pass attention_mask=None: PackedCoreAttention applies the causal mask itself")
            seq, batch, heads, dim = query.shape
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, H, S, D]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
            )
            return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

    return PackedCoreAttention
