"""Loss terms against float64 references written from the papers (objective form, scalar math), with autograd."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algos.aggregation import aggregate, global_normalizer
from rlkit.algos.losses import (
    KL_TYPES,
    PolicyLossConfig,
    entropy_loss,
    gspo_policy_loss,
    kl_estimator,
    mtp_loss,
    ppo_policy_loss,
    rl_loss,
    sequence_log_ratio,
    sft_loss,
    tis_weights,
)

F64 = torch.float64


def _ppo_reference(lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, eps_lo, eps_hi, c) -> torch.Tensor:
    """The PPO *objective* as in the papers (maximised), negated at the end: a different form from the code."""
    ratio = torch.exp(lp - old)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * adv
    objective = torch.min(surr1, surr2)
    if c is not None:
        # dual clip (Ye et al. 2020): for A < 0 the objective is bounded below by c * A
        objective = torch.where(adv < 0, torch.max(objective, c * adv), objective)
    return -objective


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    eps=st.sampled_from([0.1, 0.2]),
    eps_high=st.sampled_from([None, 0.28, 0.5]),
    c=st.sampled_from([None, 1.5, 3.0]),
    spread=st.sampled_from([0.05, 0.5, 3.0]),
)
def test_ppo_loss_and_gradient_match_reference(seed, eps, eps_high, c, spread):
    gen = torch.Generator().manual_seed(seed)
    n = 64
    old = -torch.rand(n, generator=gen, dtype=F64) * 4
    lp = (old + spread * torch.randn(n, generator=gen, dtype=F64)).requires_grad_(True)
    adv = torch.randn(n, generator=gen, dtype=F64)
    loss, metrics = ppo_policy_loss(lp, old, adv, eps_clip=eps, eps_clip_high=eps_high, eps_clip_c=c)
    (grad,) = torch.autograd.grad(loss.sum(), lp)

    lp_ref = lp.detach().clone().requires_grad_(True)
    hi = eps if eps_high is None else eps_high
    ref = _ppo_reference(lp_ref, old, adv, eps, hi, c)
    (grad_ref,) = torch.autograd.grad(ref.sum(), lp_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)

    # clip fraction: tokens where the clipped ratio changes the objective
    r = torch.exp(lp.detach() - old)
    clipped = ((adv > 0) & (r > 1 + hi)) | ((adv < 0) & (r < 1 - eps))
    assert torch.equal(metrics["clipfrac"].bool(), clipped)
    torch.testing.assert_close(metrics["ppo_kl"], old - lp.detach())
    assert not any(m.requires_grad for m in metrics.values())


def test_ppo_hand_worked_clip_higher_and_dual_clip():
    # ratio = e^{ln 1.5} = 1.5, A = +1, eps = 0.2, eps_high = 0.28: clip at 1.28 -> loss -1.28
    # ratio = 0.5, A = +1: unclipped below 1 - eps is kept (min picks 0.5) -> loss -0.5
    # ratio = 0.5, A = -1: clipped at 0.8 -> objective min(-0.5, -0.8) = -0.8 -> loss 0.8
    # ratio = 5, A = -1, c = 3: PPO loss 5, dual clip bounds it to c * |A| = 3
    lp = torch.log(torch.tensor([1.5, 0.5, 0.5, 5.0], dtype=F64))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)
    loss, m = ppo_policy_loss(lp, torch.zeros(4, dtype=F64), adv, eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([-1.28, -0.5, 0.8, 3.0], dtype=F64))
    assert m["clipfrac"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert m["dual_clipfrac"].tolist() == [0.0, 0.0, 0.0, 1.0]
    # clip-higher moves only the upper bound: ratio 0.75 with A = -1 is clipped at 0.8 even with eps_high 0.28
    loss, _ = ppo_policy_loss(torch.log(torch.tensor([0.75])), torch.zeros(1), torch.tensor([-1.0]), eps_clip_high=0.28)
    assert loss.item() == pytest.approx(0.8)


def test_ppo_extreme_log_ratios_stay_finite():
    old = torch.tensor([0.0, 0.0, -1e4, -80.0, 0.0, 0.0], dtype=torch.float32)
    lp = torch.tensor([-1e4, 1e4, 0.0, 0.0, 80.0, -80.0], dtype=torch.float32, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, -2.0, -2.0])
    for c in (None, 3.0):
        loss, metrics = ppo_policy_loss(lp, old, adv, eps_clip_c=c)
        (g,) = torch.autograd.grad(loss.sum(), lp)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())
    # without dual clip, A < 0 and a ratio past e^20 is capped at e^20 (documented clamp)
    loss, _ = ppo_policy_loss(lp, old, adv)
    assert loss[1].item() == pytest.approx(math.exp(20), rel=1e-6)


def test_ppo_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"eps_clip_c=1.0 must be > 1"):
        ppo_policy_loss(x, x, x, eps_clip_c=1.0)
    with pytest.raises(ValueError, match=r"eps_clip_c=0.5 must be > 1"):
        ppo_policy_loss(x, x, x, eps_clip_c=0.5)
    with pytest.raises(ValueError, match=r"advantages shape \(4,\) must equal log_probs shape \(3,\)"):
        ppo_policy_loss(x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="eps_clip=-0.1"):
        ppo_policy_loss(x, x, x, eps_clip=-0.1)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------
def _kl_reference(x: float, kind: str) -> float:
    """Schulman's estimators with x = log p - log p_ref; low_var_kl with slime's output clamp."""
    if kind == "k1":
        return x
    if kind == "k2":
        return x * x / 2
    k3 = math.exp(-x) - 1 + x
    return min(max(k3, -10.0), 10.0) if kind == "low_var_kl" else k3


@pytest.mark.parametrize("kind", KL_TYPES)
def test_kl_estimators_values_and_gradients(kind):
    gen = torch.Generator().manual_seed(7)
    ref = -torch.rand(200, generator=gen, dtype=F64) * 5
    x_true = torch.randn(200, generator=gen, dtype=F64) * 4  # up to |x| ~ 15, inside the ±20 guard
    lp = (ref + x_true).requires_grad_(True)
    got = kl_estimator(lp, ref, kind=kind)
    expected = torch.tensor([_kl_reference(float(x), kind) for x in lp.detach() - ref], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(got.sum(), lp)
    # d/dx: k1 -> 1; k2 -> x; k3 -> 1 - e^{-x}; low_var_kl -> same, 0 where the output is clamped
    x = lp.detach() - ref
    d = {"k1": torch.ones_like(x), "k2": x, "k3": 1 - torch.exp(-x)}
    d["low_var_kl"] = torch.where((expected.abs() < 10), 1 - torch.exp(-x), torch.zeros_like(x))
    torch.testing.assert_close(g, d[kind], rtol=1e-10, atol=1e-10)
    if kind in ("k2", "k3", "low_var_kl"):
        assert (got >= 0).all()


def test_low_var_kl_clamps_documented():
    # x = log p - log p_ref.  x = -5: k3 = e^5 - 1 - 5 = 142.41 -> low_var_kl clamps to 10.
    # x = 30: the log-ratio guard evaluates e^{-20} - 1 + 20 = 19.000000002 (exact k3 would be 29) and
    # low_var_kl clamps that to 10. x = -1000 in float32: finite (exact k3 overflows).
    lp = torch.tensor([-5.0, 30.0, -1000.0, 1000.0], requires_grad=True)
    ref = torch.zeros(4)
    low = kl_estimator(lp, ref, kind="low_var_kl")
    assert low.tolist() == [10.0, 10.0, 10.0, 10.0]
    (g,) = torch.autograd.grad(low.sum(), lp)
    assert g.tolist() == [0.0, 0.0, 0.0, 0.0]
    k3 = kl_estimator(lp.detach(), ref, kind="k3")
    assert torch.isfinite(k3).all()
    assert k3[0].item() == pytest.approx(math.exp(5) - 6, rel=1e-6)
    assert k3[1].item() == pytest.approx(math.exp(-20) + 19, rel=1e-6)
    with pytest.raises(
        ValueError, match=r"kind='kl' is not a KL estimator; use one of \['k1', 'k2', 'k3', 'low_var_kl'\]"
    ):
        kl_estimator(lp, ref, kind="kl")


def test_entropy_and_tis():
    h = torch.tensor([0.5, 2.0], dtype=F64)
    torch.testing.assert_close(entropy_loss(h, entropy_coef=0.01), torch.tensor([-0.005, -0.02], dtype=F64))
    # ratios e^{-2}, e^{0}, e^{3}, e^{100} with caps [0.5, 2]: 0.5 (clipped up), 1, 2, 2
    train = torch.tensor([-2.0, 0.0, 3.0, 100.0], dtype=F64, requires_grad=True)
    w, m = tis_weights(train, torch.zeros(4, dtype=F64), tis_clip=2.0, tis_clip_low=0.5)
    expected = [min(max(math.exp(min(v, 20.0)), 0.5), 2.0) for v in (-2.0, 0.0, 3.0, 100.0)]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64))
    assert not w.requires_grad
    assert m["tis_clipfrac"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert torch.isfinite(m["tis"]).all()
    with pytest.raises(ValueError, match="tis_clip_low"):
        tis_weights(train, train, tis_clip=1.0, tis_clip_low=2.0)


# ---------------------------------------------------------------------------------------------
# GSPO
# ---------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gspo_sample_mean_matches_paper_objective(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lengths = [rng.randint(1, 6) for _ in range(rng.randint(1, 5))]
    old = [-torch.rand(n, generator=gen, dtype=F64) for n in lengths]
    lps = [
        (o + 0.001 * torch.randn(n, generator=gen, dtype=F64)).requires_grad_(True)
        for o, n in zip(old, lengths, strict=True)
    ]
    masks = [(torch.rand(n, generator=gen) < 0.8).to(F64) for n in lengths]
    advs = [float(torch.randn(1, generator=gen)) for _ in lengths]
    eps_lo, eps_hi = 3e-4, 4e-4

    # Reference (Zheng et al. 2025, eq. 5-7): J = (1/G) sum_i min(s_i A_i, clip(s_i) A_i),
    # s_i = exp(mean over y_i of the log-ratio); fully masked samples contribute 0.
    ref_leaves = [lp.detach().clone().requires_grad_(True) for lp in lps]
    objective = 0.0
    for lp, o, m, a in zip(ref_leaves, old, masks, advs, strict=True):
        if m.sum() == 0:
            continue
        s = torch.exp(((lp - o) * m).sum() / m.sum())
        objective = objective + torch.min(s * a, torch.clamp(s, 1 - eps_lo, 1 + eps_hi) * a)
    ref_loss = -objective / len(lengths)

    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    mask = torch.cat(masks)
    adv_tok = torch.cat([torch.full((n,), a, dtype=F64) for n, a in zip(lengths, advs, strict=True)])
    per_tok, _ = gspo_policy_loss(torch.cat(lps), torch.cat(old), adv_tok, mask, sample_ids=ids)
    norm = global_normalizer([int(m.sum()) for m in masks], mode="sample_mean")
    loss = aggregate(per_tok, mask, mode="sample_mean", normalizer=norm, sample_ids=ids)
    torch.testing.assert_close(loss, torch.as_tensor(ref_loss, dtype=F64), rtol=1e-12, atol=1e-12)
    if isinstance(ref_loss, torch.Tensor):
        grads = torch.autograd.grad(loss, lps)
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg if rg is not None else torch.zeros_like(g), rtol=1e-10, atol=1e-12)


def test_sequence_log_ratio_padded_equals_packed():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], dtype=F64)
    old = torch.zeros_like(lp)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # sample 0: (-1 - 2) / 2 = -1.5; sample 1: -0.5
    padded = sequence_log_ratio(lp, old, mask)
    torch.testing.assert_close(padded, torch.tensor([[-1.5] * 3, [-0.5] * 3], dtype=F64))
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    packed = sequence_log_ratio(lp.reshape(-1), old.reshape(-1), mask.reshape(-1), sample_ids=ids)
    torch.testing.assert_close(packed, padded.reshape(-1))


# ---------------------------------------------------------------------------------------------
# SFT and MTP cross-entropy
# ---------------------------------------------------------------------------------------------
def _ce_reference(logits_row: list[float], label: int) -> float:
    mx = max(logits_row)
    return mx + math.log(math.fsum(math.exp(v - mx) for v in logits_row)) - logits_row[label]


def test_sft_loss_matches_logsumexp_reference():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=gen, dtype=torch.float32) * 5
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    got = sft_loss(logits, labels)
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    expected = [[_ce_reference(logits[b, t].double().tolist(), int(labels[b, t])) for t in range(5)] for b in range(2)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=F64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        sft_loss(logits, labels[:, :4])


def test_mtp_loss_matches_reference_with_packed_boundaries():
    gen = torch.Generator().manual_seed(5)
    t, v, depth = 9, 7, 2
    logits = [torch.randn(t, v, generator=gen, dtype=F64) for _ in range(depth)]
    labels = torch.randint(0, v, (t,), generator=gen)
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=F64)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    scale = 0.2
    got = mtp_loss(logits, labels, mask, mtp_loss_scaling_factor=scale, sample_ids=ids)
    expected = torch.zeros(t, dtype=F64)
    for k in range(1, depth + 1):
        for pos in range(t):
            target = pos + k  # head k at position t predicts the main label k steps later
            if target < t and ids[target] == ids[pos] and mask[target] == 1:
                expected[pos] += _ce_reference(logits[k - 1][pos].tolist(), int(labels[target]))
    expected *= scale / depth
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # e.g. position 3 (last of sample 0) predicts nothing: its targets would cross into sample 1
    assert got[3].item() == 0.0
    with pytest.raises(ValueError, match="mtp_logits is empty"):
        mtp_loss([], labels, mask)


# ---------------------------------------------------------------------------------------------
# rl_loss: the assembled step
# ---------------------------------------------------------------------------------------------
def test_rl_loss_matches_composed_reference_and_metrics():
    gen = torch.Generator().manual_seed(11)
    b, t = 4, 6
    old = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    lp = (old + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)).requires_grad_(True)
    ref_lp = old + 0.2 * torch.randn(b, t, generator=gen, dtype=F64)
    roll = old + 0.1 * torch.randn(b, t, generator=gen, dtype=F64)
    ent = torch.rand(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, 1, generator=gen, dtype=F64).expand(b, t)
    mask = (torch.rand(b, t, generator=gen) < 0.7).to(F64)
    mask[0] = 0  # a fully masked sample
    cfg = PolicyLossConfig(
        eps_clip=0.2,
        eps_clip_high=0.28,
        eps_clip_c=3.0,
        use_kl_loss=True,
        kl_loss_coef=0.01,
        kl_loss_type="low_var_kl",
        entropy_coef=0.001,
        use_tis=True,
        tis_clip=1.5,
        aggregation="sample_mean",
    )
    norm = global_normalizer(mask.sum(1).long(), mode="sample_mean")
    loss, metrics = rl_loss(
        lp, old, adv, mask, config=cfg, normalizer=norm, ref_log_probs=ref_lp, entropy=ent, rollout_log_probs=roll
    )
    # Reference: per sample token means, averaged over the 4 samples, each term from its formula.
    lp_r = lp.detach().clone().requires_grad_(True)
    w = torch.clamp(torch.exp(old - roll), 0, 1.5)
    pg = _ppo_reference(lp_r, old, adv, 0.2, 0.28, 3.0) * w
    x = lp_r - ref_lp
    kl = torch.clamp(torch.exp(-x) - 1 + x, -10, 10)
    per_tok = pg + 0.01 * kl - 0.001 * ent
    ref = sum((per_tok[i] * mask[i]).sum() / mask[i].sum() for i in range(1, b)) / b
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(ref, lp_r)[0], rtol=1e-12, atol=0)
    assert set(metrics) == {
        "loss",
        "pg_loss",
        "pg_clipfrac",
        "pg_dual_clipfrac",
        "ppo_kl",
        "kl_loss",
        "entropy",
        "tis",
        "tis_clipfrac",
        "tis_abs",
    }
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    kl_ref = sum((kl[i] * mask[i]).sum() / mask[i].sum() for i in range(1, b)) / b
    torch.testing.assert_close(metrics["kl_loss"], kl_ref.detach(), rtol=1e-12, atol=0)


def test_rl_loss_micro_batches_sum_to_whole_token_mean():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(10, generator=gen, dtype=F64)
    lp = old + 0.1 * torch.randn(10, generator=gen, dtype=F64)
    adv = torch.randn(10, generator=gen, dtype=F64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=F64)
    cfg = PolicyLossConfig(aggregation="token_mean")
    norm = global_normalizer([8], mode="token_mean")
    whole, wm = rl_loss(lp, old, adv, mask, config=cfg, normalizer=norm)
    parts = [rl_loss(lp[s], old[s], adv[s], mask[s], config=cfg, normalizer=norm) for s in (slice(0, 3), slice(3, 10))]
    torch.testing.assert_close(sum(p[0] for p in parts), whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(sum(p[1]["pg_clipfrac"] for p in parts), wm["pg_clipfrac"], rtol=1e-13, atol=1e-15)


def test_seq_mean_token_sum_norm_metrics_are_token_means_over_micro_batches():
    """Dr.GRPO's loss weights sum to tokens / (N L), not one: its metrics are global token means instead."""
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(12, generator=gen, dtype=F64)
    lp = old + 0.3 * torch.randn(12, generator=gen, dtype=F64)
    adv = torch.randn(12, generator=gen, dtype=F64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=F64)  # 9 loss tokens in 3 samples of 4
    cfg = PolicyLossConfig(aggregation="seq_mean_token_sum_norm", use_tis=True, tis_clip=2.0)
    norm = global_normalizer([3, 3, 3], mode="seq_mean_token_sum_norm", max_response_len=10)  # N L = 30
    common = dict(config=cfg, normalizer=norm, metrics_normalizer=9.0)
    parts = [
        rl_loss(lp[s], old[s], adv[s], mask[s], rollout_log_probs=old[s], **common) for s in (slice(0, 5), slice(5, 12))
    ]
    metrics = {name: sum(p[1][name] for p in parts) for name in parts[0][1]}
    # The behaviour policy is the rollout policy: every TIS weight is 1, so their mean is 1 (not 9 / 30).
    torch.testing.assert_close(metrics["tis"], torch.tensor(1.0, dtype=F64), rtol=1e-13, atol=0)
    ratio = torch.exp(lp - old)
    clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))  # where the clip bites: token mean
    torch.testing.assert_close(metrics["pg_clipfrac"], (clipped * mask).sum() / 9, rtol=1e-13, atol=1e-15)
    assert 0 < float(metrics["pg_clipfrac"]) < 1
    # The loss keeps the constant normalizer: sum(pg * mask) / (N L).
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    torch.testing.assert_close(sum(p[0] for p in parts), (pg * mask).sum() / 30, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="needs metrics_normalizer"):
        rl_loss(lp, old, adv, mask, config=cfg, normalizer=norm, rollout_log_probs=old)


def test_config_and_rl_loss_errors():
    with pytest.raises(ValueError, match=r"eps_clip_c=1.0 must be > 1"):
        PolicyLossConfig(eps_clip_c=1.0)
    with pytest.raises(ValueError, match=r"kl_loss_type='kl'.*\['k1', 'k2', 'k3', 'low_var_kl'\]"):
        PolicyLossConfig(kl_loss_type="kl")
    with pytest.raises(ValueError, match=r"aggregation='mean'.*token_mean"):
        PolicyLossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="tis_clip_low"):
        PolicyLossConfig(tis_clip=1.0, tis_clip_low=1.5)
    with pytest.raises(TypeError):
        PolicyLossConfig(0.2)  # keyword-only
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="ref_log_probs"):
        rl_loss(x, x, x, torch.ones(4), config=PolicyLossConfig(use_kl_loss=True), normalizer=1.0)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        rl_loss(x, x, x, torch.ones(4), config=PolicyLossConfig(use_tis=True), normalizer=1.0)
    with pytest.raises(ValueError, match="entropy"):
        rl_loss(x, x, x, torch.ones(4), config=PolicyLossConfig(entropy_coef=0.1), normalizer=1.0)
    with pytest.raises(ValueError, match="loss_mask shape"):
        rl_loss(x, x, x, torch.ones(5), config=PolicyLossConfig(), normalizer=1.0)


def test_docs_example_runs():
    # docs/algos.md's ten-line training step must keep working as the API evolves.
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "algos.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/algos.md", "exec"), scope)
    for mb in scope["mbs"]:
        assert mb["log_probs"].grad is not None and torch.isfinite(mb["log_probs"].grad).all()
    assert set(scope["metrics"]) >= {"loss", "pg_loss", "kl_loss", "tis"}


finite_logp = st.floats(-1e4, 0.0, allow_nan=False, width=32)


@settings(max_examples=100, deadline=None)
@given(
    lp=st.lists(finite_logp, min_size=1, max_size=16),
    data=st.data(),
    kind=st.sampled_from(KL_TYPES),
    c=st.sampled_from([None, 3.0]),
)
def test_no_inf_or_nan_for_any_log_probs_in_float32(lp, data, kind, c):
    n = len(lp)
    other = torch.tensor(data.draw(st.lists(finite_logp, min_size=n, max_size=n)), dtype=torch.float32)
    adv = torch.tensor(data.draw(st.lists(st.floats(-10, 10, width=32), min_size=n, max_size=n)))
    x = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    loss, metrics = ppo_policy_loss(x, other, adv, eps_clip_c=c)
    kl = kl_estimator(x, other, kind=kind)
    w, tis_m = tis_weights(other, x.detach())
    (g,) = torch.autograd.grad((loss + kl).sum(), x)
    for t in (loss, kl, g, w, *metrics.values(), *tis_m.values()):
        assert torch.isfinite(t).all()
