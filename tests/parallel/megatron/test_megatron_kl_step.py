"""The megatron train step with the KL-to-reference loss, TIS and ``seq_mean_token_sum_norm`` == one whole-batch loss.

Reference (written differently from ``train_step``): HF transformers' unsharded model takes the whole batch as one
padded forward, the response log-probs are gathered from ``torch.log_softmax`` by hand, and
:func:`rlkit.algos.losses.rl_loss` runs once on all the response tokens with the global normalizer of
:func:`rlkit.algos.aggregation.global_normalizer`: no packing, no micro-batches, no ranks. The megatron step runs
THD micro-batches of a 40-token budget (>= 3 per step) on one process, and under 2 gloo ranks (DP2, CP2, PP2, TP2),
where the reference and rollout log-probs are packed, CP-sharded and split like the old log-probs. float32 on CPU:
the same math summed in another order, relative differences ~1e-6 (bound 1e-5 on loss and grad norm).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")


from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.algos.aggregation import global_normalizer  # noqa: E402
from rlkit.algos.losses import PolicyLossConfig, rl_loss  # noqa: E402
from rlkit.ckpt.convert import Layout, megatron_to_hf  # noqa: E402
from rlkit.models.tiny import build_tiny_qwen3  # noqa: E402
from rlkit.parallel.megatron.step import RLBatch, train_step  # noqa: E402
from rlkit.parallel.packing import DataPacker  # noqa: E402

VOCAB = 200  # padded to 256 at tp=2: the last TP rank's vocab shard holds padding columns
LENGTHS = [9, 17, 5, 23, 12, 30, 3, 14]
RESPONSES = [4, 10, 2, 15, 6, 20, 1, 7]
MAX_RESPONSE_LEN = 24  # the generation budget L of seq_mean_token_sum_norm (>= every response here)
BUDGET = 40  # 113 tokens: >= 3 micro-batches on one rank, >= 2 per DP rank

# Single-process configurations: each KL estimator the seeds use, TIS alone, and Dr.GRPO's constant normalizer with
# every term on. tis_clip 1.2 / tis_clip_low 0.8 make both caps bite on the batch's rollout log-probs.
TIS = dict(use_tis=True, tis_clip=1.2, tis_clip_low=0.8)
CONFIGS = {
    "low_var_kl": PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="low_var_kl"),
    "k1_token_mean": PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1", aggregation="token_mean"),
    "tis": PolicyLossConfig(**TIS),
    "seq_norm_kl_tis": PolicyLossConfig(
        use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="low_var_kl", aggregation="seq_mean_token_sum_norm", **TIS
    ),
}


def _batch() -> RLBatch:
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]
    adv = [torch.full((r,), float(torch.randn(1, generator=g))) for r in RESPONSES]
    # near -log(200) = -5.3, so PPO's ratio clips on some tokens; the reference sits 0.5 lower, so that even k1
    # (signed, it cancels around x = 0) gives a KL of O(0.1)
    old = [-5.3 + 0.5 * torch.randn(r, generator=g) for r in RESPONSES]
    ref = [-5.8 + 0.5 * torch.randn(r, generator=g) for r in RESPONSES]
    rollout = [o + 0.3 * torch.randn(r, generator=g) for o, r in zip(old, RESPONSES, strict=True)]
    masks = [(torch.rand(r, generator=g) > 0.3).float() for r in RESPONSES]
    return RLBatch(
        tokens=tokens, response_lengths=RESPONSES, advantages=adv, old_log_probs=old, loss_masks=masks,
        ref_log_probs=ref, rollout_log_probs=rollout,
    )  # fmt: skip


def _whole_batch_reference(hf, batch: RLBatch, config: PolicyLossConfig):
    """``(loss, grad_norm, metrics, grads by HF name)`` of one ``rl_loss`` call on the whole batch."""
    from rlkit.ckpt.experts import split_fused_experts

    model = copy.deepcopy(hf).train()
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    attention = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, tokens in enumerate(batch.tokens):
        ids[row, : len(tokens)], attention[row, : len(tokens)] = tokens, 1
    logits = model(input_ids=ids, attention_mask=attention).logits
    log_probs = []
    for row, (tokens, r) in enumerate(zip(batch.tokens, RESPONSES, strict=True)):
        # response token j sits at position L - r + j and is predicted by position L - r + j - 1
        predicted = torch.log_softmax(logits[row, len(tokens) - r - 1 : len(tokens) - 1].float(), dim=-1)
        log_probs.append(predicted.gather(1, tokens[len(tokens) - r :, None])[:, 0])
    counts = batch.loss_token_counts()
    loss, metrics = rl_loss(
        torch.cat(log_probs),
        torch.cat(list(batch.old_log_probs)),
        torch.cat(list(batch.advantages)),
        torch.cat(list(batch.loss_masks)),
        config=config,
        normalizer=global_normalizer(counts, mode=config.aggregation, max_response_len=MAX_RESPONSE_LEN),
        ref_log_probs=torch.cat(list(batch.ref_log_probs)),
        rollout_log_probs=torch.cat(list(batch.rollout_log_probs)),
        sample_ids=torch.cat([torch.full((r,), i) for i, r in enumerate(RESPONSES)]),
        sample_loss_token_counts=torch.tensor(counts, dtype=torch.float32),
        metrics_normalizer=float(sum(counts)),
    )
    loss.backward()
    grads = split_fused_experts({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))
    return float(loss.detach()), grad_norm, {k: float(v) for k, v in metrics.items()}, grads


def _assert_grads_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], msg: str) -> None:
    assert got, msg
    for key, want_grad in want.items():
        got_grad = got.get(key, torch.zeros_like(want_grad))
        scale = float(want_grad.abs().max())
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=f"{msg} {key}")


def _assert_terms_exercised(config: PolicyLossConfig, metrics: dict[str, float]) -> None:
    assert 0.0 < metrics["pg_clipfrac"]  # PPO's clip is on some tokens
    if config.use_kl_loss:
        assert abs(metrics["kl_loss"]) > 1e-2
    if config.use_tis:
        assert 0.0 < metrics["tis_clipfrac"]  # the caps change some weights


# ---- one process ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_process_step_equals_the_whole_batch_loss(name):
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model

    config = CONFIGS[name]
    hf = build_tiny_qwen3(seed=3, vocab_size=VOCAB)
    batch = _batch()
    want_loss, want_norm, want_metrics, want_grads = _whole_batch_reference(hf, batch, config)
    _assert_terms_exercised(config, want_metrics)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    got = train_step(
        model, None, batch, packer=DataPacker(max_tokens_per_gpu=BUDGET), loss_config=config,
        forward=megatron_forward(model), vocab_size=VOCAB, max_grad_norm=None, max_response_len=MAX_RESPONSE_LEN,
    )  # fmt: skip
    assert got.num_micro_batches >= 3
    assert got.loss == pytest.approx(want_loss, rel=1e-5)
    assert got.grad_norm == pytest.approx(want_norm, rel=1e-5)
    for key in ("pg_loss", "kl_loss", "tis", "tis_clipfrac"):
        if key in want_metrics:
            assert got.metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-8), key
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _assert_grads_match(megatron_to_hf({(0, 0, 0): grads}, hf.config.to_dict()), want_grads, name)


@pytest.mark.usefixtures("megatron_world")
def test_missing_inputs_are_named():
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model

    hf = build_tiny_qwen3(seed=0, vocab_size=VOCAB)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    full = _batch()
    plain = RLBatch(tokens=full.tokens, response_lengths=RESPONSES, advantages=full.advantages,
                    old_log_probs=full.old_log_probs)  # fmt: skip
    kwargs = dict(packer=DataPacker(max_tokens_per_gpu=BUDGET), forward=megatron_forward(model), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="use_kl_loss=True .kl_loss_coef=0.5. needs RLBatch.ref_log_probs"):
        train_step(model, None, plain, loss_config=CONFIGS["low_var_kl"], **kwargs)
    with pytest.raises(ValueError, match="use_tis=True needs RLBatch.rollout_log_probs"):
        train_step(model, None, plain, loss_config=CONFIGS["tis"], **kwargs)
    with pytest.raises(ValueError, match="pass train_step.*max_response_len"):
        train_step(model, None, plain, loss_config=PolicyLossConfig(aggregation="seq_mean_token_sum_norm"), **kwargs)
    assert all(p.grad is None for p in model.parameters())  # refused before any forward
    short = [r[:-1] for r in full.ref_log_probs]
    with pytest.raises(ValueError, match="sample 0: ref_log_probs .3,. must have response_length=4"):
        RLBatch(tokens=full.tokens, response_lengths=RESPONSES, advantages=full.advantages,
                old_log_probs=full.old_log_probs, ref_log_probs=short)  # fmt: skip
    with pytest.raises(ValueError, match="rollout_log_probs has 1 entries for 8 samples"):
        RLBatch(tokens=full.tokens, response_lengths=RESPONSES, advantages=full.advantages,
                old_log_probs=full.old_log_probs, rollout_log_probs=full.rollout_log_probs[:1])  # fmt: skip


# ---- two gloo ranks ------------------------------------------------------------------------------------------

WORLD = 2
# case -> (init_model_parallel sizes, DataPacker.dp_size, loss config, Layout for megatron_to_hf)
PARALLEL_CASES = {
    "dp2": (dict(), 2, CONFIGS["seq_norm_kl_tis"], Layout()),
    # CP: every sample's tokens (and its reference / rollout log-probs) are split over the two ranks
    "cp2": (
        dict(context_parallel_size=2),
        1,
        PolicyLossConfig(
            use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1", aggregation="seq_mean_token_sum_norm", **TIS
        ),
        Layout(),
    ),  # fmt: skip
    # PP: megatron's 1F1B schedule runs the loss of each micro-batch on the last stage
    "pp2": (dict(pipeline_model_parallel_size=2), 1, CONFIGS["seq_norm_kl_tis"], Layout(pp=2)),
    # TP: the KL's log-probs are vocab-parallel; sample_mean needs the global per-sample token counts
    "tp2": (
        dict(tensor_model_parallel_size=2),
        1,
        PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.5, **TIS),
        Layout(tp=2, etp=2),
    ),  # fmt: skip
}


def _worker(rank: int, results) -> None:
    from megatron.core import parallel_state as ps

    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel

    for case, (sizes, dp, config, _) in PARALLEL_CASES.items():
        init_model_parallel(**sizes)
        hf = build_tiny_qwen3(seed=3, vocab_size=VOCAB)
        model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
        cp = sizes.get("context_parallel_size", 1)
        step = train_step(
            model, None, _batch(), packer=DataPacker(dp_size=dp, cp_size=cp, max_tokens_per_gpu=BUDGET // cp),
            loss_config=config, forward=megatron_forward(model), vocab_size=VOCAB, max_grad_norm=None,
            max_response_len=MAX_RESPONSE_LEN,
        )  # fmt: skip
        results[(case, rank)] = dict(
            loss=step.loss,
            grad_norm=step.grad_norm,
            metrics=step.metrics,
            shard=(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                   ps.get_expert_model_parallel_rank()),
            grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )  # fmt: skip
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def parallel_results():
    return run_on_gloo_ranks(_worker, WORLD)


@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_two_ranks_equal_the_whole_batch_loss(parallel_results, case):
    _, _, config, layout = PARALLEL_CASES[case]
    hf = build_tiny_qwen3(seed=3, vocab_size=VOCAB)
    want_loss, want_norm, want_metrics, want_grads = _whole_batch_reference(hf, _batch(), config)
    _assert_terms_exercised(config, want_metrics)
    ranks = [parallel_results[(case, r)] for r in range(WORLD)]
    shards = {got["shard"]: got["grads"] for got in ranks}  # DP / CP replicas hold one shard
    _assert_grads_match(megatron_to_hf(shards, hf.config.to_dict(), layout=layout), want_grads, case)
    for got in ranks:  # every rank reports the global values
        assert got["loss"] == pytest.approx(want_loss, rel=1e-5), case
        assert got["grad_norm"] == pytest.approx(want_norm, rel=1e-5), case
        for key in ("kl_loss", "tis", "tis_clipfrac"):
            assert got["metrics"][key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-8), (case, key)
