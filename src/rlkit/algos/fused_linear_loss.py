"""A per-token RL loss straight from the last hidden states, with its gradient formed in the forward.

``logprobs_and_entropy_from_hidden`` returns per-token log-probs and entropies that the caller feeds to a
loss; their upstream gradients are only known after the forward, so its backward recomputes the
``[T, V]`` logits: 4 products of ``2 T V H`` FLOPs against a plain linear layer's 3 (>= 1.33x the matmul
floor by design). When the loss is a *sum over tokens* of a function of each token's log-prob and
entropy, the gradient can be formed in the forward instead (the idea of Liger-Kernel's fused linear
cross-entropy, Hsu et al. 2024, and verl's ``linear_cross_entropy``), and rlkit's losses are such sums
once the normalizer is global (``rlkit.algos.aggregation``): policy clip, TIS weights, KL against
reference log-probs, entropy bonus, under ``token_mean``, ``sample_mean`` and ``seq_mean_token_sum_norm``.

Per chunk of ``c`` tokens (``z = hidden_c @ W.T / tau``; ``g``, ``h`` per token)::

    z                = hidden_c @ W.T                       [c, V]   product 1
    log p_y, H       = row pass over z (one read)                    rlkit.algos.logprobs
    g, h             = d loss_fn / d log p_y,  d loss_fn / d H       autograd on [c] vectors
    dL/dz_j          = (g ([j == y] - p_j) - h p_j (log p_j + H)) / tau   written over z
    grad_hidden_c    = dL/dz @ W                            [c, H]   product 2 (fp32 inside, one rounding)
    grad_W          += dL/dz.T @ hidden_c                   [V, H]   product 3

3 products (``6 T V H`` FLOPs, the matmul floor) and one ``[c, V]`` buffer; the backward only scales the
saved gradients by the incoming scalar. A sequence-level term (GSPO's length-normalised ratio) couples
the tokens of a sample and does not decompose: use ``logprobs_and_entropy_from_hidden`` for it.

Shapes: ``T`` tokens, ``V`` vocabulary, ``H`` hidden size, ``c`` tokens per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rlkit.algos.logprobs import (
    IGNORE_INDEX,
    Backend,
    _check_hidden_inputs,
    _check_temperature,
    _check_tokens,
    _default_chunk_size,
    _mask_ignored,
    _resolve_backend,
    _row_backward,
    _row_forward,
)
from rlkit.algos.losses import PolicyLossConfig, rl_loss

LossFn = Callable[[Tensor, "Tensor | None", slice], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
"""``loss_fn(log_probs [c], entropy [c] | None, chunk: slice) -> loss`` or ``(loss, metrics)``.

``loss`` is the 0-dim share of the chunk's tokens in a loss that is a SUM over tokens (the sum over
chunks is the whole loss); ``chunk`` selects the chunk's tokens in every ``[T]`` tensor the function
closes over. Gradients flow only through ``log_probs`` and ``entropy``. Metrics are 0-dim tensors that
are summed over chunks (true for rlkit's weighted-sum metrics)."""

# Tokens per chunk. The [c, V] logits buffer is the only large allocation (c x V x 2 bytes in bf16: 594 MB
# for 2048 tokens at V = 151,936). Each chunk also costs a fixed ~1 ms on an H100 at Qwen3-4B's shape
# (two row passes over the buffer, loss_fn's ~100 small kernels, grad_W read and re-written): measured
# 1.28-1.30x of the matmul floor with 2048 tokens, 1.24-1.25x with 4096, 1.35-1.41x with 1024, ~2x with
# 512, at 4K-32K tokens (benchmarks/RESULTS.md, 2026-11-23).
_DEFAULT_TOKEN_CHUNK = 2048


class FusedLossOutput(NamedTuple):
    """What :func:`fused_loss_from_hidden` returns."""

    loss: Tensor
    """0-dim float32, differentiable w.r.t. ``hidden`` and ``weight``."""
    metrics: dict[str, Tensor]
    """Detached 0-dim metrics of ``loss_fn``, summed over chunks (empty if it returns none)."""
    log_probs: Tensor
    """``[T]`` float32, detached: log-probs of the targets (0 at ``ignore_index``)."""
    entropy: Tensor | None
    """``[T]`` float32, detached, or ``None`` without ``compute_entropy``."""


class _ScaleSavedGrads(torch.autograd.Function):
    """Returns ``loss``; its backward hands out the gradients formed in the forward, times ``dL_out/dloss``."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.used = False
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError(
                "fused_loss_from_hidden: backward ran twice through the same loss (retain_graph=True); "
                "its gradients are scaled in place, so call fused_loss_from_hidden again instead"
            )
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place and unconditional: no host sync to test for grad_loss == 1, no second |W| buffer.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss)  # a 0-dim float32 factor: no rounding of the scale
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss)
        return None, grad_hidden, grad_weight, None, None


def _split_loss(out) -> tuple[Tensor, dict[str, Tensor]]:
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(
            "loss_fn must return a 0-dim tensor (the chunk's share of a loss summed over tokens) or "
            f"(loss, metrics); got {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}"
        )
    return loss, metrics


def fused_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    loss_fn: LossFn,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compute_entropy: bool = True,
    ignore_index: int = IGNORE_INDEX,
    backend: Backend = "auto",
    grad_weight_fp32: bool = False,
) -> FusedLossOutput:
    """``loss = sum_chunks loss_fn(log p, H, chunk)`` of ``softmax(hidden @ weight.T / tau)``, gradient in the forward.

    Equal to ``loss_fn`` applied to :func:`~rlkit.algos.logprobs.logprobs_and_entropy_from_hidden`'s
    outputs (module docstring for the algorithm), in 3 products instead of 4 and with one
    ``[chunk_size, V]`` buffer of extra memory. ``loss_fn`` must be a sum over tokens of per-token terms
    (any rlkit loss with a global normalizer; :func:`rl_loss_fn` builds it for :func:`rl_loss`).

    Precision: the logits and their gradient are held in the hidden states' dtype, as an unfused model
    holds them; row math is float32. ``grad_hidden`` of a chunk is one product over the whole vocabulary
    (float32 accumulation inside, one rounding). ``grad_W`` sums ``ceil(T / chunk_size)`` products: in the
    weight's dtype by default (one rounding per chunk), in float32 with ``grad_weight_fp32`` (one
    rounding at the end; the float32 accumulator costs ``4 V H`` bytes more memory).

    Args:
        hidden: ``[T, H]`` last hidden states (after the final norm), float32/bfloat16/float16.
        weight: ``[V, H]`` output (LM head) weight, same dtype and device.
        tokens: ``[T]`` int64/int32 target ids in ``[0, V)`` or ``ignore_index``.
        loss_fn: ``loss_fn(log_probs [c], entropy [c] | None, chunk) -> loss | (loss, metrics)``, see ``LossFn``.
        temperature: divides the logits before the softmax, as the sampler did (> 0).
        chunk_size: tokens per chunk; ``None`` picks 2048 (the extra memory is ``chunk_size x V`` elements
            of the hidden dtype; smaller saves memory and costs speed, see ``_DEFAULT_TOKEN_CHUNK``).
        compute_entropy: pass the entropy to ``loss_fn`` (otherwise ``None``; the row pass skips it).
        ignore_index: token id marking positions without a target (``log p = 0``, no gradient through it).
        backend: row-pass backend as in ``logprobs_and_entropy`` (Triton on CUDA by default).
        grad_weight_fp32: accumulate ``grad_W`` over chunks in float32.

    Returns:
        ``FusedLossOutput(loss, metrics, log_probs, entropy)``; only ``loss`` is differentiable.
    """
    _check_temperature(temperature)
    _check_hidden_inputs(hidden, weight, tokens)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk), or None for 2048")
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    hidden_in, weight_in = hidden, weight
    resolved = _resolve_backend(backend, hidden.device)
    # The Triton row pass marks out-of-range ids with a NaN log-prob itself; checking here would sync.
    _check_tokens(tokens, 0, vocab_size, ignore_index, check_range=resolved != "triton")
    chunk = min(num_tokens, chunk_size or _DEFAULT_TOKEN_CHUNK) or 1
    row_chunk = _default_chunk_size(vocab_size, None)  # rows per float32 copy in the torch row pass

    grad_enabled = torch.is_grad_enabled()
    need_hidden = grad_enabled and hidden.requires_grad
    need_weight = grad_enabled and weight.requires_grad
    hidden, weight = hidden.detach(), weight.detach()
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    if need_weight:
        grad_weight = torch.empty_like(weight, dtype=torch.float32 if grad_weight_fp32 else weight.dtype)
    if grad_weight is not None and num_tokens == 0:
        grad_weight.zero_()  # no chunk writes it
    log_probs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(log_probs) if compute_entropy else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    metrics: dict[str, Tensor] = {}

    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        with torch.no_grad():
            logits = hidden[rows] @ weight.T  # [c, V], overwritten with its gradient below
            lp, lse, ent = _row_forward(
                logits, tokens[rows], temperature, ignore_index, compute_entropy, row_chunk, resolved
            )
        log_probs[rows] = lp
        if entropy is not None:
            entropy[rows] = ent
        with torch.enable_grad():
            lp_in = lp.requires_grad_(need_hidden or need_weight)
            ent_in = None if ent is None else ent.requires_grad_(need_hidden or need_weight)
            loss, chunk_metrics = _split_loss(loss_fn(lp_in, ent_in, rows))
            grads = (None, None)
            if (need_hidden or need_weight) and loss.requires_grad:
                inputs = [lp_in] if ent_in is None else [lp_in, ent_in]
                grads = (*torch.autograd.grad(loss, inputs, allow_unused=True), None)[:2]
        total += loss.detach().float()
        for name, value in chunk_metrics.items():
            metrics[name] = metrics[name] + value.detach() if name in metrics else value.detach()
        if not (need_hidden or need_weight):
            continue
        with torch.no_grad():
            g_lp = _mask_ignored(grads[0], tokens[rows], ignore_index)
            _row_backward(
                logits, tokens[rows], lse, ent, g_lp, grads[1],
                temperature, ignore_index, row_chunk, resolved, logits,
            )  # fmt: skip
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                _accumulate_grad_weight(grad_weight, logits, hidden[rows], first=start == 0)
        del logits

    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if need_hidden or need_weight:
        loss = _ScaleSavedGrads.apply(total, hidden_in, weight_in, grad_hidden, grad_weight)
    else:
        loss = total
    return FusedLossOutput(loss, metrics, log_probs, entropy)


def _accumulate_grad_weight(grad_weight: Tensor, grad_logits: Tensor, hidden_rows: Tensor, *, first: bool) -> None:
    """``grad_W (+)= grad_logits.T @ hidden_rows``; the first chunk writes (no zero fill, no read)."""
    if grad_weight.dtype == grad_logits.dtype:
        if first:
            torch.mm(grad_logits.T, hidden_rows, out=grad_weight)
        else:
            grad_weight.addmm_(grad_logits.T, hidden_rows)
        return
    if first:
        grad_weight.zero_()
    _addmm_float32_(grad_weight, grad_logits.T, hidden_rows)


def _addmm_float32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` and low-precision ``a``, ``b``, without an ``[M, N]`` temporary."""
    if acc.is_cuda:
        try:  # cuBLAS writes the float32 accumulation straight into acc (torch >= 2.8, CUDA only)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    # Row blocks of the product, each rounded once to the operands' dtype and added in float32.
    rows_per_block = max(1, (1 << 24) // max(1, acc.shape[1]))
    for start in range(0, acc.shape[0], rows_per_block):
        block = slice(start, start + rows_per_block)
        acc[block].add_(a[block] @ b)


def rl_loss_fn(
    old_log_probs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    config: PolicyLossConfig,
    normalizer: float,
    ref_log_probs: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_loss_token_counts: Tensor | None = None,
    metrics_normalizer: float | None = None,
    policy_loss: Literal["ppo", "gspo"] = "ppo",
) -> LossFn:
    """:func:`~rlkit.algos.losses.rl_loss` as a ``loss_fn`` for :func:`fused_loss_from_hidden`.

    Every ``[T]`` tensor is sliced to the chunk and ``rl_loss`` runs on the slices with the same global
    ``normalizer``; its weights are per token (``token_weights``), so the sum over chunks is the
    unchunked ``rl_loss``, and so is each metric. Under ``sample_mean`` the per-sample loss-token counts
    are taken from the whole ``loss_mask`` once (a chunk may hold part of a sample) unless given.

    Args:
        old_log_probs, advantages, loss_mask: ``[T]`` packed, aligned with the hidden states' tokens
            (flatten a padded ``[B, T]`` batch and pass ``sample_ids`` = row index).
        config, normalizer, ref_log_probs, rollout_log_probs, sample_ids, sample_loss_token_counts,
            metrics_normalizer: as for :func:`~rlkit.algos.losses.rl_loss`.
        policy_loss: ``"ppo"`` (``rl_loss``'s clipped token ratio). ``"gspo"`` is refused: its sequence
            ratio couples the tokens of a sample, so the loss is not a sum of per-token terms.

    Returns:
        ``loss_fn(log_probs, entropy, chunk) -> (loss, metrics)``.
    """
    if policy_loss == "gspo":
        raise ValueError(
            "policy_loss='gspo': GSPO's length-normalised sequence ratio couples all tokens of a sample, so "
            "its loss is not a sum of per-token terms and cannot be formed chunk by chunk in the forward; use "
            "logprobs_and_entropy_from_hidden(...) then gspo_policy_loss(...) and backward()"
        )
    if policy_loss != "ppo":
        raise ValueError(f"policy_loss={policy_loss!r}: use 'ppo' (or 'gspo', which is refused here)")
    if loss_mask.dim() != 1:
        raise ValueError(f"loss_mask must be packed [T], got {tuple(loss_mask.shape)}; flatten and pass sample_ids")
    if config.aggregation == "sample_mean" and sample_loss_token_counts is None:
        if sample_ids is None:
            raise ValueError("aggregation='sample_mean' on packed [T] tokens needs sample_ids")
        # n_s over the whole micro-batch, counted as token_weights counts them (tokens with mask != 0).
        active = loss_mask != 0
        ids = torch.where(active, sample_ids, torch.zeros_like(sample_ids)).long()
        num_samples = int(ids.max()) + 1 if ids.numel() else 1
        sample_loss_token_counts = torch.zeros(num_samples, dtype=torch.float64, device=ids.device)
        sample_loss_token_counts.index_add_(0, ids, active.to(torch.float64))

    def part(t: Tensor | None, rows: slice) -> Tensor | None:
        return None if t is None else t[rows]

    def loss_fn(log_probs: Tensor, entropy: Tensor | None, rows: slice):
        return rl_loss(
            log_probs, old_log_probs[rows], advantages[rows], loss_mask[rows],
            config=config, normalizer=normalizer, ref_log_probs=part(ref_log_probs, rows),
            entropy=entropy,
            rollout_log_probs=part(rollout_log_probs, rows), sample_ids=part(sample_ids, rows),
            sample_loss_token_counts=sample_loss_token_counts, metrics_normalizer=metrics_normalizer,
        )  # fmt: skip

    return loss_fn
