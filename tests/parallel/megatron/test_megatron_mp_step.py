"""The GRPO step under TP2, TP2+SP, DP2, PP2, EP2, CP2, MoE PP2 and MoE TP2+SP (2 gloo ranks) == one process.

Reference: HF transformers' unsharded model running the same step on one process (``hf_forward``, padded
micro-batches, its own packing) - independent of megatron, and the single-process megatron step equals it
(test_megatron_step.py). Every rank's gradients are gathered into HF names with
:func:`rlkit.ckpt.convert.megatron_to_hf` under the rank's layout, so each sharded weight's gradient is compared
with the matching slice of the reference gradient (TP column/row shards, the PP stage's layers, EP's experts).
float32 on CPU: the same math summed in another order, relative differences ~1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")


from rl_batches import synthetic_rl_batch  # noqa: E402

from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.algos.losses import PolicyLossConfig  # noqa: E402
from rlkit.ckpt.convert import Layout, megatron_to_hf  # noqa: E402
from rlkit.parallel.megatron.forward import hf_forward  # noqa: E402
from rlkit.parallel.megatron.step import RLBatch, compute_log_probs, train_step  # noqa: E402
from rlkit.parallel.packing import DataPacker  # noqa: E402

WORLD = 2
VOCAB = 200  # padded to 256 at tp=2: the last TP rank's shard holds 56 padding columns
LENGTHS = [9, 17, 5, 23, 12, 30, 3, 14]
RESPONSES = [4, 10, 2, 15, 6, 20, 1, 7]
BUDGET = 40  # 113 tokens: >= 3 micro-batches on one rank, >= 2 per DP rank
# case -> (init_model_parallel sizes, sequence_parallel, MoE, DataPacker.dp_size, Layout for megatron_to_hf);
# DataPacker.cp_size is the CP size.
CASES = {
    "tp2": (dict(tensor_model_parallel_size=2), False, False, 1, Layout(tp=2, etp=2)),
    "tp2_sp": (dict(tensor_model_parallel_size=2), True, False, 1, Layout(tp=2, etp=2)),
    "dp2": (dict(), False, False, 2, Layout()),
    "pp2": (dict(pipeline_model_parallel_size=2), False, False, 1, Layout(pp=2)),
    "ep2": (dict(expert_model_parallel_size=2), False, True, 2, Layout(ep=2)),
    "cp2": (dict(context_parallel_size=2), False, False, 1, Layout()),
    # MoE under PP: one padded micro-batch length (megatron refuses variable lengths with allgather dispatch)
    "pp2_moe": (dict(pipeline_model_parallel_size=2), False, True, 1, Layout(pp=2)),
    # MoE under TP + SP: experts split over TP (expert TP = TP)
    "tp2_sp_moe": (dict(tensor_model_parallel_size=2), True, True, 1, Layout(tp=2, etp=2)),
}
LOSS = PolicyLossConfig(aggregation="token_mean")


def _hf_model(moe: bool):
    from rlkit.models.tiny import build_tiny_qwen3, build_tiny_qwen3_moe

    if not moe:
        return build_tiny_qwen3(seed=3, vocab_size=VOCAB).train()  # tied embeddings: PP2 needs the embedding group
    return build_tiny_qwen3_moe(seed=5, vocab_size=VOCAB).train()


def _batch() -> RLBatch:
    return synthetic_rl_batch(LENGTHS, RESPONSES, vocab=VOCAB, with_loss_masks=True)


def _worker(rank: int, results) -> None:
    from megatron.core import parallel_state as ps

    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel

    for case, (sizes, sequence_parallel, moe, dp, _) in CASES.items():
        init_model_parallel(**sizes)
        hf = _hf_model(moe)
        model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), sequence_parallel=sequence_parallel)
        cp = sizes.get("context_parallel_size", 1)
        packer = DataPacker(dp_size=dp, cp_size=cp, max_tokens_per_gpu=BUDGET // cp)
        forward = megatron_forward(model)
        step = train_step(
            model, None, _batch(), packer=packer, loss_config=LOSS, forward=forward, vocab_size=VOCAB,
            max_grad_norm=None,
        )  # fmt: skip
        log_probs = compute_log_probs(
            forward, _batch().tokens, RESPONSES, packer=packer, vocab_size=VOCAB, model=model.eval()
        )
        results[(case, rank)] = dict(
            loss=step.loss,
            grad_norm=step.grad_norm,
            clipfrac=step.metrics["pg_clipfrac"],
            shard=(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                   ps.get_expert_model_parallel_rank()),
            grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            log_probs=log_probs,
        )  # fmt: skip
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def parallel_results():
    return run_on_gloo_ranks(_worker, WORLD)


def _reference(moe: bool):
    """The single-process step on HF's unsharded model: loss, grad norm, gradients by HF name, log-probs."""
    from rlkit.ckpt.experts import split_fused_experts

    hf = _hf_model(moe)
    model = copy.deepcopy(hf)
    step = train_step(
        model, None, _batch(), packer=DataPacker(max_tokens_per_gpu=1000), loss_config=LOSS,
        forward=hf_forward(model), vocab_size=VOCAB, layout="bshd", max_grad_norm=None,
    )  # fmt: skip
    grads = split_fused_experts({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    with torch.no_grad():
        log_probs = []
        for tokens, r in zip(_batch().tokens, RESPONSES, strict=True):
            logits = hf.eval()(input_ids=tokens[None]).logits[0].double()
            log_probs.append(torch.log_softmax(logits[-r - 1 : -1], -1).gather(1, tokens[-r:, None])[:, 0])
    return step, grads, log_probs, hf.config.to_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_step_reproduces_single_process(parallel_results, case):
    _, _, moe, _, layout = CASES[case]
    want, want_grads, want_log_probs, config = _reference(moe)
    ranks = [parallel_results[(case, r)] for r in range(WORLD)]
    assert 0.0 < want.metrics["pg_clipfrac"] < 1.0  # the clip is exercised
    # DP and CP replicas hold equal gradients; megatron_to_hf takes one state dict per (pp, tp, ep) shard.
    replicas = case in ("dp2", "cp2")
    shards = {got["shard"]: got["grads"] for got in ranks}
    assert len(shards) == (1 if replicas else WORLD)
    grads = megatron_to_hf(shards, config, layout=layout)
    assert grads, case
    for key, want_grad in want_grads.items():
        got_grad = grads.get(key, torch.zeros_like(want_grad))  # unrouted experts: no megatron gradient
        scale = float(want_grad.abs().max())
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=f"{case} {key}")
    for got in ranks:  # every rank reports the global values
        assert got["loss"] == pytest.approx(want.loss, rel=1e-5, abs=1e-7), case
        assert got["grad_norm"] == pytest.approx(want.grad_norm, rel=1e-5), case
        assert got["clipfrac"] == pytest.approx(want.metrics["pg_clipfrac"], rel=1e-5), case
        for values, expected in zip(got["log_probs"], want_log_probs, strict=True):
            torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-5)
    if replicas:
        for name, grad in ranks[0]["grads"].items():
            torch.testing.assert_close(grad, ranks[1]["grads"][name], rtol=0, atol=0, msg=name)
