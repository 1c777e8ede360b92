"""Fused RMSNorm, SwiGLU and rotary embedding for megatron-core's local layer spec (no TE, no Apex).

The technique
-------------
Without Transformer Engine, megatron-core's local spec runs every elementwise step of a layer as its
own kernel, in bf16, with its own saved activations: ``torch.nn.RMSNorm`` on the hidden state and on
every query/key head, SwiGLU as ``chunk -> silu -> add(0) -> mul``, and RoPE as ``cos``, ``sin``,
casts, ``cat``, three multiplies and an add per call; for THD-packed input its RoPE also splits the
batch into sequences on the host (``cu_seqlens.tolist()``: a GPU synchronisation per query and per key,
twice per layer). On an H100 those kernels took about 45% of a Qwen3-1.7B step (``benchmarks/RESULTS.md``).

Here each piece is one plain-torch function, the reference and the CPU path, that does its arithmetic
in float32 and rounds once at the end (HF transformers' ``Qwen3RMSNorm`` order for the norm). On CUDA
the same function goes through ``torch.compile``: Inductor fuses it into one Triton kernel for the
forward and one or two for the backward, and its partitioner recomputes cheap intermediates in the
backward instead of saving them (the 1.7B step's peak memory fell from 48.9 to 36.8 GiB). Without
Triton, ``backend="auto"`` stays eager on CUDA too. The token dimension is marked dynamic
and the feature dimensions static, so a new micro-batch length reuses the compiled kernels and each
feature width (hidden 2048, head 128) keeps its own specialised reduction.

RoPE positions restart at 0 in every packed sequence (:func:`packed_positions`), as in
:func:`rlkit.parallel.layouts.pack_thd` and megatron-core's per-sequence path, computed on the GPU
from ``cu_seqlens`` without reading it back.

Shape legend: ``N`` rows (tokens, or tokens x heads), ``T`` packed tokens, ``H`` heads, ``D`` feature or
head dim, ``F`` MLP width (SwiGLU input is ``2F``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "torch", "compile"]


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, normalised in float32.

    The order of HF transformers' ``Qwen3RMSNorm``: normalise in float32, round to ``x.dtype``, then
    multiply by the weight in that dtype.

    Args:
        x: ``[..., D]`` float.
        weight: ``[D]`` float, same dtype as ``x`` (or float32).
        eps: added to the mean square.

    Returns:
        ``[..., D]`` in the dtype of ``x`` (promoted with ``weight``'s).
    """
    x32 = _at_least_float32(x)
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def swiglu_reference(x: Tensor) -> Tensor:
    """SwiGLU (Shazeer 2020) on megatron's fused ``[gate; up]`` projection: ``silu(x[..., :F]) * x[..., F:]``.

    Args:
        x: ``[..., 2F]`` float, the output of ``linear_fc1`` (gate first, as megatron-core stores it).

    Returns:
        ``[..., F]`` in the dtype of ``x``; computed in float32, rounded once.
    """
    gate, up = _at_least_float32(x).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def apply_rotary_reference(x: Tensor, angles: Tensor) -> Tensor:
    """Rotary position embedding (Su et al. 2021), non-interleaved halves as in HF and megatron-core.

    ``out = x * cos(a) + rotate_half(x) * sin(a)`` with ``rotate_half([x1, x2]) = [-x2, x1]``; the angle of
    channel ``j`` at position ``p`` is ``a[p, j] = p * inv_freq[j mod D/2]`` (megatron's ``freqs``
    layout, ``cat(f, f)``).

    Args:
        x: ``[..., H, D]`` query or key heads, float.
        angles: float32 angles broadcastable to ``x`` (``[T, 1, D]`` for THD, ``[S, 1, 1, D]`` padded).

    Returns:
        Same shape and dtype as ``x``; computed in float32, rounded once.
    """
    x32 = _at_least_float32(x)
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * torch.cos(angles) + rotated * torch.sin(angles)).to(x.dtype)


def rms_norm_rotary_reference(x: Tensor, weight: Tensor, eps: float, angles: Tensor) -> Tensor:
    """QK-norm then RoPE, as megatron's attention applies them: ``apply_rotary(rms_norm(x, weight, eps), angles)``.

    The norm's output is rounded to ``x.dtype`` before the rotation, exactly as the two functions in a row.

    Args:
        x: ``[..., H, D]`` query or key heads.
        weight: ``[D]`` QK-norm weight.
        eps: added to the mean square.
        angles: float32 angles broadcastable to ``x`` (see :func:`apply_rotary_reference`).

    Returns:
        Same shape and dtype as ``x``.
    """
    return apply_rotary_reference(rms_norm_reference(x, weight, eps), angles)


def packed_positions(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Position of each packed token within its own sequence: ``t - cu_seqlens[seq(t)]``.

    Runs on ``cu_seqlens``' device without reading it back (no host synchronisation).

    Args:
        cu_seqlens: ``[N + 1]`` int cumulative sequence lengths, ``cu_seqlens[-1] == num_tokens``.
        num_tokens: ``T``.

    Returns:
        ``[T]`` int64, restarting at 0 at every sequence start.
    """
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(num_tokens, device=cu.device)
    # Index of the last start <= t: a token at a sequence's first position belongs to that sequence.
    sequence = torch.searchsorted(cu, tokens, right=True) - 1
    return tokens - cu[sequence]


# --------------------------------------------------------------------------------------------------
# Dispatch: the reference eagerly (CPU, or backend="torch"), or its torch.compile'd kernels
# --------------------------------------------------------------------------------------------------


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=None)


@functools.cache
def _triton_available() -> bool:
    from torch.utils._triton import has_triton

    return has_triton()


def _use_compile(x: Tensor, backend: Backend) -> bool:
    if backend not in ("auto", "torch", "compile"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'torch' or 'compile'")
    return backend == "compile" or (backend == "auto" and x.is_cuda and _triton_available())


# Input signatures whose first compile has been steered (see _rows_dynamic).
_STEERED: set[tuple] = set()


def _rows_dynamic(fn: Callable, *tensors: Tensor) -> None:
    """Dim 0 (tokens) symbolic, every other dim static: one compiled kernel per feature width.

    Only the first call of a signature needs the marks (they steer that compile; later token counts
    match its symbolic dim 0), and marking costs ~0.1 ms of host time per tensor, so it happens once.
    """
    key = (fn, torch.is_grad_enabled(), *((t.shape[1:], t.dtype, t.device.type, t.requires_grad) for t in tensors))
    if key in _STEERED:
        return
    _STEERED.add(key)
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        for dim in range(1, t.dim()):
            torch._dynamo.mark_static(t, dim)


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, backend: Backend = "auto") -> Tensor:
    """:func:`rms_norm_reference`, as one fused kernel on CUDA.

    Args:
        x: ``[..., D]``.
        weight: ``[D]``.
        eps: added to the mean square.
        backend: ``"auto"`` (compiled on CUDA with Triton, eager otherwise), ``"torch"`` (eager), ``"compile"``.

    Returns:
        ``[..., D]``.
    """
    if not _use_compile(x, backend):
        return rms_norm_reference(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])
    _rows_dynamic(rms_norm_reference, rows)
    return _compiled(rms_norm_reference)(rows, weight, eps).view(x.shape)


def swiglu(x: Tensor, *, backend: Backend = "auto") -> Tensor:
    """:func:`swiglu_reference`, as one fused kernel on CUDA (``[..., 2F] -> [..., F]``)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim [gate; up], got {tuple(x.shape)}")
    if not _use_compile(x, backend):
        return swiglu_reference(x)
    rows = x.reshape(-1, x.shape[-1])
    _rows_dynamic(swiglu_reference, rows)
    return _compiled(swiglu_reference)(rows).view(*x.shape[:-1], x.shape[-1] // 2)


def _check_rotary(x: Tensor, angles: Tensor) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {tuple(x.shape)}")
    if angles.dim() != x.dim() or angles.shape[-2] != 1 or angles.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"angles {tuple(angles.shape)} must broadcast to x {tuple(x.shape)} with a size-1 head dim "
            "([T, 1, D] for THD, [S, 1, 1, D] for padded [S, B, H, D])"
        )


def _rotary_rows(fn: Callable, x: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` as ``[N, H, D]`` and ``angles`` as ``[N, 1, D]`` (padded input shares angles over B: expanded)."""
    heads, dim = x.shape[-2:]
    rows = x.reshape(-1, heads, dim)
    row_angles = angles.expand(*x.shape[:-2], 1, dim).reshape(-1, 1, dim)
    _rows_dynamic(fn, rows, row_angles)
    return rows, row_angles


def rms_norm_rotary(x: Tensor, weight: Tensor, eps: float, angles: Tensor, *, backend: Backend = "auto") -> Tensor:
    """:func:`rms_norm_rotary_reference` (QK-norm + RoPE), as one fused kernel on CUDA.

    Args:
        x: ``[..., H, D]``.
        weight: ``[D]``.
        eps: added to the mean square.
        angles: float32, broadcastable to ``x`` with a size-1 head dim.
        backend: ``"auto"``, ``"torch"`` or ``"compile"``.

    Returns:
        Same shape and dtype as ``x``.
    """
    _check_rotary(x, angles)
    if not _use_compile(x, backend):
        return rms_norm_rotary_reference(x, weight, eps, angles)
    rows, row_angles = _rotary_rows(rms_norm_rotary_reference, x, angles)
    return _compiled(rms_norm_rotary_reference)(rows, weight, eps, row_angles).view(x.shape)


def apply_rotary(x: Tensor, angles: Tensor, *, backend: Backend = "auto") -> Tensor:
    """:func:`apply_rotary_reference`, as one fused kernel on CUDA.

    Args:
        x: ``[..., H, D]``.
        angles: float32, broadcastable to ``x`` with a size-1 head dim (``[T, 1, D]``, ``[S, 1, 1, D]``).
        backend: ``"auto"``, ``"torch"`` or ``"compile"``.

    Returns:
        Same shape and dtype as ``x``.
    """
    _check_rotary(x, angles)
    if not _use_compile(x, backend):
        return apply_rotary_reference(x, angles)
    rows, row_angles = _rotary_rows(apply_rotary_reference, x, angles)
    return _compiled(apply_rotary_reference)(rows, row_angles).view(x.shape)
