"""Triton kernels for ``rlkit.algos.logprobs``: one pass over the logits forward, one backward.

Each program owns one row (token) and streams over the vocabulary in blocks of ``BLOCK_V``:

* forward: an online softmax (Milakov & Gimelshein 2018) keeps a running row max ``m`` and, per lane,
  ``s = sum exp(z - m)`` and ``w = sum exp(z - m) (z - m)``; the chosen logit is read directly. At the
  end ``lse = m + log S``, ``H = log S - W / S``, ``log p_y = z_y - lse``. The logits are read once.
* backward: ``p = exp(z - lse)`` recomputed from the saved ``lse``, and the gradient
  ``(g ([j == y] - p) - h p (log p + H)) / tau`` written in the logits' dtype (possibly in place).
  The logits are read once and the gradient written once: the floor is 3 x |logits| bytes.

The torch path in ``logprobs.py`` is the specification; ``tests/algos/test_logprobs_gpu.py`` compares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634  # used on the host: scale2 = log2(e) / tau
_LN2 = tl.constexpr(0.6931471805599453)  # constexpr: kernels read no plain globals


@triton.jit
def _forward_kernel(
    logits_ptr, stride_row, tokens_ptr, log_probs_ptr, lse_ptr, entropy_ptr,
    vocab_size, scale2, ignore_index,
    COMPUTE_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK_V)
    # Work in base 2: u = z * log2(e), so exp(z - m) = exp2(u - m2). scale2 = log2(e) / tau.
    running_max = -float("inf")
    sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)
    sum_exp_u = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < vocab_size
        u = tl.load(row_ptr + cols, mask=in_vocab, other=-float("inf")).to(tl.float32) * scale2
        new_max = tl.maximum(running_max, tl.max(u, axis=0))
        alpha = tl.exp2(running_max - new_max)
        e = tl.exp2(u - new_max)
        if COMPUTE_ENTROPY:
            # w = sum e (u - max), kept relative to the running max so that peaked rows do not cancel:
            # moving to a new max adds (old - new) * s before rescaling.
            shift = tl.where(running_max == -float("inf"), 0.0, running_max - new_max)
            sum_exp_u = (sum_exp_u + shift * sum_exp) * alpha + tl.where(in_vocab, e * (u - new_max), 0.0)
        sum_exp = sum_exp * alpha + e
        running_max = new_max
    total = tl.sum(sum_exp, axis=0)
    shifted_lse2 = tl.log2(total)
    lse2 = running_max + shifted_lse2  # base-2 log-sum-exp of u
    lse = lse2 * _LN2
    tl.store(lse_ptr + row, lse)
    token = tl.load(tokens_ptr + row).to(tl.int64)
    has_target = token != ignore_index
    # The host does not check ids (that would sync): an id outside [0, V) reads nothing and yields NaN.
    in_range = (token >= 0) & (token < vocab_size)
    chosen = tl.load(row_ptr + tl.where(in_range, token, 0)).to(tl.float32) * scale2
    log_prob = tl.where(in_range, (chosen - lse2) * _LN2, float("nan"))
    tl.store(log_probs_ptr + row, tl.where(has_target, log_prob, 0.0))
    if COMPUTE_ENTROPY:
        # H = lse - sum p z on max-shifted values, back to natural units: (log2 S - W / S) * ln 2
        tl.store(entropy_ptr + row, (shifted_lse2 - tl.sum(sum_exp_u, axis=0) / total) * _LN2)


@triton.jit
def _backward_kernel(
    logits_ptr, stride_row, out_ptr, stride_out, tokens_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr,
    vocab_size, inv_tau, ignore_index,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row_ptr = out_ptr + row * stride_out
    offsets = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    token = tl.load(tokens_ptr + row).to(tl.int64)
    token = tl.where(token == ignore_index, -1, token)
    g = 0.0
    h = 0.0
    ent = 0.0
    if HAS_GRAD_LP:
        g = tl.load(grad_lp_ptr + row)
    if HAS_GRAD_ENT:
        h = tl.load(grad_ent_ptr + row)
        ent = tl.load(entropy_ptr + row)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < vocab_size
        z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32) * inv_tau
        log_p = z - lse
        p = tl.exp(log_p)
        grad = -p * (g + h * (log_p + ent))
        grad = tl.where(cols == token, grad + g, grad) * inv_tau
        tl.store(out_row_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=in_vocab)


def _block_size(vocab_size: int) -> int:
    return min(4096, triton.next_power_of_2(vocab_size))


def _rows(logits2d: Tensor) -> Tensor:
    # The kernels need unit stride along the vocabulary; rows may be strided (slices of a batch).
    return logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous()


def forward(
    logits2d: Tensor, tokens1d: Tensor, temperature: float, ignore_index: int, compute_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Triton forward: ``(log_probs [N], lse [N], entropy [N] | None)``, float32, of ``[N, V]`` logits."""
    logits2d = _rows(logits2d)
    num_rows, vocab_size = logits2d.shape
    log_probs = torch.empty(num_rows, dtype=torch.float32, device=logits2d.device)
    lse = torch.empty_like(log_probs)
    entropy = torch.empty_like(log_probs) if compute_entropy else lse  # placeholder pointer when unused
    if num_rows:
        _forward_kernel[(num_rows,)](
            logits2d, logits2d.stride(0), tokens1d.contiguous(), log_probs, lse, entropy,
            vocab_size, _LOG2E / temperature, ignore_index,
            COMPUTE_ENTROPY=compute_entropy, BLOCK_V=_block_size(vocab_size), num_warps=8,
        )  # fmt: skip
    return log_probs, lse, entropy if compute_entropy else None


def backward(
    logits2d: Tensor,
    tokens1d: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    out: Tensor,
) -> Tensor:
    """Triton backward: writes the logits' gradient into ``out`` (``[N, V]``; may alias ``logits2d``)."""
    logits2d = _rows(logits2d)
    if out.stride(-1) != 1:
        raise ValueError("out must have unit stride along the vocabulary")
    num_rows, vocab_size = logits2d.shape
    has_lp = grad_log_probs is not None
    has_ent = grad_entropy is not None and entropy is not None
    if num_rows:
        _backward_kernel[(num_rows,)](
            logits2d, logits2d.stride(0), out, out.stride(0), tokens1d.contiguous(), lse,
            entropy if has_ent else lse,
            grad_log_probs.float().contiguous() if has_lp else lse,
            grad_entropy.float().contiguous() if has_ent else lse,
            vocab_size, 1.0 / temperature, ignore_index,
            HAS_GRAD_LP=has_lp, HAS_GRAD_ENT=has_ent, BLOCK_V=_block_size(vocab_size), num_warps=8,
        )  # fmt: skip
    return out
