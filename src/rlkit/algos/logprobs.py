"""Log-probabilities of chosen tokens and entropy from logits, without the memory wall.

The policy loss needs, for every response token ``t``, ``log p(y_t)`` under the policy and often the
entropy of the whole next-token distribution. Written naively (``logits.float().log_softmax(-1)``,
``gather``, ``-(softmax * log_softmax).sum(-1)``), autograd keeps several float32 copies of the
``[T, V]`` logits alive; with Qwen3's 151,936-entry vocabulary and 16K tokens that is ~10 GB each.

Here a custom autograd function walks the tokens in chunks, keeps only three float32 numbers per
token for the backward pass (``lse``, the entropy ``H``), and recomputes the softmax of a chunk when
the gradient arrives. Extra memory is ``O(chunk x V)`` instead of ``O(T x V)``, and gradients are exact.

Math (``z = logits / tau``, computed in float32; ``tau`` is the sampling temperature, applied as SGLang
does before its softmax, so the log-probs are those of the distribution the rollout sampled from)::

    lse      = log sum_j exp(z_j)                       (max-shifted)
    log p_y  = z_y - lse
    p_j      = exp(z_j - lse)
    H        = -sum_j p_j log p_j = lse - sum_j p_j z_j

Backward, with upstream gradients ``g`` for ``log p_y`` and ``h`` for ``H`` (per token)::

    d log p_y / d z_j = [j == y] - p_j
    d H / d z_j       = -p_j (log p_j + H)
    d L / d logits_j  = (g ([j == y] - p_j) - h p_j (log p_j + H)) / tau

Three variants share this math:

* ``logprobs_and_entropy``: from logits ``[T, V]`` or ``[B, T, V]``.
* ``logprobs_and_entropy_from_hidden``: from the last hidden states and the output weight, computing
  ``hidden @ weight.T`` one slice of the vocabulary at a time (forward, and again in backward), so the
  full logits never exist (the idea of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024). When
  the loss is a sum over tokens, ``rlkit.algos.fused_linear_loss.fused_loss_from_hidden`` forms the
  gradient in the forward instead and saves the recomputed product.
* ``vocab_parallel_logprobs_and_entropy``: each tensor-parallel rank holds a vocabulary shard of the
  logits (Megatron-LM's vocab-parallel output layer and its ``_VocabParallelCrossEntropy``, Shoeybi et
  al. 2019); the row max and the sums ``sum exp``, ``sum exp * z`` and the chosen logit are reduced
  over the group, the backward needs no communication.

On CUDA tensors the row passes run as Triton kernels (``rlkit.algos.kernels.triton_logprobs``),
imported only when a CUDA tensor arrives; the torch code here is the specification, the CPU path and
the fallback. Logits are assumed finite (a ``-inf`` mask belongs in the sampler, not in the logits).

Shapes: ``B`` rows, ``T`` tokens (positions), ``V`` vocabulary, ``H`` hidden size, ``tp`` TP ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

IGNORE_INDEX = -100
# About 4M float32 elements (16 MiB) per chunk copy: large enough for efficient kernels, small
# enough that the few temporaries of one chunk stay far below the logits' size at real T and V.
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _default_chunk_size(vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _DEFAULT_CHUNK_ELEMENTS // vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk), or None for automatic")
    return chunk_size


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0; use 1.0 for the untempered distribution")


def _check_tokens(tokens: Tensor, vocab_lo: int, vocab_hi: int, ignore_index: int, *, check_range: bool = True) -> None:
    """Dtype always; the id range only with ``check_range`` (it reads the ids on the host: a sync on CUDA)."""
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32, got {tokens.dtype}; pass token ids, not one-hot")
    if tokens.numel() == 0 or not check_range:
        return
    valid = tokens[tokens != ignore_index]
    if valid.numel() and (int(valid.min()) < vocab_lo or int(valid.max()) >= vocab_hi):
        raise ValueError(
            f"token ids must lie in [{vocab_lo}, {vocab_hi}) or equal ignore_index={ignore_index}; "
            f"got min={int(valid.min())}, max={int(valid.max())} (does the tokenizer match the model's vocab?)"
        )


def _check_hidden_inputs(hidden: Tensor, weight: Tensor, tokens: Tensor) -> None:
    """``hidden [T, H]``, ``weight [V, H]`` and ``tokens [T]`` of the from-hidden paths, with clear errors."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [T, H] and weight [V, H] with the same H; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)} (flatten [B, T, H] to [B*T, H] first)"
        )
    if tokens.shape != hidden.shape[:1]:
        raise ValueError(f"tokens must be [T]={tuple(hidden.shape[:1])}, got {tuple(tokens.shape)}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) must share "
            "dtype and device; cast one of them"
        )


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if backend == "triton" and device.type != "cuda":
        raise ValueError(f"backend='triton' needs CUDA tensors, got device {device}; use backend='torch' or 'auto'")
    return backend


def _mask_ignored(grad_log_probs: Tensor | None, tokens: Tensor, ignore_index: int) -> Tensor | None:
    if grad_log_probs is None:
        return None
    return grad_log_probs.float().masked_fill(tokens == ignore_index, 0.0)


def _triton_ops():
    # Imported lazily: triton must not load with ``import rlkit``.
    from rlkit.algos.kernels import triton_logprobs

    return triton_logprobs


# --------------------------------------------------------------------------------------------------
# Torch reference path, one chunk of rows at a time
# --------------------------------------------------------------------------------------------------


def _scaled_float(logits_chunk: Tensor, temperature: float) -> Tensor:
    """A fresh float32 copy of ``logits_chunk / temperature`` that the caller may overwrite."""
    z = logits_chunk.to(torch.float32, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _torch_forward_chunk(
    logits_chunk: Tensor, tokens_chunk: Tensor, temperature: float, ignore_index: int, compute_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns ``(log_probs [c], lse [c], entropy [c] | None)`` for one chunk ``[c, V]``."""
    z = _scaled_float(logits_chunk, temperature)
    # Shift by the row max first: with peaked rows (|z| ~ 100, H ~ 1e-4) ``lse - sum p z`` on unshifted
    # values cancels catastrophically in float32; on shifted values both terms are small.
    row_max = z.max(dim=-1, keepdim=True).values
    z.sub_(row_max)
    shifted_lse = torch.logsumexp(z, dim=-1)
    lse = shifted_lse + row_max.squeeze(-1)
    ignored = tokens_chunk == ignore_index
    safe_tokens = tokens_chunk.masked_fill(ignored, 0).long()
    chosen = z.gather(-1, safe_tokens.unsqueeze(-1)).squeeze(-1)
    log_probs = (chosen - shifted_lse).masked_fill(ignored, 0.0)
    entropy = None
    if compute_entropy:
        # H = lse - sum_j p_j z_j (shift-invariant); reuse the exp buffer for p_j * z_j.
        p = torch.exp(z - shifted_lse.unsqueeze(-1))
        entropy = shifted_lse - p.mul_(z).sum(-1)
    return log_probs, lse, entropy


def _torch_backward_chunk(
    logits_chunk: Tensor,
    tokens_chunk: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
) -> Tensor:
    """Gradient w.r.t. the logits chunk, float32 ``[c, V]`` (see the module docstring).

    ``grad_log_probs`` must already be zero on rows that pass no gradient; ``tokens_chunk == ignore_index``
    only drops the one-hot term.
    """
    log_p = _scaled_float(logits_chunk, temperature).sub_(lse.unsqueeze(-1))
    p = torch.exp(log_p)
    if grad_entropy is not None and entropy is not None:
        # -h p (log p + H), built in log_p's buffer
        grad = log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
    else:
        grad = log_p.zero_()
    if grad_log_probs is not None:
        g = grad_log_probs.float()
        grad.addcmul_(p, g.unsqueeze(-1), value=-1.0)
        # Rows whose target is ignore_index (or, in the vocab-parallel case, lives on another rank)
        # keep the -g p term but get no one-hot term.
        no_target = tokens_chunk == ignore_index
        safe_tokens = tokens_chunk.masked_fill(no_target, 0).long()
        grad.scatter_add_(-1, safe_tokens.unsqueeze(-1), g.masked_fill(no_target, 0.0).unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _row_forward(
    logits2d: Tensor,
    tokens1d: Tensor,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(log_probs [N], lse [N], entropy [N] | None)`` of ``[N, V]`` logits, chunk by chunk."""
    if backend == "triton":
        return _triton_ops().forward(logits2d, tokens1d, temperature, ignore_index, compute_entropy)
    num_rows = logits2d.shape[0]
    log_probs = torch.empty(num_rows, dtype=torch.float32, device=logits2d.device)
    lse = torch.empty_like(log_probs)
    entropy = torch.empty_like(log_probs) if compute_entropy else None
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        lp, ls, ent = _torch_forward_chunk(
            logits2d[start:end], tokens1d[start:end], temperature, ignore_index, compute_entropy
        )
        log_probs[start:end], lse[start:end] = lp, ls
        if entropy is not None:
            entropy[start:end] = ent
    return log_probs, lse, entropy


def _row_backward(
    logits2d: Tensor,
    tokens1d: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    out: Tensor,
) -> Tensor:
    """Writes the logits' gradient into ``out`` (``[N, V]``, any float dtype; may alias ``logits2d``)."""
    if backend == "triton":
        return _triton_ops().backward(
            logits2d, tokens1d, lse, entropy, grad_log_probs, grad_entropy, temperature, ignore_index, out
        )
    for start in range(0, logits2d.shape[0], chunk_size):
        end = min(start + chunk_size, logits2d.shape[0])
        grad = _torch_backward_chunk(
            logits2d[start:end], tokens1d[start:end], lse[start:end],
            None if entropy is None else entropy[start:end],
            None if grad_log_probs is None else grad_log_probs[start:end],
            None if grad_entropy is None else grad_entropy[start:end],
            temperature, ignore_index,
        )  # fmt: skip
        out[start:end].copy_(grad)
    return out


class _LogprobsEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, tokens1d, temperature, ignore_index, compute_entropy, chunk_size, backend, inplace):
        log_probs, lse, entropy = _row_forward(
            logits2d, tokens1d, temperature, ignore_index, compute_entropy, chunk_size, backend
        )
        ctx.save_for_backward(logits2d, tokens1d, lse, entropy)
        ctx.config = (temperature, ignore_index, chunk_size, backend, inplace)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        if entropy is None:
            return log_probs
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, *grad_rest):
        logits2d, tokens1d, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, chunk_size, backend, inplace = ctx.config
        grad_entropy = grad_rest[0] if grad_rest else None
        grad_log_probs = _mask_ignored(grad_log_probs, tokens1d, ignore_index)
        # In place (flash-attention's ``inplace_backward``): the caller promises nothing else reads
        # the logits after this, so their buffer takes the gradient and no [T, V] tensor is allocated.
        out = logits2d.detach() if inplace else torch.empty_like(logits2d)
        _row_backward(
            logits2d, tokens1d, lse, entropy, grad_log_probs, grad_entropy,
            temperature, ignore_index, chunk_size, backend, out,
        )  # fmt: skip
        return out, None, None, None, None, None, None, None


def logprobs_and_entropy(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compute_entropy: bool = True,
    ignore_index: int = IGNORE_INDEX,
    backend: Backend = "auto",
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of the chosen tokens and entropy of ``softmax(logits / temperature)``.

    Exact values and gradients (module docstring for the formulas) with ``O(chunk_size x V)`` extra
    memory in the torch path, and none beyond a few floats per token in the Triton path. Positions
    whose token equals ``ignore_index`` get ``log_prob = 0`` and pass no gradient through it; their
    entropy is still computed (it does not depend on the token): mask it in the loss.

    Args:
        logits: ``[T, V]`` or ``[B, T, V]``, float32/bfloat16/float16; position ``t`` scores ``tokens[t]``
            (shift before calling: logits of position ``t-1`` predict token ``t``).
        tokens: ``[T]`` or ``[B, T]`` int64/int32 ids in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits before the softmax, as the sampler did (> 0).
        chunk_size: tokens per chunk in the torch path; ``None`` picks ``~4M / V`` (16 MiB fp32 copies).
        compute_entropy: also return the entropy (otherwise ``None``, and the backward skips its term).
        ignore_index: token id marking positions without a target (prompt, padding).
        backend: ``"auto"`` (Triton on CUDA when importable, torch otherwise), ``"torch"``, ``"triton"``.
        inplace_backward: write the logits' gradient into ``logits``' own buffer (saves a ``[T, V]``
            allocation); only when nothing else reads ``logits`` after this call's backward.

    Returns:
        ``(log_probs, entropy)``, float32 of the shape of ``tokens``; ``entropy`` is ``None`` when
        ``compute_entropy`` is False. Both are differentiable w.r.t. ``logits``.
    """
    _check_temperature(temperature)
    if logits.dim() not in (2, 3) or tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits must be [T, V] or [B, T, V] and tokens [T] or [B, T] with the same leading shape; "
            f"got logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    vocab_size = logits.shape[-1]
    resolved = _resolve_backend(backend, logits.device)
    # No host sync on the Triton path (it would stop the CPU from running ahead of the GPU mid-step):
    # the kernel writes a NaN log-prob for an id outside [0, V) instead.
    _check_tokens(tokens, 0, vocab_size, ignore_index, check_range=resolved != "triton")
    logits2d = logits.reshape(-1, vocab_size)
    tokens1d = tokens.reshape(-1)
    outs = _LogprobsEntropyFunction.apply(
        logits2d, tokens1d, float(temperature), ignore_index, compute_entropy,
        _default_chunk_size(vocab_size, chunk_size), resolved, inplace_backward,
    )  # fmt: skip
    log_probs, entropy = outs if compute_entropy else (outs, None)
    log_probs = log_probs.view(tokens.shape)
    return log_probs, None if entropy is None else entropy.view(tokens.shape)


# --------------------------------------------------------------------------------------------------
# Fused from hidden states: logits exist one vocabulary chunk at a time
# --------------------------------------------------------------------------------------------------

# Chunks are slices of the vocabulary (all tokens x a block of V/32 columns), not of the tokens: then
# every product is large in all three dimensions (a token chunk of ~200 rows would make the weight a
# memory-bound operand), each row of grad W is written exactly once instead of re-accumulated per
# token chunk, and only the small [T, H] grad_hidden is accumulated.
_DEFAULT_VOCAB_CHUNKS = 32


def _default_vocab_chunk(vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return _default_chunk_size(vocab_size, chunk_size)
    per_chunk = -(-vocab_size // _DEFAULT_VOCAB_CHUNKS)
    return min(vocab_size, -(-per_chunk // 128) * 128)  # whole matmul tiles


def _merge_vocab_chunks(chunk_lse: Tensor, chunk_entropy: Tensor | None, chosen: Tensor):
    """Combines per-chunk ``lse_c`` and entropies ``H_c`` (``[C, T]``) into the full-vocabulary ones.

    With chunk weights ``w_c = exp(lse_c - lse)``: ``lse = logsumexp_c lse_c`` and, by the chain rule of
    entropy, ``H = sum_c w_c H_c - sum_c w_c log w_c`` (no cancellation for peaked rows).
    """
    lse = torch.logsumexp(chunk_lse, dim=0)
    log_w = chunk_lse - lse
    entropy = None
    if chunk_entropy is not None:
        w = log_w.exp()
        entropy = (w * chunk_entropy).sum(0) - (w * log_w).sum(0)
    return chosen - lse, lse, entropy


class _FromHiddenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, ignore_index, compute_entropy, vocab_chunk, backend):
        vocab_size, num_rows = weight.shape[0], hidden.shape[0]
        starts = list(range(0, vocab_size, vocab_chunk))
        chunk_lse = torch.empty(len(starts), num_rows, dtype=torch.float32, device=hidden.device)
        chunk_entropy = torch.empty_like(chunk_lse) if compute_entropy else None
        chosen = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)  # z_y, from its chunk
        ignored = tokens == ignore_index
        for i, start in enumerate(starts):
            end = min(start + vocab_chunk, vocab_size)
            logits_chunk = hidden @ weight[start:end].T
            local_tokens = _local_tokens(tokens, start, end, ignore_index)
            lp, ls, ent = _row_forward(
                logits_chunk, local_tokens, temperature, ignore_index, compute_entropy,
                _default_chunk_size(end - start, None), backend,
            )  # fmt: skip
            chosen.add_(lp + ls.masked_fill(local_tokens == ignore_index, 0.0))  # lp is 0 off-chunk
            chunk_lse[i] = ls
            if chunk_entropy is not None:
                chunk_entropy[i] = ent
            del logits_chunk
        log_probs, lse, entropy = _merge_vocab_chunks(chunk_lse, chunk_entropy, chosen)
        log_probs = log_probs.masked_fill(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.config = (temperature, ignore_index, vocab_chunk, backend)
        ctx.set_materialize_grads(False)
        return log_probs if entropy is None else (log_probs, entropy)

    @staticmethod
    def backward(ctx, grad_log_probs, *grad_rest):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, vocab_chunk, backend = ctx.config
        grad_entropy = grad_rest[0] if grad_rest else None
        grad_log_probs = _mask_ignored(grad_log_probs, tokens, ignore_index)
        vocab_size = weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # grad_hidden is accumulated over the vocabulary chunks in the hidden states' dtype by addmm
        # (fp32 inside each product, one rounding per chunk), as Liger-Kernel accumulates grad W: an fp32
        # accumulator would add 2 x |hidden| of memory. grad W needs no accumulation.
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        for start in range(0, vocab_size, vocab_chunk):
            end = min(start + vocab_chunk, vocab_size)
            # Recompute this chunk's logits; the row backward overwrites them with their gradient, using
            # the full-vocabulary lse and H saved by the forward (p_j = exp(z_j - lse) is global).
            logits_chunk = hidden @ weight[start:end].T
            _row_backward(
                logits_chunk, _local_tokens(tokens, start, end, ignore_index), lse, entropy,
                grad_log_probs, grad_entropy, temperature, ignore_index,
                _default_chunk_size(end - start, None), backend, logits_chunk,
            )  # fmt: skip
            if grad_weight is not None:
                torch.mm(logits_chunk.T, hidden, out=grad_weight[start:end])
            if grad_hidden is not None:
                grad_hidden.addmm_(logits_chunk, weight[start:end])
            del logits_chunk
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _local_tokens(tokens: Tensor, start: int, end: int, ignore_index: int) -> Tensor:
    """Token ids relative to the vocabulary slice ``[start, end)``; ``ignore_index`` outside it."""
    local = tokens.long() - start
    outside = (local < 0) | (local >= end - start) | (tokens == ignore_index)
    return local.masked_fill(outside, ignore_index)


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compute_entropy: bool = True,
    ignore_index: int = IGNORE_INDEX,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``logprobs_and_entropy(hidden @ weight.T, tokens, ...)`` without materializing the logits.

    The output projection runs one slice of the vocabulary at a time: the forward computes each
    ``[T, chunk]`` block of logits, its log-sum-exp and entropy, and merges the blocks (see
    ``_merge_vocab_chunks``); the backward recomputes each block (2 T x chunk x H FLOPs more than a
    plain linear layer's 6 T V H in total: 8 T V H), overwrites it with its gradient, writes that slice
    of ``grad_W = grad_z.T @ hidden`` and accumulates ``grad_hidden += grad_z @ W_slice``. Extra memory:
    one ``[T, chunk]`` block plus the row passes' temporaries.

    Args:
        hidden: ``[T, H]`` last hidden states (after the final norm), float32/bfloat16/float16.
        weight: ``[V, H]`` output (LM head) weight, same dtype and device as ``hidden``.
        tokens: ``[T]`` int64/int32 target ids in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits before the softmax (> 0).
        chunk_size: vocabulary entries per chunk; ``None`` picks ``V / 32`` rounded up to a multiple of 128.
        compute_entropy: also return the entropy (otherwise ``None``).
        ignore_index: token id marking positions without a target.
        backend: row-pass backend, as in ``logprobs_and_entropy``; the products always use torch.

    Returns:
        ``(log_probs [T], entropy [T] | None)``, float32, differentiable w.r.t. ``hidden`` and ``weight``.
    """
    _check_temperature(temperature)
    _check_hidden_inputs(hidden, weight, tokens)
    vocab_size = weight.shape[0]
    _check_tokens(tokens, 0, vocab_size, ignore_index)  # vocabulary slices would turn a bad id into -lse
    resolved = _resolve_backend(backend, hidden.device)
    outs = _FromHiddenFunction.apply(
        hidden, weight, tokens, float(temperature), ignore_index, compute_entropy,
        _default_vocab_chunk(vocab_size, chunk_size), resolved,
    )  # fmt: skip
    return outs if compute_entropy else (outs, None)


# --------------------------------------------------------------------------------------------------
# Vocab-parallel (tensor-parallel output layer)
# --------------------------------------------------------------------------------------------------


def _vocab_parallel_forward(
    logits_shard: Tensor, tokens: Tensor, vocab_start: int, temperature: float, ignore_index: int, group, chunk_size
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(log_probs, lse, entropy, local_tokens)``; ``local_tokens`` is ``ignore_index`` off-shard."""
    import torch.distributed as dist

    num_rows, shard_size = logits_shard.shape
    device = logits_shard.device
    # Per row, over this shard: max m, s = sum exp(z - m), w = sum exp(z - m) (z - m), and the chosen
    # logit. Shifted by m so that peaked rows keep their small entropy (see _torch_forward_chunk).
    row_max = torch.empty(num_rows, dtype=torch.float32, device=device)
    sums = torch.zeros(3, num_rows, dtype=torch.float32, device=device)
    local_tokens = _local_tokens(tokens, vocab_start, vocab_start + shard_size, ignore_index)
    off_shard = local_tokens == ignore_index
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        z = _scaled_float(logits_shard[start:end], temperature)
        m = z.max(dim=-1).values
        chosen = z.gather(-1, local_tokens[start:end].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums[2, start:end] = chosen.masked_fill(off_shard[start:end], 0.0)
        z.sub_(m.unsqueeze(-1))
        e = torch.exp(z)
        sums[0, start:end] = e.sum(-1)
        sums[1, start:end] = e.mul_(z).sum(-1)
        row_max[start:end] = m
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # Move each rank's sums to the global max M: sum exp(z - M) (z - M) = r (w + (m - M) s), r = exp(m - M).
    rescale = torch.exp(row_max - global_max)
    sums[1].add_(sums[0] * (row_max - global_max)).mul_(rescale)
    sums[0].mul_(rescale)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # one collective for all three sums
    sum_exp, sum_exp_shifted_z, chosen = sums
    shifted_lse = torch.log(sum_exp)
    lse = global_max + shifted_lse
    entropy = shifted_lse - sum_exp_shifted_z / sum_exp
    log_probs = (chosen - lse).masked_fill(tokens == ignore_index, 0.0)
    return log_probs, lse, entropy, local_tokens


class _VocabParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_shard, tokens, vocab_start, temperature, ignore_index, group, chunk_size):
        log_probs, lse, entropy, local_tokens = _vocab_parallel_forward(
            logits_shard, tokens, vocab_start, temperature, ignore_index, group, chunk_size
        )
        ctx.save_for_backward(logits_shard, tokens, local_tokens, lse, entropy)
        ctx.config = (temperature, ignore_index, chunk_size)
        ctx.set_materialize_grads(False)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits_shard, tokens, local_tokens, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, chunk_size = ctx.config
        grad_log_probs = _mask_ignored(grad_log_probs, tokens, ignore_index)
        # No communication: p_j = exp(z_j - lse) uses the global lse, and the upstream gradients are
        # the same on every TP rank (the loss is computed redundantly per rank, as in Megatron-LM).
        out = torch.empty_like(logits_shard)
        _row_backward(
            logits_shard, local_tokens, lse, entropy, grad_log_probs, grad_entropy,
            temperature, ignore_index, chunk_size, "torch", out,
        )  # fmt: skip
        return out, None, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits_shard: Tensor,
    tokens: Tensor,
    *,
    vocab_start: int,
    group,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropy when each tensor-parallel rank holds a contiguous vocabulary shard.

    Rank ``r`` holds columns ``[vocab_start, vocab_start + V/tp)`` of the logits (Megatron-LM's
    ``VocabParallelEmbedding``/``ColumnParallelLinear`` output layer). One ``MAX`` all-reduce of the
    per-row maxima and one ``SUM`` all-reduce of ``[sum exp, sum exp * z, chosen logit]`` give the
    global ``lse = M + log S``, ``H = lse - W / S`` and ``log p_y = z_y - lse``; the target's logit
    comes from the rank that owns it. The backward is local (module docstring formula on the shard).
    Every rank gets the same outputs; pass them the same upstream gradients. The torch chunked path
    runs on every device (the Triton kernels cover the unsharded functions).

    Args:
        logits_shard: ``[T, V/tp]`` this rank's logits shard, float32/bfloat16/float16.
        tokens: ``[T]`` global target ids in ``[0, V)`` or ``ignore_index``, identical on all ranks.
        vocab_start: first global vocabulary id of this rank's shard.
        group: the tensor-parallel ``torch.distributed`` process group (``None`` for the default group).
        temperature: divides the logits before the softmax (> 0).
        chunk_size: tokens per chunk of local work; ``None`` picks ``~4M / (V/tp)``.
        ignore_index: token id marking positions without a target.

    Returns:
        ``(log_probs [T], entropy [T])``, float32, the same on every rank, differentiable w.r.t. the shard.
    """
    _check_temperature(temperature)
    if logits_shard.dim() != 2 or tokens.shape != logits_shard.shape[:1]:
        raise ValueError(
            f"logits_shard must be [T, V/tp] and tokens [T]; got {tuple(logits_shard.shape)} and {tuple(tokens.shape)}"
        )
    if vocab_start < 0:
        raise ValueError(f"vocab_start={vocab_start} must be >= 0 (the shard's first global vocabulary id)")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32, got {tokens.dtype}")
    return _VocabParallelFunction.apply(
        logits_shard, tokens, vocab_start, float(temperature), ignore_index, group,
        _default_chunk_size(logits_shard.shape[1], chunk_size),
    )  # fmt: skip
