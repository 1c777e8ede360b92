"""Forward functions for the train step: a micro-batch in, logits out (megatron-core ``GPTModel`` or HF).

:func:`megatron_forward` feeds THD-packed micro-batches through ``PackedSeqParams`` (or padded rows), and
:func:`hf_forward` feeds padded rows to an HF transformers model (the reference backend). Both stage the
micro-batch's tensors on the model's device; :func:`host_to_device` does so without making the host wait
for the GPU, which matters when the host launches work for many small micro-batches.

Shape legend: ``T`` packed tokens, ``B`` rows, ``S`` padded row length, ``V'`` padded vocabulary, ``H`` hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlkit.parallel.layouts import PackedBatch, PaddedBatch

MicroBatch = PackedBatch | PaddedBatch
ForwardFn = Callable[[MicroBatch], Tensor]


def host_to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x`` on ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` of a CPU tensor synchronises the stream after the copy; staging through pinned
    memory with ``non_blocking=True`` keeps the host running ahead of the GPU (PyTorch's pinned allocator
    holds the staging buffer until the copy has run). On CPU, or for a tensor already there, ``x.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    # contiguous(): pin_memory keeps an expanded view's zero strides, and the device copy would too.
    return x.contiguous().pin_memory().to(device, non_blocking=True)


def micro_batch_to_device(micro: MicroBatch, device: torch.device | str) -> MicroBatch:
    """The per-token tensors of ``micro`` on ``device`` (:func:`host_to_device`); the lengths stay on the host.

    ``cu_seqlens``, ``seq_lens`` and ``response_lens`` are read by host code (attention lengths, unpacking).
    """
    host_fields = {"cu_seqlens", "seq_lens", "response_lens"}
    moved = {
        f.name: host_to_device(getattr(micro, f.name), device)
        for f in dataclasses.fields(micro)
        if f.name not in host_fields and isinstance(getattr(micro, f.name), Tensor)
    }
    moved["values"] = {name: host_to_device(v, device) for name, v in micro.values.items()}
    return dataclasses.replace(micro, **moved)


def megatron_forward(model: Any) -> ForwardFn:
    """A forward function for a megatron-core ``GPTModel``: THD via ``PackedSeqParams``, padded rows as ``[B, S]``.

    Returns logits ``[T, V']`` for a :class:`PackedBatch` and ``[B, S, V']`` for a :class:`PaddedBatch`
    (``V'/tp`` columns under TP). On a pipeline stage without the output layer it returns the hidden
    states ``[T, 1, H]`` for the next stage (megatron's schedule feeds the previous stage's output in
    through ``set_input_tensor``). Under CP, ``micro`` holds this rank's tokens and the full ``cu_seqlens``.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    device = next(model.parameters()).device
    # megatron's DDP wrapper keeps the GPTModel (and its post_process flag) in .module
    last_stage = getattr(getattr(model, "module", model), "post_process", True)

    def forward(micro: MicroBatch) -> Tensor:
        if isinstance(micro, PackedBatch):
            cu = host_to_device(micro.cu_seqlens.to(torch.int32), device)
            max_len = int((micro.cu_seqlens[1:] - micro.cu_seqlens[:-1]).max())
            params = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
            )
            ids, pos = micro.input_ids[None].to(device), micro.position_ids[None].to(device)
            out = model(ids, pos, attention_mask=None, packed_seq_params=params)
            return out[0] if last_stage else out
        return model(micro.input_ids.to(device), micro.position_ids.to(device), attention_mask=None)

    return forward


def hf_forward(model: Any) -> ForwardFn:
    """A forward function for an HF transformers causal LM on padded rows (the reference backend)."""
    device = next(model.parameters()).device

    def forward(micro: MicroBatch) -> Tensor:
        if not isinstance(micro, PaddedBatch):
            raise ValueError("hf_forward takes padded micro-batches: use layout='bshd'")
        out = model(input_ids=micro.input_ids.to(device), attention_mask=micro.attention_mask.to(device))
        return out.logits

    return forward
