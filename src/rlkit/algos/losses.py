"""Per-token loss terms for RL post-training: PPO clip (clip-higher, dual clip), KL, entropy, TIS, GSPO, MTP, SFT.

Every term is a plain function returning per-token tensors; the caller turns them into the scalar
to backpropagate with :func:`rlkit.algos.aggregation.aggregate` and a normalizer computed once for
the global batch. :func:`rl_loss` chains the usual terms (the slime ``policy_loss`` path) and
returns ``(loss, metrics)`` with detached 0-dim metrics under stable names.

Numerics. Log-ratios are clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20]`` before
``exp`` so an extreme mismatch (e.g. a token the old policy sampled with log-prob -80) gives a ratio of
at most ``e^20`` instead of ``inf`` and the loss stays finite. Beyond the clamp the gradient through
the ratio is 0; at that point PPO's clip has already zeroed it (A > 0: ratio > 1 + eps) or dual clip
bounds it (A < 0 with ``eps_clip_c``).

Shapes: ``T`` tokens (packed ``[T]`` or padded ``[B, T]``; every per-token function accepts any
shape as long as its inputs agree), ``V`` vocabulary. Log-probs are natural-log probabilities of the
sampled tokens, float32 or float64; results keep the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit.algos.aggregation import AGGREGATION_MODES, AggregationMode, token_weights, weighted_sum

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to [-20, 20] before exp (verl's low_var_kl guard; e^20 ~ 4.9e8)."""

LOW_VAR_KL_CLAMP = 10.0
"""``low_var_kl`` values are clamped to [-10, 10] (slime ``compute_approx_kl``, verl ``kl_penalty``)."""

KLType = Literal["k1", "k2", "k3", "low_var_kl"]
KL_TYPES: tuple[str, ...] = get_args(KLType)


def _same_shape(**tensors: Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.shape != ref.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")


def _check_clip(eps_clip: float, eps_clip_high: float | None, eps_clip_c: float | None) -> None:
    """One place for the clip-width rules, used by :func:`ppo_policy_loss` and :class:`PolicyLossConfig`."""
    if eps_clip < 0:
        raise ValueError(f"eps_clip={eps_clip} must be >= 0 (PPO uses 0.2)")
    if eps_clip_high is not None and eps_clip_high < 0:
        raise ValueError(f"eps_clip_high={eps_clip_high} must be >= 0 (DAPO uses 0.28) or None")
    if eps_clip_c is not None and not eps_clip_c > 1.0:
        raise ValueError(
            f"eps_clip_c={eps_clip_c} must be > 1 (dual clip bounds the loss by c|A|; typically 3.0) or None to disable"
        )


def _check_tis_clip(tis_clip: float, tis_clip_low: float) -> None:
    if not 0 <= tis_clip_low <= tis_clip or tis_clip <= 0:
        raise ValueError(f"need 0 <= tis_clip_low={tis_clip_low} <= tis_clip={tis_clip}, tis_clip > 0")


def _safe_exp(log_ratio: Tensor) -> Tensor:
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


# ---------------------------------------------------------------------------------------------------
# Policy terms
# ---------------------------------------------------------------------------------------------------
def ppo_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token, with DAPO clip-higher and dual clip.

    With ``r = exp(log_probs - old_log_probs)`` (log-ratio clamped to ±20):
    ``L = max(-A r, -A clip(r, 1 - eps_clip, 1 + eps_clip_high))``; with dual clip and ``A < 0``,
    ``L = min(L, -eps_clip_c A)`` (the loss of a negative-advantage token is bounded by ``c |A|``).
    Schulman et al. 2017 (PPO); Yu et al. 2025 "DAPO" (clip-higher: only the *upper* bound moves);
    Ye et al. 2020 (dual clip). Same convention as slime ``compute_policy_loss``.

    Args:
        log_probs: float ``[T]`` current policy log-probs (requires grad).
        old_log_probs: float ``[T]`` behaviour-policy log-probs (no grad).
        advantages: float ``[T]`` per-token advantages.
        eps_clip: lower clip ``1 - eps_clip`` (slime ``--eps-clip``, 0.2).
        eps_clip_high: upper clip ``1 + eps_clip_high`` (``--eps-clip-high``); None means ``eps_clip``.
        eps_clip_c: dual-clip constant ``c > 1`` (``--eps-clip-c``); None disables dual clip.

    Returns:
        ``(loss [T], metrics)``; metrics are detached per-token tensors: ``ratio``, ``clipfrac``
        (1.0 where the clipped branch is active), ``dual_clipfrac`` (1.0 where the dual clip bound is
        active), ``ppo_kl`` (``old - new`` log-prob, the k1 estimate of KL(old || new)).

    Raises:
        ValueError: ``eps_clip_c <= 1``, negative clip widths, shape mismatch.
    """
    _same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    _check_clip(eps_clip, eps_clip_high, eps_clip_c)
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    log_ratio = log_probs - old_log_probs
    ratio = _safe_exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipfrac = (loss_clipped > loss_unclipped).to(log_probs.dtype)
    dual = torch.zeros_like(clipfrac)
    if eps_clip_c is not None:
        bound = -eps_clip_c * advantages
        negative = advantages < 0
        dual = (negative & (bound < loss)).to(log_probs.dtype)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    metrics = {
        "ratio": ratio.detach(),
        "clipfrac": clipfrac.detach(),
        "dual_clipfrac": dual.detach(),
        "ppo_kl": (-log_ratio).detach(),
    }
    return loss, metrics


def sequence_log_ratio(
    log_probs: Tensor,
    old_log_probs: Tensor,
    loss_mask: Tensor,
    *,
    sample_ids: Tensor | None = None,
) -> Tensor:
    """GSPO's length-normalised sequence log-ratio, broadcast to the sample's tokens.

    ``log s_i = (1/|y_i|) sum_{t in y_i} (log pi(y_t) - log pi_old(y_t))`` over loss-mask tokens;
    Zheng et al. 2025 "Group Sequence Policy Optimization" (eq. 7). The gradient flows through every
    token of the sample. Needs the whole sample: under context parallelism the per-sample sums must be
    reduced across CP ranks first.

    Args:
        log_probs, old_log_probs, loss_mask: ``[B, T]`` (row = sample) or packed ``[T]``.
        sample_ids: int ``[T]`` sample of each packed token (required for ``[T]``).

    Returns:
        float, same shape as ``log_probs``: ``log s_i`` at every token of sample ``i`` (0 on fully
        masked samples).
    """
    _same_shape(log_probs=log_probs, old_log_probs=old_log_probs, loss_mask=loss_mask, sample_ids=sample_ids)
    m = loss_mask.to(log_probs.dtype)
    diff = (log_probs - old_log_probs) * m
    if log_probs.dim() == 2 and sample_ids is None:
        return (diff.sum(-1) / m.sum(-1).clamp_min(1))[:, None].expand_as(diff)
    if sample_ids is None:
        raise ValueError("packed [T] input needs sample_ids")
    ids = torch.where(loss_mask != 0, sample_ids, torch.zeros_like(sample_ids)).long()
    n = int(ids.max()) + 1 if ids.numel() else 1
    sums = torch.zeros(n, dtype=diff.dtype, device=diff.device).index_add(0, ids, diff)
    counts = torch.zeros(n, dtype=diff.dtype, device=diff.device).index_add(0, ids, m)
    # Every token (also masked ones) reads its own sample's value; masked tokens are aggregated with 0.
    own = sample_ids.clamp_min(0).clamp_max(n - 1).long()
    return (sums / counts.clamp_min(1))[own]


def gspo_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    sample_ids: Tensor | None = None,
    eps_clip: float = 3e-4,
    eps_clip_high: float | None = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO clipped loss: PPO's clip applied to the sequence ratio ``s_i`` at every token of sample ``i``.

    ``L_t = max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_high))`` with ``s_i`` from
    :func:`sequence_log_ratio`. Aggregated with ``sample_mean`` this is the paper's objective
    ``(1/G) sum_i min(s_i A_i, clip(s_i) A_i)``. The paper's clip ranges are far smaller than PPO's
    (defaults 3e-4 / 4e-4, Zheng et al. 2025, sec. 5.1).

    Returns:
        ``(loss, metrics)`` as :func:`ppo_policy_loss`, same shape as ``log_probs``.
    """
    log_s = sequence_log_ratio(log_probs, old_log_probs, loss_mask, sample_ids=sample_ids)
    # ppo_policy_loss takes (new, old): pass log s as "new" against 0 as "old".
    return ppo_policy_loss(log_s, torch.zeros_like(log_s), advantages, eps_clip=eps_clip, eps_clip_high=eps_clip_high)


# ---------------------------------------------------------------------------------------------------
# KL, entropy, importance sampling
# ---------------------------------------------------------------------------------------------------
def kl_estimator(log_probs: Tensor, ref_log_probs: Tensor, *, kind: KLType) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of tokens sampled from pi.

    With ``x = log pi - log pi_ref`` (Schulman 2020, "Approximating KL divergence"):

    - ``k1 = x`` (unbiased, high variance, can be negative);
    - ``k2 = x^2 / 2`` (biased, non-negative);
    - ``k3 = exp(-x) - 1 + x`` (unbiased, non-negative, low variance); ``-x`` is clamped to
      ``[-20, 20]`` before ``exp`` so it is finite for any input (slime's k3 has no clamp and
      overflows to inf past ``x < -88`` in float32; for ``|x| <= 20`` the values are identical);
    - ``low_var_kl`` = ``k3`` then clamped to ``[-10, 10]`` (slime ``compute_approx_kl`` applies this
      output clamp for ``low_var_kl`` only; verl's ``kl_penalty`` applies both clamps). The output
      clamp bites for ``x < -2.611`` or ``x > 11.0`` and zeroes the gradient there.

    Usable as a loss (``--use-kl-loss``, coefficient ``--kl-loss-coef``, gradient w.r.t.
    ``log_probs``) and, detached, as a per-token reward penalty (``--kl-coef``).

    Args:
        log_probs: float ``[T]`` policy log-probs.
        ref_log_probs: float ``[T]`` reference-model log-probs.
        kind: one of ``KL_TYPES``.

    Returns:
        float ``[T]``.
    """
    _same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    x = log_probs - ref_log_probs
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    if kind in ("k3", "low_var_kl"):
        neg = (-x).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = torch.exp(neg) - 1.0 - neg
        return k3.clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP) if kind == "low_var_kl" else k3
    raise ValueError(f"kind={kind!r} is not a KL estimator; use one of {list(KL_TYPES)}")


def entropy_loss(entropy: Tensor, *, entropy_coef: float) -> Tensor:
    """Entropy bonus as a per-token loss: ``-entropy_coef * H_t`` (minimising it raises entropy).

    Args:
        entropy: float ``[T]`` per-token entropy of the policy (``rlkit.algos.logprobs``).
        entropy_coef: slime ``--entropy-coef`` (default 0).

    Returns:
        float ``[T]``.
    """
    return -entropy_coef * entropy


def tis_weights(
    train_log_probs: Tensor,
    rollout_log_probs: Tensor,
    *,
    tis_clip: float = 2.0,
    tis_clip_low: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling weights for the rollout-engine / trainer mismatch.

    ``w_t = clip(exp(log pi_train(y_t) - log pi_rollout(y_t)), tis_clip_low, tis_clip)``, detached,
    multiplied into the per-token policy loss. The rollout engine (SGLang, FP8 kernels, another
    batch shape) samples from a slightly different distribution than the trainer computes; TIS
    reweights toward the trainer's policy with a cap on the variance (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; slime ``--use-tis``,
    ``--tis-clip`` default 2.0, ``--tis-clip-low`` default 0).

    Args:
        train_log_probs: float ``[T]`` trainer log-probs of the behaviour policy (the "old" ones).
        rollout_log_probs: float ``[T]`` log-probs reported by the rollout engine.
        tis_clip: upper cap (> 0).
        tis_clip_low: lower cap (>= 0, <= tis_clip).

    Returns:
        ``(weights [T], metrics)``; metrics (detached, per token): ``tis`` (unclipped ratio),
        ``tis_clipfrac`` (1.0 where the cap changed the weight), ``tis_abs`` (``|ratio - 1|``).
    """
    _same_shape(train_log_probs=train_log_probs, rollout_log_probs=rollout_log_probs)
    _check_tis_clip(tis_clip, tis_clip_low)
    ratio = _safe_exp((train_log_probs - rollout_log_probs).detach())
    weights = ratio.clamp(tis_clip_low, tis_clip)
    metrics = {"tis": ratio, "tis_clipfrac": (weights != ratio).to(ratio.dtype), "tis_abs": (ratio - 1).abs()}
    return weights, metrics


# ---------------------------------------------------------------------------------------------------
# Cross-entropy terms: SFT and MTP
# ---------------------------------------------------------------------------------------------------
def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy ``-log softmax(logits)[label]``, computed in float32 (or float64).

    Aggregate with the loss mask (``aggregate(sft_loss(...), loss_mask, mode="token_mean", ...)``);
    labels at masked positions may hold any valid id.

    Args:
        logits: float ``[T, V]`` (or ``[B, T, V]``), already aligned to ``labels`` (position ``t``
            predicts ``labels[t]``).
        labels: int ``[T]`` (or ``[B, T]``).

    Returns:
        float ``[T]`` (or ``[B, T]``), float32 unless ``logits`` is float64.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + [V]")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(-1, logits.shape[-1]).to(dtype)
    return F.cross_entropy(flat, labels.reshape(-1).long(), reduction="none").reshape(labels.shape)


def mtp_loss(
    mtp_logits: Sequence[Tensor],
    labels: Tensor,
    loss_mask: Tensor,
    *,
    mtp_loss_scaling_factor: float = 0.1,
    sample_ids: Tensor | None = None,
) -> Tensor:
    """Multi-token-prediction loss per token: ``(scale / D) * sum_k CE(head_k[t], labels[t + k]) * m[t + k]``.

    Head ``k = 1..D`` at position ``t`` predicts the token ``k`` steps after the main head's target
    (DeepSeek-V3 tech report, sec. 2.2; Megatron-core MTP). Its labels and mask are the main ones
    shifted left by ``k``; targets past the end of the sequence (or of the packed sample, with
    ``sample_ids``) are dropped. Aggregated with the main ``loss_mask`` and the policy's
    ``token_mean`` normalizer this is ``scale * mean_k(sum of CE_k / main loss tokens)``; Megatron-core
    divides each head by its own (shifted) token count instead, which differs only by the ``k``
    dropped tokens per sequence.

    Args:
        mtp_logits: ``D`` tensors of float ``[T, V]`` (or ``[B, T, V]``), head ``k`` at index ``k-1``.
        labels: int ``[T]`` main-head labels (``labels[t] = tokens[t + 1]``), or ``[B, T]``.
        loss_mask: ``[T]`` (or ``[B, T]``) of the main head.
        mtp_loss_scaling_factor: slime/Megatron ``--mtp-loss-scaling-factor`` (Megatron default 0.1).
        sample_ids: int ``[T]``: packed sample of each token; shifts never cross samples.

    Returns:
        float ``[T]`` (or ``[B, T]``).
    """
    if not mtp_logits:
        raise ValueError("mtp_logits is empty: pass one [T, V] tensor per MTP head")
    _same_shape(labels=labels, loss_mask=loss_mask, sample_ids=sample_ids)
    depth = len(mtp_logits)
    seq = labels.shape[-1]
    total = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    for k, logits in enumerate(mtp_logits, start=1):
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"mtp_logits[{k - 1}] {tuple(logits.shape)} must be labels {tuple(labels.shape)} + [V]")
        if k >= seq:
            continue
        shifted_labels = torch.zeros_like(labels)
        shifted_labels[..., : seq - k] = labels[..., k:]
        shifted_mask = torch.zeros_like(loss_mask)
        shifted_mask[..., : seq - k] = loss_mask[..., k:]
        if sample_ids is not None:
            same = torch.zeros_like(sample_ids, dtype=torch.bool)
            same[..., : seq - k] = sample_ids[..., k:] == sample_ids[..., : seq - k]
            shifted_mask = shifted_mask * same.to(shifted_mask.dtype)
        ce = sft_loss(logits, shifted_labels)
        total = total.to(ce.dtype) + torch.where(shifted_mask != 0, ce, torch.zeros_like(ce))
    return (mtp_loss_scaling_factor / depth) * total


# ---------------------------------------------------------------------------------------------------
# The usual RL loss, assembled
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """Hyper-parameters of :func:`rl_loss`, one field per slime flag (defaults are slime's)."""

    eps_clip: float = 0.2
    """``--eps-clip``: lower clip width."""
    eps_clip_high: float | None = None
    """``--eps-clip-high``: upper clip width (DAPO clip-higher); None = ``eps_clip``."""
    eps_clip_c: float | None = None
    """``--eps-clip-c``: dual-clip constant, > 1; None = off."""
    use_kl_loss: bool = False
    """``--use-kl-loss``: add ``kl_loss_coef * KL(pi || pi_ref)``; needs ``ref_log_probs``."""
    kl_loss_coef: float = 0.0
    """``--kl-loss-coef``."""
    kl_loss_type: KLType = "k1"
    """``--kl-loss-type``: ``k1``, ``k2``, ``k3`` or ``low_var_kl``."""
    entropy_coef: float = 0.0
    """``--entropy-coef``: entropy bonus; needs ``entropy`` when non-zero."""
    use_tis: bool = False
    """``--use-tis``: truncated importance sampling against ``rollout_log_probs``."""
    tis_clip: float = 2.0
    """``--tis-clip``: upper cap of the TIS weight."""
    tis_clip_low: float = 0.0
    """``--tis-clip-low``: lower cap of the TIS weight."""
    aggregation: AggregationMode = "sample_mean"
    """``sample_mean`` (slime default) or ``token_mean`` (``--calculate-per-token-loss``) or
    ``seq_mean_token_sum_norm`` (Dr.GRPO)."""

    def __post_init__(self) -> None:
        _check_clip(self.eps_clip, self.eps_clip_high, self.eps_clip_c)
        if self.kl_loss_type not in KL_TYPES:
            raise ValueError(f"kl_loss_type={self.kl_loss_type!r}: use one of {list(KL_TYPES)}")
        _check_tis_clip(self.tis_clip, self.tis_clip_low)
        if self.aggregation not in AGGREGATION_MODES:
            raise ValueError(f"aggregation={self.aggregation!r}: use one of {list(AGGREGATION_MODES)}")


def rl_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    config: PolicyLossConfig,
    normalizer: float,
    ref_log_probs: Tensor | None = None,
    entropy: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_loss_token_counts: Tensor | None = None,
    metrics_normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's share of the RL loss: policy clip (x TIS) + KL loss + entropy bonus, aggregated.

    ``loss = agg(pg * w_tis) + kl_loss_coef * agg(KL) - entropy_coef * agg(H)`` where ``agg`` is
    :func:`~rlkit.algos.aggregation.aggregate` with ``config.aggregation`` and the global
    ``normalizer``; so the sum over micro-batches and DP ranks of ``loss`` and of every metric is the
    global-batch value.

    Args:
        log_probs: float ``[T]`` (or ``[B, T]``) current log-probs (requires grad).
        old_log_probs: same shape, behaviour-policy log-probs.
        advantages: same shape, per-token advantages (``broadcast_to_tokens`` of per-sample ones).
        loss_mask: same shape.
        config: the hyper-parameters.
        normalizer: ``global_normalizer(...)`` of the global batch for ``config.aggregation``.
        ref_log_probs: needed if ``config.use_kl_loss``.
        entropy: needed if ``config.entropy_coef != 0`` (logged when given).
        rollout_log_probs: needed if ``config.use_tis``.
        sample_ids, sample_loss_token_counts: for packed input under ``sample_mean``
            (see :func:`~rlkit.algos.aggregation.token_weights`).
        metrics_normalizer: the global batch's loss-token count (``global_normalizer(..., mode="token_mean")``),
            needed under ``seq_mean_token_sum_norm``: that mode's weights sum to ``tokens / (N L)``, not one, so
            its metrics (clip fractions, KL, TIS weights, entropy) are token means over the global batch
            instead. Under ``token_mean`` and ``sample_mean`` the metrics use the loss's own weights.

    Returns:
        ``(loss, metrics)``: 0-dim loss; metrics are detached 0-dim tensors named ``loss``,
        ``pg_loss``, ``pg_clipfrac``, ``pg_dual_clipfrac``, ``ppo_kl``, and when enabled ``kl_loss``,
        ``entropy``, ``tis``, ``tis_clipfrac``, ``tis_abs``.
    """
    _same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask)
    if config.use_tis and rollout_log_probs is None:
        raise ValueError("config.use_tis=True needs rollout_log_probs (log-probs reported by the rollout engine)")
    if config.use_kl_loss and ref_log_probs is None:
        raise ValueError("config.use_kl_loss=True needs ref_log_probs (reference-model log-probs)")
    if config.entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"config.entropy_coef={config.entropy_coef} needs the per-token entropy")

    # Weights once per micro-batch; every term and metric is a weighted sum with them (== aggregate()).
    agg_weights = token_weights(
        loss_mask,
        mode=config.aggregation,
        normalizer=normalizer,
        sample_ids=sample_ids,
        sample_loss_token_counts=sample_loss_token_counts,
        dtype=log_probs.dtype,
    )

    def agg(values: Tensor) -> Tensor:
        return weighted_sum(values, agg_weights)

    metric_weights = agg_weights
    if config.aggregation == "seq_mean_token_sum_norm":
        if metrics_normalizer is None:
            raise ValueError(
                "aggregation='seq_mean_token_sum_norm' needs metrics_normalizer (the global loss-token count, "
                "global_normalizer(..., mode='token_mean')): its loss weights do not sum to one, so they cannot "
                "average the metrics"
            )
        metric_weights = token_weights(
            loss_mask, mode="token_mean", normalizer=metrics_normalizer, dtype=log_probs.dtype
        )

    def mean(values: Tensor) -> Tensor:
        return weighted_sum(values, metric_weights)

    pg, pg_metrics = ppo_policy_loss(
        log_probs,
        old_log_probs,
        advantages,
        eps_clip=config.eps_clip,
        eps_clip_high=config.eps_clip_high,
        eps_clip_c=config.eps_clip_c,
    )
    metrics: dict[str, Tensor] = {}
    if config.use_tis:
        assert rollout_log_probs is not None
        is_weights, tis_metrics = tis_weights(
            old_log_probs, rollout_log_probs, tis_clip=config.tis_clip, tis_clip_low=config.tis_clip_low
        )
        pg = pg * is_weights
        metrics.update({name: mean(v) for name, v in tis_metrics.items()})
    pg_loss = agg(pg)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss
    metrics["pg_clipfrac"] = mean(pg_metrics["clipfrac"])
    metrics["pg_dual_clipfrac"] = mean(pg_metrics["dual_clipfrac"])
    metrics["ppo_kl"] = mean(pg_metrics["ppo_kl"])
    if config.use_kl_loss:
        assert ref_log_probs is not None
        kl = kl_estimator(log_probs, ref_log_probs, kind=config.kl_loss_type)
        kl_loss = agg(kl)
        loss = loss + config.kl_loss_coef * kl_loss
        metrics["kl_loss"] = mean(kl.detach()) if metric_weights is not agg_weights else kl_loss
    if entropy is not None:
        ent = agg(entropy)
        loss = loss - config.entropy_coef * ent
        metrics["entropy"] = mean(entropy.detach()) if metric_weights is not agg_weights else ent
    metrics["loss"] = loss
    return loss, {name: v.detach() for name, v in metrics.items()}
