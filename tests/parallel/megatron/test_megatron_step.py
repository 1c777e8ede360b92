"""One GRPO step on the megatron backend: THD packed == padded == HF transformers, and == a float64 formula."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")

from rlkit.algos.losses import PolicyLossConfig  # noqa: E402
from rlkit.ckpt.convert import megatron_to_hf  # noqa: E402
from rlkit.models.tiny import build_tiny_qwen3  # noqa: E402
from rlkit.parallel.megatron.forward import hf_forward, megatron_forward  # noqa: E402
from rlkit.parallel.megatron.model import build_gpt_model  # noqa: E402
from rlkit.parallel.megatron.step import RLBatch, train_step  # noqa: E402
from rlkit.parallel.packing import DataPacker  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world")

LENGTHS = [9, 17, 5, 23, 12, 30, 3]
RESPONSES = [4, 10, 2, 15, 6, 20, 1]
VOCAB = 128


def _batch(seed: int = 0, *, masked: bool = False) -> RLBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]
    # GRPO: one advantage per sample, broadcast over its response tokens.
    adv = [torch.full((r,), float(torch.randn(1, generator=g))) for r in RESPONSES]
    # Old log-probs near the current ones' scale (-log 128 ~ -4.85) so some ratios clip at eps 0.2.
    old = [-4.85 + 0.5 * torch.randn(r, generator=g) for r in RESPONSES]
    masks = [(torch.rand(r, generator=g) > 0.3).float() for r in RESPONSES] if masked else None
    return RLBatch(tokens=tokens, response_lengths=RESPONSES, advantages=adv, old_log_probs=old, loss_masks=masks)


def _float64_grpo_loss(hf_model, batch: RLBatch, eps: float, mode: str) -> float:
    """PPO-clip loss written out per sample in float64 from HF's logits (Schulman et al. 2017, eq. 7).

    pg_t = max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)), r_t = exp(logp_t - old_t);
    sample_mean: (1/N) sum_i (1/n_i) sum_t m_t pg_t;  token_mean: sum_i sum_t m_t pg_t / sum_i n_i.
    """
    per_sample, total_tokens = [], 0.0
    with torch.no_grad():
        for i, tokens in enumerate(batch.tokens):
            r = batch.response_lengths[i]
            logits = hf_model(input_ids=tokens[None]).logits[0].double()
            # Response token j sits at position L - r + j and is predicted by position L - r + j - 1.
            pred = torch.log_softmax(logits[len(tokens) - r - 1 : len(tokens) - 1], dim=-1)
            logp = pred.gather(1, tokens[len(tokens) - r :, None])[:, 0]
            ratio = torch.exp(logp - batch.old_log_probs[i].double())
            adv = batch.advantages[i].double()
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
            mask = torch.ones(r, dtype=torch.float64) if batch.loss_masks is None else batch.loss_masks[i].double()
            per_sample.append((float((pg * mask).sum()), float(mask.sum())))
            total_tokens += float(mask.sum())
    if mode == "sample_mean":
        return sum(s / max(n, 1.0) for s, n in per_sample) / len(per_sample)
    return sum(s for s, _ in per_sample) / total_tokens


def _megatron_grads_as_hf(model, hf_config) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return megatron_to_hf({(0, 0, 0): grads}, hf_config.to_dict())


@pytest.mark.parametrize(("mode", "masked"), [("sample_mean", False), ("token_mean", True)])
def test_thd_padded_and_hf_give_the_same_loss_and_gradients(mode, masked):
    hf = build_tiny_qwen3(seed=11).train()
    batch = _batch(masked=masked)
    config = PolicyLossConfig(aggregation=mode)
    # 40-token budget: the 7 samples (99 tokens) go into 3+ micro-batches, so the global normalizer matters.
    packer = DataPacker(max_tokens_per_gpu=40)
    kwargs = dict(packer=packer, loss_config=config, vocab_size=VOCAB, max_grad_norm=None)

    results, grads = {}, {}
    for layout in ("thd", "bshd"):
        model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
        results[layout] = train_step(model, None, batch, forward=megatron_forward(model), layout=layout, **kwargs)
        grads[layout] = _megatron_grads_as_hf(model, hf.config)
    reference = copy.deepcopy(hf)
    results["hf"] = train_step(reference, None, batch, forward=hf_forward(reference), layout="bshd", **kwargs)
    grads["hf"] = {name: p.grad for name, p in reference.named_parameters()}

    expected = _float64_grpo_loss(hf, batch, eps=0.2, mode=mode)
    assert results["thd"].num_micro_batches >= 3
    assert results["thd"].num_tokens == sum(LENGTHS) < results["bshd"].num_tokens
    assert 0.0 < results["hf"].metrics["pg_clipfrac"] < 1.0  # the clip is exercised, not bypassed
    for name, result in results.items():
        # fp32 forward/backward vs a float64 formula: relative error ~1e-6 on an O(0.1) loss.
        assert result.loss == pytest.approx(expected, rel=1e-5, abs=1e-7), name
        assert result.grad_norm == pytest.approx(results["hf"].grad_norm, rel=1e-5), name
    for layout in ("thd", "bshd"):
        assert grads[layout].keys() == grads["hf"].keys() - {"lm_head.weight"}  # tied head: one tensor
        for key, grad in grads[layout].items():
            scale = float(grads["hf"][key].abs().max())
            torch.testing.assert_close(grad, grads["hf"][key], rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=key)


@pytest.mark.parametrize("budget", [23, 64, 1000])
def test_micro_batch_split_does_not_change_the_step(budget):
    """SGD step with clipping: new weights (mapped to HF names) equal HF's after the same step."""
    hf = build_tiny_qwen3(seed=2).train()
    batch = _batch(seed=4)
    config = PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.28)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    reference = copy.deepcopy(hf)
    kwargs = dict(loss_config=config, vocab_size=VOCAB, max_grad_norm=0.05)
    lr = 0.5
    got = train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        batch,
        packer=DataPacker(max_tokens_per_gpu=budget),
        forward=megatron_forward(model),
        **kwargs,
    )
    want = train_step(
        reference,
        torch.optim.SGD(reference.parameters(), lr=lr),
        batch,
        packer=DataPacker(max_tokens_per_gpu=1000),
        forward=hf_forward(reference),
        layout="bshd",
        **kwargs,
    )
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    assert got.grad_norm > 0.05  # clipping was active, so the clip path is part of the comparison
    stepped = megatron_to_hf({(0, 0, 0): dict(model.state_dict())}, hf.config.to_dict())
    moved = 0.0
    for name, value in stepped.items():
        if name.endswith("_extra_state"):
            continue
        want_param = reference.state_dict()[name]
        moved = max(moved, float((want_param - hf.state_dict()[name]).abs().max()))
        torch.testing.assert_close(value, want_param, rtol=1e-5, atol=1e-6, msg=name)
    assert moved > 1e-3  # the step changed the weights visibly


def test_bad_inputs_are_named():
    hf = build_tiny_qwen3(seed=0)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    batch = _batch()
    with pytest.raises(ValueError, match="advantages has 1 entries for 7 samples"):
        RLBatch(tokens=batch.tokens, response_lengths=RESPONSES, advantages=batch.advantages[:1], old_log_probs=[])
    with pytest.raises(ValueError, match="dp_size=2"):
        train_step(
            model, None, batch, packer=DataPacker(dp_size=2, max_tokens_per_gpu=64),
            loss_config=PolicyLossConfig(), forward=megatron_forward(model), vocab_size=VOCAB,
        )  # fmt: skip


def test_megatron_schedule_matches_plain_loop():
    """megatron-core's forward_backward_no_pipelining (CPU via rlkit's gloo patches, or CUDA) == the plain loop."""
    hf = build_tiny_qwen3(seed=7)
    batch = _batch(seed=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for schedule in (False, True):
        model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), device=device)
        out[schedule] = train_step(
            model, None, batch, packer=DataPacker(max_tokens_per_gpu=40), loss_config=PolicyLossConfig(),
            forward=megatron_forward(model), vocab_size=VOCAB, use_megatron_schedule=schedule,
        )  # fmt: skip
    assert out[True].num_micro_batches >= 3
    assert out[True].loss == pytest.approx(out[False].loss, rel=1e-5)
    assert out[True].grad_norm == pytest.approx(out[False].grad_norm, rel=1e-4)


def test_qwen3_moe_step_matches_hf_gradients():
    """Routed experts: loss, grad norm and every gradient (router included) equal HF's on the same step."""
    from rlkit.ckpt.experts import split_fused_experts
    from rlkit.models.tiny import build_tiny_qwen3_moe

    hf = build_tiny_qwen3_moe(seed=3, vocab_size=VOCAB).train()
    batch = _batch(seed=5)
    kwargs = dict(packer=DataPacker(max_tokens_per_gpu=48), loss_config=PolicyLossConfig(), vocab_size=VOCAB)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    got = train_step(model, None, batch, forward=megatron_forward(model), max_grad_norm=None, **kwargs)
    reference = copy.deepcopy(hf)
    want = train_step(
        reference, None, batch, forward=hf_forward(reference), layout="bshd", max_grad_norm=None, **kwargs
    )
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    grads = _megatron_grads_as_hf(model, hf.config)
    hf_grads = split_fused_experts({name: p.grad for name, p in reference.named_parameters() if p.grad is not None})
    # Experts no token routed to have no gradient on either side (megatron: None, HF: zeros in a fused tensor).
    for key, want_grad in hf_grads.items():
        got_grad = grads.get(key, torch.zeros_like(want_grad))
        scale = float(want_grad.abs().max())
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=key)


@pytest.mark.parametrize("layout", ["thd", "bshd"])
def test_no_grad_log_prob_pass_matches_float64_hf(layout):
    """Old-policy / reference pass: per-response-token log-probs == float64 log_softmax of HF's logits."""
    from rlkit.parallel.megatron.step import compute_log_probs

    hf = build_tiny_qwen3(seed=9).eval()
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict()).eval()
    batch = _batch(seed=2)
    got = compute_log_probs(
        megatron_forward(model), batch.tokens, RESPONSES, packer=DataPacker(max_tokens_per_gpu=30),
        vocab_size=VOCAB, layout=layout,
    )  # fmt: skip
    assert [g.shape[0] for g in got] == RESPONSES
    with torch.no_grad():
        for tokens, r, values in zip(batch.tokens, RESPONSES, got, strict=True):
            logits = hf(input_ids=tokens[None]).logits[0].double()
            expected = torch.log_softmax(logits[-r - 1 : -1], dim=-1).gather(1, tokens[-r:, None])[:, 0]
            torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-5)


def test_distributed_optimizer_is_refused_on_cpu_with_the_reason():
    from rlkit.parallel.megatron.distributed import build_distributed_optimizer, is_megatron_optimizer

    hf = build_tiny_qwen3(seed=0)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    assert not is_megatron_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on CUDA"):
            build_distributed_optimizer(model, lr=1e-5)


@pytest.mark.gpu
def test_distributed_optimizer_step_equals_plain_adamw_on_gpu():
    """megatron DDP + DistributedOptimizer == the plain loop + torch AdamW, fp32: loss, grad norm, new weights."""
    from rlkit.parallel.megatron.distributed import build_distributed_optimizer

    hf = build_tiny_qwen3(seed=7)
    batch = _batch(seed=1)
    kwargs = dict(
        packer=DataPacker(max_tokens_per_gpu=40), loss_config=PolicyLossConfig(), vocab_size=VOCAB, max_grad_norm=None
    )
    plain = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), device="cuda")
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.0)
    want = train_step(plain, adamw, batch, forward=megatron_forward(plain), **kwargs)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), device="cuda")
    ddp, optimizer = build_distributed_optimizer(model, lr=1e-3, clip_grad=None)
    got = train_step(ddp, optimizer, batch, forward=megatron_forward(ddp), **kwargs)
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
    initial = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), device="cuda")
    for (name, new), (_, reference), (_, start) in zip(
        model.named_parameters(), plain.named_parameters(), initial.named_parameters(), strict=True
    ):
        torch.testing.assert_close(new, reference, rtol=1e-5, atol=1e-6, msg=name)
        # AdamW's first update is lr * g / (|g| + eps): every weight with a gradient moved by ~1e-3.
        assert float((reference - start).abs().max()) > 5e-4, name


def test_optimizer_cpu_offload_is_refused_with_the_reason():
    from rlkit.parallel.megatron.distributed import build_distributed_optimizer

    hf = build_tiny_qwen3(seed=0)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    with pytest.raises(ValueError, match="HybridDeviceOptimizer did not reproduce"):
        build_distributed_optimizer(model, lr=1e-5, optimizer_cpu_offload=True)
