"""Training a Hugging Face causal LM on one device: packed micro-batches, exact global loss.

The single-device counterpart of ``rlkit.parallel.megatron``: the same :class:`DataPacker` plan and the
same ``rlkit.algos`` loss, with the model's forward on right-padded micro-batches (HF models without
variable-length attention cannot take packed THD input on every backend, and on one device padding only
costs compute, never correctness).

Per-token training inputs travel on the samples, one float per response token, under fixed
``Sample.metadata`` keys: ``"advantages"`` (required), ``"old_log_probs"`` (behaviour policy; when absent the
current log-probs, detached, are used: exact for the first step on fresh rollouts), ``"ref_log_probs"``
(with ``use_kl_loss``) and ``"rollout_log_probs"`` (with ``use_tis``).

Token alignment: logits at position ``t`` predict token ``t + 1``, so the ``R`` response tokens
``tokens[P : P + R]`` are scored by the logits at positions ``P - 1 ... P + R - 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlkit.algos.logprobs import logprobs_and_entropy
from rlkit.algos.losses import PolicyLossConfig, rl_loss
from rlkit.parallel.packing import DataPacker
from rlkit.rollout.sample import Sample

PER_TOKEN_KEYS = ("advantages", "old_log_probs", "ref_log_probs", "rollout_log_probs")


def response_logprobs(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    *,
    pad_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of every sample's response tokens under ``softmax(logits / temperature)``.

    Args:
        model: an HF-style causal LM, ``model(input_ids=, attention_mask=).logits`` of shape ``[B, L, V]``.
        samples: ``B`` samples with ``tokens`` (prompt + response) and ``response_length`` ``R_i >= 1``.
        pad_id: id used for right padding (masked out by the attention mask).
        temperature: the sampler's temperature, so log-probs match the rollout distribution.
        with_entropy: also return the entropy per response position.

    Returns:
        ``(log_probs, entropy)``: float32 ``[sum_i R_i]`` each, sample after sample (entropy ``None`` unless
        asked), differentiable w.r.t. the model parameters.
    """
    device = next(model.parameters()).device
    width = max(len(s.tokens) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        if sample.response_length < 1 or sample.prompt_length < 1:
            raise ValueError(
                f"sample {row}: needs >= 1 prompt and >= 1 response token, got prompt {sample.prompt_length}, "
                f"response {sample.response_length}"
            )
        input_ids[row, : len(sample.tokens)] = torch.tensor(sample.tokens)
        attention_mask[row, : len(sample.tokens)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    rows = torch.cat([logits[row, s.prompt_length - 1 : len(s.tokens) - 1] for row, s in enumerate(samples)])
    targets = torch.cat([torch.tensor(s.response_tokens) for s in samples]).to(device)
    return logprobs_and_entropy(rows, targets, temperature=temperature, compute_entropy=with_entropy)


def _per_token(samples: Sequence[Sample], key: str, device: torch.device) -> torch.Tensor:
    missing = [i for i, s in enumerate(samples) if key not in s.metadata]
    if missing:
        raise ValueError(f"samples {missing[:5]} have no metadata[{key!r}] (one float per response token)")
    return torch.cat([torch.as_tensor(s.metadata[key], dtype=torch.float32) for s in samples]).to(device)


@torch.no_grad()
def store_response_logprobs(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    packer: DataPacker,
    key: str,
    *,
    pad_id: int,
    temperature: float = 1.0,
) -> None:
    """No-grad pass that writes each sample's response log-probs to ``sample.metadata[key]`` (old / ref policy)."""
    plan = packer.pack([len(s.tokens) for s in samples])
    for micro_indices in plan.micro_batches[0]:
        micro = [samples[i] for i in micro_indices]
        log_probs, _ = response_logprobs(model, micro, pad_id=pad_id, temperature=temperature)
        for sample, chunk in zip(micro, log_probs.split([s.response_length for s in micro]), strict=True):
            sample.metadata[key] = chunk.cpu().tolist()


def accumulate_policy_gradients(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    packer: DataPacker,
    loss_config: PolicyLossConfig,
    *,
    pad_id: int,
    temperature: float = 1.0,
    max_response_len: int | None = None,
) -> dict[str, float]:
    """Backward of the RL loss of one global batch, micro-batch by micro-batch (no optimizer step).

    The normalizer of ``loss_config.aggregation`` is computed once from the whole batch
    (``PackPlan.normalizer``), so the gradients accumulated in ``.grad`` equal the gradient of the unsplit
    batch's loss, whatever the token budget (``rlkit.algos.aggregation``).

    Args:
        model: the policy (parameters receive ``.grad``; call ``zero_grad`` before).
        samples: the global batch, with the per-token ``metadata`` keys of the module docstring.
        packer: micro-batch plan; this backend computes DP rank 0's micro-batches (set ``dp_size=1``).
        loss_config: ``rlkit.algos.losses.PolicyLossConfig``.
        pad_id: padding id for the forward.
        temperature: the sampler's temperature.
        max_response_len: needed by the ``seq_mean_token_sum_norm`` aggregation.

    Returns:
        Global-batch metrics (sums over micro-batches of ``rl_loss``'s metrics) and ``micro_batches``.
    """
    if packer.dp_size != 1:
        raise ValueError(f"this backend runs one rank: DataPacker(dp_size={packer.dp_size}) must have dp_size=1")
    device = next(model.parameters()).device
    loss_tokens = [sum(s.effective_loss_mask()) for s in samples]
    plan = packer.pack([len(s.tokens) for s in samples], loss_token_counts=loss_tokens)
    normalizer = plan.normalizer(loss_config.aggregation, max_response_len=max_response_len)
    metrics_normalizer = plan.normalizer("token_mean")
    totals: dict[str, float] = {}
    for micro_indices in plan.micro_batches[0]:
        micro = [samples[i] for i in micro_indices]
        log_probs, entropy = response_logprobs(model, micro, pad_id=pad_id, temperature=temperature, with_entropy=True)
        has_old = all("old_log_probs" in s.metadata for s in micro)
        loss, metrics = rl_loss(
            log_probs,
            _per_token(micro, "old_log_probs", device) if has_old else log_probs.detach(),
            _per_token(micro, "advantages", device),
            torch.cat([torch.tensor(s.effective_loss_mask(), dtype=torch.float32) for s in micro]).to(device),
            config=loss_config,
            normalizer=normalizer,
            entropy=entropy,
            ref_log_probs=_per_token(micro, "ref_log_probs", device) if loss_config.use_kl_loss else None,
            rollout_log_probs=_per_token(micro, "rollout_log_probs", device) if loss_config.use_tis else None,
            sample_ids=torch.cat([torch.full((s.response_length,), k) for k, s in enumerate(micro)]).to(device),
            metrics_normalizer=metrics_normalizer,
        )
        loss.backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals | {"micro_batches": float(plan.num_micro_batches)}
