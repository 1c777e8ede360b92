"""The compiled-sublayer route under tensor parallelism (2 gloo ranks), with and without sequence parallelism.

Each rank runs the sublayers' cores on its heads / MLP columns between megatron's TP mappings (all-gather
and reduce-scatter under SP, identity and all-reduce without). Under SP the route needs full recompute (its
core keeps the gathered input), so SP without recompute must fall back. Reference: the same layers run
module by module through megatron's ``TransformerLayer`` (``compiled_sublayers=False``), whose TP2 and
TP2+SP steps equal HF transformers' single-process step (test_megatron_mp_step.py). float32: a few ulps.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")


from rl_batches import synthetic_rl_batch  # noqa: E402

from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.algos.losses import PolicyLossConfig  # noqa: E402
from rlkit.parallel.megatron.step import RLBatch, train_step  # noqa: E402
from rlkit.parallel.packing import DataPacker  # noqa: E402

WORLD = 2
VOCAB = 200
LENGTHS = [9, 17, 5, 23, 12]
RESPONSES = [4, 10, 2, 15, 6]


FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
# case -> (sequence parallel, recompute, MoE, (attention, MLP) core calls per layer and micro-batch): 2 = the
# recompute's no-grad forward and its re-forward; 0 = no route: under SP it needs full recompute (see
# fused_layer), and a MoE layer's MLP is megatron's.
CASES = {
    "tp2": (False, {}, False, (1, 1)),
    "tp2_sp_full_recompute": (True, FULL_RECOMPUTE, False, (2, 2)),
    "tp2_sp_without_recompute": (True, {}, False, (0, 0)),
    "tp2_sp_moe_full_recompute": (True, FULL_RECOMPUTE, True, (2, 0)),
}


def _batch() -> RLBatch:
    return synthetic_rl_batch(LENGTHS, RESPONSES, vocab=VOCAB)


def _worker(rank: int, results) -> None:
    from megatron.core import parallel_state as ps

    from rlkit.models.tiny import build_tiny_qwen3, build_tiny_qwen3_moe
    from rlkit.parallel.megatron import fused_layer
    from rlkit.parallel.megatron import model as megatron_model
    from rlkit.parallel.megatron.forward import megatron_forward

    calls = {"attention_core": 0, "mlp_core": 0}

    def counted(name):
        fn = getattr(fused_layer, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    from megatron.core.tensor_parallel import random as megatron_random

    # megatron's recompute saves the CUDA RNG state; there is none on the CPU.
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    for case, (sequence_parallel, recompute, moe, _) in CASES.items():
        megatron_model.init_model_parallel(tensor_model_parallel_size=2)
        hf = build_tiny_qwen3_moe(seed=5, vocab_size=VOCAB) if moe else build_tiny_qwen3(seed=3, vocab_size=VOCAB)
        for compiled in (True, False):
            model = megatron_model.build_gpt_model(
                hf.config, hf_state_dict=hf.state_dict(), sequence_parallel=sequence_parallel,
                compiled_sublayers=compiled, **recompute,
            )  # fmt: skip
            calls.update(attention_core=0, mlp_core=0)
            with (
                mock.patch.object(fused_layer, "attention_core", counted("attention_core")),
                mock.patch.object(fused_layer, "mlp_core", counted("mlp_core")),
            ):
                step = train_step(
                    model, None, _batch(), packer=DataPacker(max_tokens_per_gpu=40),
                    loss_config=PolicyLossConfig(), forward=megatron_forward(model), vocab_size=VOCAB,
                    max_grad_norm=None,
                )  # fmt: skip
            results[(case, compiled, rank)] = dict(
                loss=step.loss,
                grad_norm=step.grad_norm,
                calls=dict(calls),
                micro_batches=step.num_micro_batches,
                layers=len(model.decoder.layers),
                grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def results():
    return run_on_gloo_ranks(_worker, WORLD)


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_route_equals_the_module_path(results, case):
    attention_calls, mlp_calls = CASES[case][3]
    for rank in range(WORLD):
        got, want = results[(case, True, rank)], results[(case, False, rank)]
        runs = got["micro_batches"] * got["layers"]
        # the route was taken, or not
        assert got["calls"] == {"attention_core": runs * attention_calls, "mlp_core": runs * mlp_calls}
        assert want["calls"] == {"attention_core": 0, "mlp_core": 0}
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
