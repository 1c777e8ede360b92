"""fused_loss_from_hidden (torch path) against float64 references written plainly, and against rl_loss."""

from __future__ import annotations

import pytest
import torch

from rlkit.algos.aggregation import global_normalizer
from rlkit.algos.fused_linear_loss import fused_loss_from_hidden, rl_loss_fn
from rlkit.algos.logprobs import logprobs_and_entropy_from_hidden
from rlkit.algos.losses import PolicyLossConfig, rl_loss

IGNORE = -100


def reference_logprobs_entropy(hidden, weight, tokens, temperature, logits_dtype=torch.float64):
    """float64 on full logits: log_softmax, gather, -(softmax * log_softmax).sum; 0 at ignored positions.

    ``logits_dtype``: round the logits' values to it (straight-through for the gradient), as a model
    whose output layer runs in that dtype hands them over; the arithmetic stays float64.
    """
    logits = hidden.double() @ weight.double().T
    logits = logits + (logits.to(logits_dtype).double() - logits).detach()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    chosen = log_p.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.where(tokens != IGNORE, chosen, torch.zeros_like(chosen)), entropy


def rel_err(a, b) -> float:
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make_problem(num_tokens, hidden_size, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    hidden[4] *= 40  # very peaked row: H ~ 0
    hidden[9] *= 1e-3  # nearly flat row: H ~ log V
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    tokens = torch.randint(0, vocab, (num_tokens,), generator=gen)
    tokens[[2, 11]] = IGNORE
    coef = torch.randn(num_tokens, generator=gen)
    return hidden.to(dtype), weight.to(dtype), tokens, coef


def nonlinear_loss(coef):
    """A per-token sum using both outputs non-linearly: sum_t c_t exp(log p_t) + 0.3 H_t^2 - 0.1 c_t H_t."""

    def loss_fn(log_probs, entropy, rows):
        c = coef[rows].to(log_probs.dtype)
        return (c * log_probs.exp() + 0.3 * entropy**2 - 0.1 * c * entropy).sum()

    return loss_fn


# Tolerances (METHOD.md). fp32: float32 products and row math against float64; the peaked row's logits
# (|z| ~ 40) carry float32 round-off of ~5e-6 absolute, which moves the gradients by up to ~2e-5: 5e-5.
# bf16: the reference rounds the logits to bf16 as the model does (on the peaked row that alone moves p
# by ~10%); what remains is the bf16 rounding of the logits' gradient, of grad_hidden, and of grad_W
# once per chunk (2^-9 relative each, summed): 2e-2.
CASES = {
    "fp32": (torch.float32, 1.0, 5e-5),
    "fp32_temp0.7": (torch.float32, 0.7, 5e-5),
    "fp32_temp1.4": (torch.float32, 1.4, 5e-5),
    "bf16_temp0.8": (torch.bfloat16, 0.8, 2e-2),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_loss_and_grads_match_float64(case, chunk_size):
    dtype, temperature, tol = CASES[case]
    hidden, weight, tokens, coef = make_problem(29, 24, 211, dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_loss_from_hidden(h, w, tokens, nonlinear_loss(coef), temperature=temperature, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    assert out.loss.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_lp, ref_ent = reference_logprobs_entropy(h64, w64, tokens, temperature, logits_dtype=dtype)
    ref_loss = nonlinear_loss(coef.double())(ref_lp, ref_ent, slice(None))
    ref_gh, ref_gw = torch.autograd.grad(ref_loss, (h64, w64))
    assert rel_err(out.loss, ref_loss) < tol
    assert rel_err(gh, ref_gh) < tol
    assert rel_err(gw, ref_gw) < tol
    assert rel_err(out.log_probs, ref_lp.detach()) < tol
    # absolute on the entropy, so that the peaked row's tiny H is checked too
    assert (out.entropy.double() - ref_ent.detach()).abs().max() < (5e-5 if dtype == torch.float32 else 5e-2)
    assert (out.log_probs[[2, 11]] == 0).all()
    assert not out.log_probs.requires_grad and not out.entropy.requires_grad


def test_ignored_tokens_pass_no_gradient_through_log_prob():
    # Only ignored tokens carry a log-prob term: the gradient must be exactly 0 (their log p is 0).
    hidden, weight, tokens, _ = make_problem(12, 8, 50, torch.float32)
    tokens[:] = IGNORE
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_loss_from_hidden(h, w, tokens, lambda lp, ent, rows: (5.0 * lp).sum(), compute_entropy=False)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    assert out.loss.item() == 0.0 and out.entropy is None
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_upstream_scale_and_sum_with_other_terms():
    hidden, weight, tokens, coef = make_problem(17, 8, 40, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_loss_from_hidden(h, w, tokens, nonlinear_loss(coef), chunk_size=5)
    extra = (h**2).sum()  # another term that reaches hidden: autograd must add both gradients
    gh, gw = torch.autograd.grad(-2.5 * out.loss + extra, (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp, ent = reference_logprobs_entropy(h64, w64, tokens, 1.0)
    ref = -2.5 * nonlinear_loss(coef.double())(lp, ent, slice(None)) + (h64**2).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (h64, w64))
    assert rel_err(gh, ref_gh) < 1e-5 and rel_err(gw, ref_gw) < 1e-5


def test_grad_weight_fp32_accumulation_and_weight_only():
    hidden, weight, tokens, coef = make_problem(40, 16, 64, torch.bfloat16)
    w = weight.clone().requires_grad_()
    out = fused_loss_from_hidden(hidden, w, tokens, nonlinear_loss(coef), chunk_size=3, grad_weight_fp32=True)
    (gw,) = torch.autograd.grad(out.loss, w)
    w_bf16 = weight.clone().requires_grad_()
    (gw_bf16,) = torch.autograd.grad(
        fused_loss_from_hidden(hidden, w_bf16, tokens, nonlinear_loss(coef), chunk_size=3).loss, w_bf16
    )
    w64 = weight.double().requires_grad_()
    lp, ent = reference_logprobs_entropy(hidden, w64, tokens, 1.0, logits_dtype=torch.bfloat16)
    (ref_gw,) = torch.autograd.grad(nonlinear_loss(coef.double())(lp, ent, slice(None)), w64)
    assert gw.dtype == torch.bfloat16
    # 14 chunks: in fp32 grad_W is rounded to bf16 once at the end (plus the bf16 logits' gradient), in
    # bf16 once per chunk. Measured on this seed: 3e-3 and 6e-3.
    assert rel_err(gw, ref_gw) < 5e-3 and rel_err(gw_bf16, ref_gw) < 1e-2


def test_no_grad_mode_and_frozen_inputs_give_the_loss_only():
    hidden, weight, tokens, coef = make_problem(12, 8, 30, torch.float32)
    with torch.no_grad():
        out = fused_loss_from_hidden(hidden.requires_grad_(), weight, tokens, nonlinear_loss(coef))
    frozen = fused_loss_from_hidden(hidden.detach(), weight, tokens, nonlinear_loss(coef))
    assert not out.loss.requires_grad and not frozen.loss.requires_grad
    torch.testing.assert_close(out.loss, frozen.loss, rtol=0, atol=0)


def test_no_tokens_give_zero_loss_and_gradients():
    w = torch.randn(9, 4, requires_grad=True)
    out = fused_loss_from_hidden(torch.randn(0, 4), w, torch.zeros(0, dtype=torch.long), lambda lp, ent, rows: lp.sum())
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.log_probs.shape == (0,)
    assert w.grad is None or (w.grad == 0).all()


def test_second_backward_is_refused():
    hidden, weight, tokens, coef = make_problem(12, 4, 9, torch.float32)
    w = weight.clone().requires_grad_()
    loss = fused_loss_from_hidden(hidden, w, tokens, nonlinear_loss(coef)).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def packed_batch(num_tokens, seed=1):
    """Four samples packed in [T]: sample ids, a loss mask with prompt tokens, advantages, old/ref/rollout."""
    gen = torch.Generator().manual_seed(seed)
    sample_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 9, 3, num_tokens - 17]))
    loss_mask = (torch.rand(num_tokens, generator=gen) > 0.25).float()
    advantages = torch.randn(4, generator=gen)[sample_ids]
    noise = [0.3 * torch.randn(num_tokens, generator=gen) for _ in range(3)]
    return sample_ids, loss_mask, advantages, noise


@pytest.mark.parametrize("aggregation", ["token_mean", "sample_mean", "seq_mean_token_sum_norm"])
def test_equals_rl_loss_on_the_per_token_outputs(aggregation):
    num_tokens, temperature = 31, 0.9
    hidden, weight, tokens, _ = make_problem(num_tokens, 16, 97, torch.float32)
    sample_ids, loss_mask, advantages, (d_old, d_ref, d_roll) = packed_batch(num_tokens)
    with torch.no_grad():
        lp0, _ = logprobs_and_entropy_from_hidden(hidden, weight, tokens, temperature=temperature)
    old, ref, rollout = lp0 + d_old, lp0 + d_ref, lp0 + d_roll
    counts = torch.zeros(4).index_add_(0, sample_ids, loss_mask)
    normalizer = global_normalizer(counts.long(), mode=aggregation, max_response_len=16)
    config = PolicyLossConfig(
        eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=3.0, use_kl_loss=True, kl_loss_coef=0.05,
        kl_loss_type="low_var_kl", entropy_coef=0.01, use_tis=True, aggregation=aggregation,
    )  # fmt: skip
    common = dict(config=config, normalizer=normalizer, ref_log_probs=ref, rollout_log_probs=rollout,
                  sample_ids=sample_ids, metrics_normalizer=float(loss_mask.sum()))  # fmt: skip

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_fn = rl_loss_fn(old, advantages, loss_mask, **common)
    out = fused_loss_from_hidden(h, w, tokens, loss_fn, temperature=temperature, chunk_size=6)
    gh, gw = torch.autograd.grad(out.loss, (h, w))

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = logprobs_and_entropy_from_hidden(h2, w2, tokens, temperature=temperature)
    ref_loss, ref_metrics = rl_loss(lp, old, advantages, loss_mask, entropy=ent, **common)
    ref_gh, ref_gw = torch.autograd.grad(ref_loss, (h2, w2))

    # Same float32 row math, summed in a different order (per chunk): float32 round-off only.
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert rel_err(gh, ref_gh) < 1e-5 and rel_err(gw, ref_gw) < 1e-5
    assert set(out.metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_rl_loss_fn_refuses_gspo_and_bad_inputs():
    config = PolicyLossConfig(aggregation="sample_mean")
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="GSPO.*not a sum of per-token terms"):
        rl_loss_fn(x, x, x, config=config, normalizer=1.0, policy_loss="gspo")
    with pytest.raises(ValueError, match="needs sample_ids"):
        rl_loss_fn(x, x, x, config=config, normalizer=1.0)
    with pytest.raises(ValueError, match="flatten"):
        rl_loss_fn(x, x, x.view(2, 2), config=config, normalizer=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(temperature=0.0), "temperature"),
        (dict(loss_fn=lambda lp, ent, rows: lp), "0-dim tensor"),
        (dict(tokens=torch.tensor([0, 1, 99])), r"token ids must lie in \[0, 9\)"),
        (dict(weight=torch.randn(9, 5)), "same H"),
    ],
)
def test_bad_input_names_the_cause(kwargs, match):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(9, 4), tokens=torch.tensor([0, 1, 2]),
                loss_fn=lambda lp, ent, rows: lp.sum())  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_loss_from_hidden(args.pop("hidden"), args.pop("weight"), args.pop("tokens"), args.pop("loss_fn"), **args)
