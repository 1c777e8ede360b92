"""The compiled-sublayer transformer layer: its formulas against float64, its route, and the module path."""

from __future__ import annotations

import functools
import math
from unittest import mock

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")

from rlkit.models.tiny import build_tiny_qwen3, build_tiny_qwen3_moe  # noqa: E402
from rlkit.parallel.layouts import pack_thd  # noqa: E402
from rlkit.parallel.megatron import fused_layer  # noqa: E402
from rlkit.parallel.megatron import model as megatron_model  # noqa: E402
from rlkit.parallel.megatron.forward import megatron_forward  # noqa: E402
from rlkit.parallel.megatron.fused_layer import attention_sublayer_reference, mlp_sublayer_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world")


def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope64(x, positions, theta):
    """x [L, H, d] float64 rotated at integer positions: pairs (j, j + d/2) by angle pos * theta^(-2j/d)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]  # [L, d/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_attention_sublayer_matches_a_float64_per_sequence_formula():
    torch.manual_seed(0)
    D, G, per_group, d, theta = 16, 2, 3, 8, 1e4  # 6 query heads over 2 key/value heads
    lengths = [5, 1, 9, 3]
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    h = torch.randn(T, 1, D)
    w_norm, w_q, w_k = 1 + 0.1 * torch.randn(D), 1 + 0.1 * torch.randn(d), 1 + 0.1 * torch.randn(d)
    w_qkv = torch.randn(G * (per_group + 2) * d, D) / 4
    w_o = torch.randn(D, G * per_group * d) / 4
    inv = theta ** (-torch.arange(0, d, 2).float() / d)
    freqs = torch.cat([torch.outer(torch.arange(12).float(), inv)] * 2, dim=-1)[:, None, None, :]
    got = attention_sublayer_reference(
        h[:, 0], freqs[: max(lengths)], cu, w_norm, w_qkv, w_q, w_k, w_o,
        eps=1e-6, qk_eps=1e-5, softmax_scale=d**-0.5, use_varlen=False,
    )  # fmt: skip

    # float64, written per sequence with megatron's grouped rows spelled out: group g owns rows
    # [g * (per_group + 2) * d, (g + 1) * (per_group + 2) * d): per_group query heads, then k, then v.
    h64, rows = h.double()[:, 0], w_qkv.double().view(G, per_group + 2, d, D)
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        x = _rms(h64[start:end], w_norm.double(), 1e-6)
        pos = torch.arange(end - start)
        heads = []
        for head in range(G * per_group):
            g = head // per_group
            q = _rope64(_rms(x @ rows[g, head % per_group].T, w_q.double(), 1e-5)[:, None], pos, theta)[:, 0]
            k = _rope64(_rms(x @ rows[g, per_group].T, w_k.double(), 1e-5)[:, None], pos, theta)[:, 0]
            v = x @ rows[g, per_group + 1].T
            scores = (q @ k.T) * d**-0.5 + torch.full((len(pos), len(pos)), float("-inf")).triu(1).double()
            heads.append(scores.softmax(-1) @ v)
        outs.append(h64[start:end] + torch.cat(heads, dim=-1) @ w_o.double().T)
    torch.testing.assert_close(got.double(), torch.cat(outs), rtol=1e-5, atol=1e-5)


def test_mlp_sublayer_matches_a_float64_formula():
    torch.manual_seed(1)
    h, w_norm = torch.randn(7, 1, 12), 1 + 0.1 * torch.randn(12)
    w1, w2 = torch.randn(2 * 20, 12) / 3, torch.randn(12, 20) / 3
    got = mlp_sublayer_reference(h, w_norm, w1, w2, eps=1e-6)
    x = _rms(h.double(), w_norm.double(), 1e-6)
    gate, up = x @ w1[:20].double().T, x @ w1[20:].double().T
    expected = h.double() + (gate * torch.sigmoid(gate) * up) @ w2.double().T
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _build(hf, *, compiled_sublayers: bool):
    return megatron_model.build_gpt_model(
        hf.config, hf_state_dict=hf.state_dict(), compiled_sublayers=compiled_sublayers
    )


def _loss_and_grads(model, micro, weights):
    model.zero_grad(set_to_none=True)
    logits = megatron_forward(model)(micro)
    (logits.float() * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _counting():
    """Patches counting the compiled-sublayer calls (they still run)."""
    counts = {"attention": 0, "mlp": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    patches = [
        mock.patch.object(fused_layer, "attention_sublayer", counted("attention", fused_layer.attention_sublayer)),
        mock.patch.object(fused_layer, "mlp_sublayer", counted("mlp", fused_layer.mlp_sublayer)),
    ]
    return counts, patches


def test_fused_layer_takes_the_compiled_route_and_equals_the_module_path():
    hf = build_tiny_qwen3(seed=7)
    fused, modules = _build(hf, compiled_sublayers=True), _build(hf, compiled_sublayers=False)
    assert type(fused.decoder.layers[0]).__name__ == "FusedTransformerLayer"
    assert type(modules.decoder.layers[0]).__name__ == "TransformerLayer"
    micro = pack_thd([torch.randint(1, 128, (n,)) for n in (9, 3, 14)], [1, 1, 1])
    weights = torch.randn(micro.input_ids.shape[0], fused.embedding.word_embeddings.weight.shape[0])
    counts, patches = _counting()
    with patches[0], patches[1]:
        got_logits, got = _loss_and_grads(fused, micro, weights)
    layers = len(fused.decoder.layers)
    assert counts == {"attention": layers, "mlp": layers}
    want_logits, want = _loss_and_grads(modules, micro, weights)
    # fp32, same arithmetic in a different grouping (fused residual adds): a few ulps.
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_layer_falls_back_where_the_route_does_not_apply():
    """Padded input runs the parent's layer; a MoE layer fuses its attention only."""
    hf = build_tiny_qwen3(seed=8)
    model = _build(hf, compiled_sublayers=True)
    ids = torch.randint(1, 128, (2, 6))
    counts, patches = _counting()
    with patches[0], patches[1], torch.no_grad():
        got = model(ids, torch.arange(6).expand(2, 6), attention_mask=None)
        assert counts == {"attention": 0, "mlp": len(model.decoder.layers)}  # the MLP does not care about layout
        torch.testing.assert_close(got, hf(input_ids=ids).logits, rtol=1e-5, atol=2e-5)

    moe_hf = build_tiny_qwen3_moe(seed=2, norm_topk_prob=True)
    moe = _build(moe_hf, compiled_sublayers=True)
    samples = [torch.randint(1, 128, (n,)) for n in (5, 8)]
    counts, patches = _counting()
    with patches[0], patches[1], torch.no_grad():
        per_sample = pack_thd(samples, [1, 1]).unpack_tokens(megatron_forward(moe)(pack_thd(samples, [1, 1])).T)
    assert counts == {"attention": len(moe.decoder.layers), "mlp": 0}
    for tokens, logits in zip(samples, per_sample, strict=True):
        torch.testing.assert_close(logits.T, moe_hf(input_ids=tokens[None]).logits[0], rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
def test_compiled_sublayers_on_gpu_match_the_module_path_without_graph_breaks():
    """bf16 on CUDA: Inductor graphs + varlen attention vs the fused modules one by one, over three lengths."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from torch._dynamo.utils import counters

    hf = build_tiny_qwen3(
        seed=3, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64
    )
    built = {}
    for compiled in (True, False):
        built[compiled] = megatron_model.build_gpt_model(
            hf.config, hf_state_dict=hf.state_dict(), params_dtype=torch.bfloat16, device="cuda",
            compiled_sublayers=compiled,
        )  # fmt: skip
    counters.clear()
    report = []
    for lengths in ((40, 7, 81), (13, 120), (64, 64, 5, 30)):
        micro = pack_thd([torch.randint(1, 128, (n,)) for n in lengths], [1] * len(lengths))
        weights = torch.randn(micro.input_ids.shape[0], 128, device="cuda")
        (got_logits, got), (want_logits, want) = (_loss_and_grads(built[c], micro, weights) for c in (True, False))
        diff = (got_logits.float() - want_logits.float()).abs()
        report.append(f"lengths {lengths}: logits max {diff.max():.2e} mean {diff.mean():.2e}")
        # Both paths round the same float32 math to bf16 at different points (fused residual adds, one
        # kernel vs several): ~1 bf16 ulp of O(1) logits, and gradients within 2% of their own norm.
        assert diff.max() < 6e-2 and diff.mean() < 5e-3, report[-1]
        for name in want:
            rel = (got[name].float() - want[name].float()).norm() / want[name].float().norm().clamp_min(1e-12)
            assert rel < 2e-2, f"{name}: relative gradient difference {rel:.2e}"
    breaks = dict(counters["graph_break"])
    print("\n".join(report), f"\ngraph breaks: {breaks}, unique graphs: {counters['stats']['unique_graphs']}")
    assert not breaks


@functools.cache
def _traceable_packed_attention():
    """A CPU stand-in for the varlen kernel as torch.compile sees it: a custom op with a symbolic max length.

    Forward is the per-sequence reference; backward is softmax attention's gradient written out
    (dV = P^T dO, dS = P * (dP - rowsum(dP * P)), dQ = s dS K, dK = s dS^T Q), since a custom op's
    backward runs below autograd.
    """
    from rlkit.parallel.megatron.attention import packed_causal_attention_reference

    @torch.library.custom_op("rlkit_test::packed_attention", mutates_args=())
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:  # fmt: skip  # noqa: E501
        return packed_causal_attention_reference(q, k, v, cu, softmax_scale=scale)

    @attend.register_fake
    def _(q, k, v, cu, max_len, scale):
        return torch.empty_like(q)

    @torch.library.custom_op("rlkit_test::packed_attention_backward", mutates_args=())
    def attend_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> list[torch.Tensor]:  # fmt: skip  # noqa: E501
        grads = ([], [], [])
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs, gs = (t[start:end].transpose(0, 1).float() for t in (q, k, v, g))  # [H, L, d]
            causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            p = (scale * qs @ ks.transpose(1, 2)).masked_fill(~causal, float("-inf")).softmax(-1)
            dp = gs @ vs.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            for out, part in zip(grads, (scale * ds @ ks, scale * ds.transpose(1, 2) @ qs, p.transpose(1, 2) @ gs)):  # noqa: B905
                out.append(part.transpose(0, 1))
        return [torch.cat(parts).to(q.dtype) for parts in grads]

    @attend_backward.register_fake
    def _(g, q, k, v, cu, scale):
        return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]

    def setup_context(ctx, inputs, output):
        q, k, v, cu, _, scale = inputs
        ctx.save_for_backward(q, k, v, cu)
        ctx.scale = scale

    def backward(ctx, g):
        gq, gk, gv = torch.ops.rlkit_test.packed_attention_backward(g, *ctx.saved_tensors, ctx.scale)
        return gq, gk, gv, None, None, None

    attend.register_autograd(backward, setup_context=setup_context)

    def varlen_stand_in(query, key, value, cu_q, cu_k, max_q, max_k, scale):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return torch.ops.rlkit_test.packed_attention(query, key, value, cu_q, max_q, scale)

    return varlen_stand_in


@pytest.mark.slow
def test_compiled_route_keeps_a_bounded_set_of_graphs_under_recompute_and_new_lengths(monkeypatch):
    """Inductor on the CPU with a traceable varlen stand-in: the graphs the route compiles, and their numbers.

    Full recompute (a no-grad forward, then a grad recompute of the same micro-batch), log-prob passes,
    and micro-batches of new lengths must reuse symbolic-size graphs: only grad mode, requires_grad and
    the first layer's input layout may add one. Dynamo's limit would otherwise make it run eagerly.
    """
    from megatron.core.tensor_parallel import random as megatron_random
    from torch._dynamo.utils import counters

    from rlkit.algos.losses import PolicyLossConfig
    from rlkit.parallel.megatron.step import RLBatch, compute_log_probs, train_step
    from rlkit.parallel.packing import DataPacker

    monkeypatch.setattr(fused_layer, "_call_varlen", _traceable_packed_attention())
    monkeypatch.setattr(fused_layer, "varlen_available", lambda device, dtype: True)
    monkeypatch.setattr(fused_layer, "_use_compile", lambda x, backend: True)
    # megatron's recompute saves the CUDA RNG state; there is none on the CPU.
    monkeypatch.setattr(megatron_random, "_get_cuda_rng_state", lambda *args, **kwargs: None)
    monkeypatch.setattr(megatron_random, "_set_cuda_rng_state", lambda *args, **kwargs: None)
    torch._dynamo.reset()
    counters.clear()

    hf = build_tiny_qwen3(seed=4)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 90, (10,), generator=g).tolist()
    tokens = [torch.randint(1, 128, (n,), generator=g) for n in lengths]

    def batch_of(indices):
        return RLBatch(
            tokens=[tokens[i] for i in indices],
            response_lengths=[lengths[i] // 2 for i in indices],
            advantages=[torch.linspace(-1, 1, lengths[i] // 2) for i in indices],
            # log(1/128): a random tiny model's ratios sit near 1, far from the clip edges, where bf16 round-off
            # would flip clip decisions and move gradients by ~10% on either path.
            old_log_probs=[torch.full((lengths[i] // 2,), -math.log(128)) for i in indices],
        )

    batch = batch_of(range(len(tokens)))

    def grads_of(model, budget, dtype_batch=batch):
        step = train_step(
            model, None, dtype_batch, packer=DataPacker(max_tokens_per_gpu=budget), loss_config=PolicyLossConfig(),
            forward=megatron_forward(model), vocab_size=128, max_grad_norm=None,
        )  # fmt: skip
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return step, grads

    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = megatron_model.build_gpt_model(
        hf.config, hf_state_dict=hf.state_dict(), params_dtype=torch.bfloat16, **recompute
    )
    # A one-sequence micro-batch first: T == max_seqlen there, which duck shaping would fold into one symbol.
    grads_of(model, 200, batch_of([0]))
    _, compiled_grads = grads_of(model, 200)
    compute_log_probs(
        megatron_forward(model), tokens, batch.response_lengths, packer=DataPacker(max_tokens_per_gpu=120),
        vocab_size=128,
    )  # fmt: skip
    plain = megatron_model.build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), params_dtype=torch.bfloat16)
    grads_of(plain, 150)
    graphs = counters["stats"]["unique_graphs"]
    for budget in (100, 170, 260):  # new budgets: new micro-batch lengths and counts
        grads_of(plain, budget)
    assert counters["stats"]["unique_graphs"] == graphs, "new lengths compiled new graphs"
    # Attention: 6 = training (first layer's input a transposed view, later layers' not), recompute's no-grad
    # forward (the same two), log-prob passes (no grad, inputs not requiring grad: two); the MLP: grad on/off.
    # Sizes specialised on a first compile (dynamic=None) made it 14 here, past dynamo's default limit of 8.
    assert graphs == 8, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])

    # The compiled bf16 gradients (full recompute) against float32 megatron modules, and the bf16 module
    # path's own distance to float32 as the yardstick.
    monkeypatch.setattr(fused_layer, "_use_compile", lambda x, backend: False)
    modules = dict(hf_state_dict=hf.state_dict(), compiled_sublayers=False)
    fp32 = megatron_model.build_gpt_model(hf.config, **modules)
    bf16 = megatron_model.build_gpt_model(hf.config, params_dtype=torch.bfloat16, **modules)
    _, want = grads_of(fp32, 200)
    _, module_grads = grads_of(bf16, 200)

    def worst(grads):
        return max(float((grads[n] - w).norm() / w.norm()) for n, w in want.items() if w.norm() > 0)

    assert compiled_grads.keys() == want.keys()
    assert worst(compiled_grads) < max(3e-2, 2 * worst(module_grads)), (worst(compiled_grads), worst(module_grads))


@pytest.mark.parametrize(
    "case, overrides, expected",
    [
        ("forward pre-hook on linear_qkv", {}, {"attention": 0, "mlp": 2}),
        ("selective recompute of core attention", dict(recompute_granularity="selective"), {"attention": 0, "mlp": 2}),
        ("hidden dropout", dict(hidden_dropout=0.1), {"attention": 0, "mlp": 0}),
    ],
)
def test_route_falls_back_where_the_module_path_does_something_else(case, overrides, expected):
    """Hooks the route would skip, recompute it would drop, dropout it does not compute."""
    hf = build_tiny_qwen3(seed=9)
    model = megatron_model.build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), **overrides).eval()
    calls = []
    if case.startswith("forward pre-hook"):
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.register_forward_pre_hook(lambda module, args: calls.append(module))
    micro = pack_thd([torch.randint(1, 128, (n,)) for n in (6, 11)], [1, 1])
    counts, patches = _counting()
    with patches[0], patches[1], torch.no_grad():
        megatron_forward(model)(micro)
    assert counts == expected, case
    if calls:
        assert len(calls) == len(model.decoder.layers)  # the hooks ran: the module path was taken
