"""Memory estimates against direct parameter counts, saved-tensor counts and hand-worked formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlkit.models.presets import ModelSpec, get_preset, spec_from_hf_config
from rlkit.parallel.memory import activation_bytes_per_token_layer, estimate_memory
from rlkit.parallel.plan import ParallelPlan


def _tiny_hf(model_type: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        tie_word_embeddings=False,
        **kw,
    )
    return AutoModelForCausalLM.from_config(config), spec_from_hf_config(config.to_dict())


@pytest.mark.parametrize("fp32_grads", [False, True])
def test_weights_grads_optimizer_exact_against_hf_count(fp32_grads):
    model, spec = _tiny_hf("qwen3")
    n = sum(p.numel() for p in model.parameters())  # vocab 256 is a multiple of 128: no padding
    plan = ParallelPlan(accumulate_allreduce_grads_in_fp32=fp32_grads)
    est = estimate_memory(plan, spec, 2)  # dp=2: the distributed optimizer halves the 12 B/param states
    (stage,) = est.stages
    assert stage.weights == 2 * n
    assert stage.grads == (4 if fp32_grads else 2) * n
    assert stage.optimizer == 12 * n // 2
    cpu = estimate_memory(dataclasses.replace(plan, optimizer_cpu_offload=True), spec, 2)
    assert cpu.stages[0].optimizer == 0
    assert cpu.host_per_node == 8 * 16 * n // 2  # 8 GPUs per node, 16 B per param of each half shard


def test_pipeline_stages_sum_to_hf_count():
    model, spec = _tiny_hf("qwen3")
    est = estimate_memory(ParallelPlan(pp=2), spec, 2)
    assert sum(s.weights for s in est.stages) == 2 * sum(p.numel() for p in model.parameters())
    # stage 0: embedding + layers 0-1; stage 1: layers 2-3 + final norm + head (direct count).
    first = model.model.embed_tokens.weight.numel() + sum(
        p.numel() for layer in model.model.layers[:2] for p in layer.parameters()
    )
    assert est.stages[0].dense_params == first


def test_expert_parallel_sharding_against_hf_count():
    model, spec = _tiny_hf("qwen3_moe", num_experts=8, moe_intermediate_size=32, num_experts_per_tok=2)
    experts = sum(p.numel() for layer in model.model.layers for p in layer.mlp.experts.parameters())
    total = sum(p.numel() for p in model.parameters())
    plan = ParallelPlan(ep=4)
    est = estimate_memory(plan, spec, 4)  # dp=4, edp=1: dense optimizer states / 4, experts / 1
    (stage,) = est.stages
    assert stage.expert_params == experts // 4
    assert stage.dense_params == total - experts
    assert stage.optimizer == 12 * (total - experts) // 4 + 12 * experts // 4


class _FlashContract(torch.autograd.Function):
    """Attention that saves exactly what a flash kernel saves: q, k, v, output, fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.no_grad():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ctx.save_for_backward(q, k, v, out, torch.zeros(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(out, leaves, grad)


def _flash_contract_attention(module, query, key, value, attention_mask, **kwargs):
    return _FlashContract.apply(query, key, value).transpose(1, 2).contiguous(), None


def test_hf_activation_formula_matches_saved_tensors():
    # Independent reference: the bytes autograd actually saves in an HF Qwen3 forward (bf16), counted
    # by storage so shared tensors count once.
    from transformers import AttentionInterface

    from rlkit.models.tiny import build_tiny_qwen3

    AttentionInterface.register("rlkit_fa_contract", _flash_contract_attention)
    model = build_tiny_qwen3(
        seed=0,
        dtype=torch.bfloat16,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    model.set_attn_implementation("rlkit_fa_contract")
    model.train()
    spec = spec_from_hf_config(model.config.to_dict())
    tokens = 256
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 128, (1, tokens)))
    measured = sum(v for k, v in saved.items() if k not in params)
    h = spec.hidden_size
    # layers + final norm (fp32 input 4h, bf16 normalised 2h, fp32 rsqrt 4) + int64 ids 8 + RoPE cos/sin 2 * 2*d
    predicted = tokens * (
        sum(activation_bytes_per_token_layer(spec, i, backend="hf") for i in range(3))
        + 6 * h
        + 4
        + 8
        + 2 * 2 * spec.head_dim
    )
    assert measured == predicted


def test_megatron_activation_formula_hand_worked():
    spec = ModelSpec(
        name="m",
        source="t",
        model_type="qwen3",
        num_layers=2,
        hidden_size=1024,
        ffn_hidden_size=2816,
        num_attention_heads=16,
        num_kv_heads=16,
        head_dim=64,
        vocab_size=1024,
    )
    h, f = 1024, 2816
    # 2 B * (4h norm/linear inputs + q h + k,v 2h + proj input h + 3F SwiGLU) = 2*(8h + 3F)
    assert activation_bytes_per_token_layer(spec, 0) == 2 * (8 * h + 3 * f)
    # With a GeLU 4h MLP in place of 3F (fc1 out 4h + act out 4h) this is 32h: Korthikanti et al.'s 34h
    # minus their two dropout masks (dropout is 0 in the seeds).
    assert 2 * (8 * h + 8 * h) == (34 - 2) * h
    # TP=8 without SP leaves the 4h inputs whole (paper: 10 + 24/t); with SP everything is / 8 (34/t).
    assert activation_bytes_per_token_layer(spec, 0, tp=8) == 2 * (4 * h + (4 * h + 3 * f) / 8)
    assert activation_bytes_per_token_layer(spec, 0, tp=8, sp=True) == 2 * (8 * h + 3 * f) / 8


def test_recompute_and_pipeline_in_flight():
    spec = get_preset("qwen3-4b")
    base = dict(tp=2, sp=True, pp=2, max_tokens_per_gpu=1000)
    none = estimate_memory(ParallelPlan(**base), spec, 4)
    full = estimate_memory(ParallelPlan(**base, recompute="full"), spec, 4)
    per_layer = activation_bytes_per_token_layer(spec, 0, tp=2, sp=True)
    # stage 0: 18 layers, 2 micro-batches in flight (1F1B); stage 1: 1.
    assert none.stages[0].activations == int(per_layer * 1000 * 18 * 2)
    assert none.stages[1].activations == int(per_layer * 1000 * 18 * 1)
    # full recompute: 2 B * h / tp per token per layer kept, plus one layer re-materialised.
    assert full.stages[0].activations == int(2 * 2560 / 2 * 1000 * 18 * 2 + per_layer * 1000)
    # logits on the last stage only: tokens * padded_vocab / tp * 4 B = 1000 * 152064/2 * 4.
    assert (none.stages[0].logits, none.stages[1].logits) == (0, 1000 * 152064 // 2 * 4)


def test_suggestions_when_over_capacity():
    from rlkit.parallel.memory import suggestions

    # Seed 000 without its CPU Adam and recompute: Qwen3-30B-A3B on 8 GPUs (fp32 grads) needs ~76 GiB, over a
    # 64 GiB budget (leaving room for CUDA context, NCCL buffers, fragmentation, which the plan does not model);
    # with CPU Adam and full recompute it fits, but needs host memory.
    plan = ParallelPlan(tp=4, sp=True, ep=8, etp=1, max_tokens_per_gpu=8192, accumulate_allreduce_grads_in_fp32=True)
    est = estimate_memory(plan, get_preset("qwen3-30b-a3b"), 8)
    assert est.worst.total > 64 * 2**30
    text = " ".join(suggestions(est, plan, gpu_gib=64))
    assert "CPU Adam (--optimizer-cpu-offload) frees" in text and "--recompute-granularity full" in text
    cpu = dataclasses.replace(plan, optimizer_cpu_offload=True, recompute="full")
    est = estimate_memory(cpu, get_preset("qwen3-30b-a3b"), 8)
    assert est.worst.total < 64 * 2**30
    assert "host memory per node" in " ".join(suggestions(est, cpu, gpu_gib=64, host_gib_per_node=256))


def test_moe_activation_formula_hand_worked():
    spec = get_preset("qwen3-30b-a3b")  # h 2048, top-8, Fe 768, no shared experts
    h, k, fe = 2048, 8, 768
    q, kv, o = 32 * 128, 2 * 4 * 128, 32 * 128
    # TP4 SP ETP1: a GPU dispatches T/4 tokens; its experts get T/4 * 8 slots of width 3*768.
    expected = 2 * (4 * h + q + kv + o + k * h * 1 + 3 * k * fe) / 4
    assert activation_bytes_per_token_layer(spec, 0, tp=4, etp=1, sp=True) == expected
    # ETP2 replicates each permuted token on both expert-TP ranks: + k*h per token / tp.
    assert activation_bytes_per_token_layer(spec, 0, tp=4, etp=2, sp=True) == expected + 2 * k * h / 4


def test_cli_unknown_model(capsys):
    from rlkit.parallel.plan import main

    assert main(["--model", "qwen9", "--gpus", "8"]) == 2
    assert "known presets" in capsys.readouterr().out


def test_precision_aware_optimizer_dtypes():
    model, spec = _tiny_hf("qwen3")
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"exp_avg_dtype='bf16' needs use_precision_aware_optimizer=True"):
        ParallelPlan(exp_avg_dtype="bf16")
    plan = ParallelPlan(use_precision_aware_optimizer=True, exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16")
    # fp32 master (4) + bf16 moments (2 + 2) = 8 B per parameter, one DP rank.
    assert estimate_memory(plan, spec, 1).stages[0].optimizer == 8 * n
    host = estimate_memory(dataclasses.replace(plan, optimizer_cpu_offload=True), spec, 1)
    assert host.host_per_node == 8 * (8 + 4) * n  # + fp32 grad staging copy, 8 GPUs per node
    assert "--exp-avg-dtype bf16" in " ".join(plan.megatron_flags())


def test_vpp_in_flight_factor():
    spec = get_preset("qwen3-4b")  # 36 layers
    plain = estimate_memory(ParallelPlan(pp=4, max_tokens_per_gpu=100), spec, 4)
    inter = estimate_memory(ParallelPlan(pp=4, vpp=3, max_tokens_per_gpu=100), spec, 4)
    # stage 0: 4 micro-batches in flight, times 1 + (4-1)/(4*3) = 1.25 with interleaving.
    assert inter.stages[0].activations == pytest.approx(plain.stages[0].activations * 1.25, rel=1e-9)


def test_kl_reference_model_adds_one_copy_of_each_stages_weights():
    model, spec = _tiny_hf("qwen3")
    n = sum(p.numel() for p in model.parameters())
    plain = estimate_memory(ParallelPlan(pp=2), spec, 2)
    with_ref = estimate_memory(ParallelPlan(pp=2), spec, 2, reference_model=True)
    for a, b in zip(plain.stages, with_ref.stages, strict=True):
        assert b.reference == a.weights and a.reference == 0  # bf16, sharded like the policy
        assert b.total == a.total + a.weights
    assert sum(s.reference for s in with_ref.stages) == 2 * n
    assert " ref " in with_ref.table() and " ref " not in plain.table()
