"""Each rank's part of a model-parallel GPTModel (2 gloo processes) reproduces HF transformers' logits.

TP2 and TP2 + sequence parallelism: rank ``r``'s vocab-parallel logits are columns ``[r V'/2, (r+1) V'/2)`` of
HF's logits padded with the vocabulary padding; EP2 (Qwen3-MoE, 4 experts per rank): full logits equal HF's.
The reference is HF's unsharded forward in the parent process.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")


from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.parallel.plan import ParallelPlan  # noqa: E402

WORLD = 2
VOCAB = 200  # padded to 256 at tp=2: rank 1 holds 72 real and 56 padding columns
LENGTHS = [7, 9]
CASES = {
    "tp2": dict(plan=ParallelPlan(tp=2)),  # init_model_parallel reads a ParallelPlan too
    "tp2_sp": dict(tensor_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
}


def _hf_model(case: str):
    from rlkit.models.tiny import build_tiny_qwen3, build_tiny_qwen3_moe

    if case != "ep2":
        return build_tiny_qwen3(seed=3, vocab_size=VOCAB).eval()
    return build_tiny_qwen3_moe(seed=5, vocab_size=VOCAB).eval()


def _tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _worker(rank: int, results) -> None:
    from megatron.core import parallel_state

    from rlkit.parallel.layouts import pack_thd
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel

    for case, sizes in CASES.items():
        if "plan" in sizes:
            init_model_parallel(sizes["plan"])
        else:
            init_model_parallel(**sizes)
        hf = _hf_model(case)
        model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), sequence_parallel=case.endswith("sp"))
        micro = pack_thd(_tokens(), [2, 3], total_multiple=WORLD)  # SP: T divisible by tp
        with torch.no_grad():
            results[(case, rank)] = megatron_forward(model.eval())(micro)[: sum(LENGTHS)]
        parallel_state.destroy_model_parallel()


def test_model_parallel_logits_match_hf():
    results = run_on_gloo_ranks(_worker, WORLD)
    for case in CASES:
        with torch.no_grad():
            want = torch.cat([_hf_model(case)(input_ids=t[None]).logits[0] for t in _tokens()])
        if case == "ep2":
            for rank in range(WORLD):
                # fp32, same math in a different order (expert-parallel gather): ~1e-6 relative
                torch.testing.assert_close(results[(case, rank)][:, :VOCAB], want, rtol=1e-5, atol=1e-5)
            continue
        padded = torch.nn.functional.pad(want, (0, 256 - VOCAB))
        got = torch.cat([results[(case, rank)] for rank in range(WORLD)], dim=-1)
        assert results[(case, 0)].shape[-1] == 128
        torch.testing.assert_close(got, padded, rtol=1e-5, atol=1e-5, msg=case)
