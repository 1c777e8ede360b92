"""Fused RMSNorm / SwiGLU / RoPE and the fused layer spec against float64 formulas and megatron's stock modules."""

from __future__ import annotations

import pytest
import torch

from rlkit.parallel.layouts import pack_thd
from rlkit.parallel.megatron.fused import (
    apply_rotary,
    apply_rotary_reference,
    packed_positions,
    rms_norm,
    rms_norm_rotary,
    swiglu,
)


def _rope_angles(positions: torch.Tensor, dim: int, theta: float = 1e4) -> torch.Tensor:
    """Megatron's ``freqs`` layout ``cat(f, f)``: angle of channel j at position p = p * theta^(-2 (j mod D/2) / D)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    f = positions.double()[:, None] * inv_freq[None]
    return torch.cat((f, f), dim=-1)


def test_packed_positions_hand_worked_and_equal_pack_thd():
    # Sequences of 3, 2 and 4 tokens: positions restart at every start (0, 3, 5).
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert packed_positions(cu, 9).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    # An empty sequence in the middle and a trailing padding sequence, as pack_thd writes them.
    micro = pack_thd([torch.arange(1, 8), torch.arange(1, 3), torch.arange(1, 12)], [1, 1, 1], total_multiple=8)
    assert torch.equal(packed_positions(micro.cu_seqlens, micro.input_ids.numel()), micro.position_ids)
    assert packed_positions(torch.tensor([0, 2, 2, 4]), 4).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_float64_formula(dtype):
    x = torch.randn(37, 64, dtype=torch.float64) * 3
    w = 1 + 0.1 * torch.randn(64, dtype=torch.float64)
    want = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    got = rms_norm(x.to(dtype), w.to(dtype), 1e-6)
    assert got.dtype == dtype
    # fp32: a few ulps; bf16: inputs and output rounded to 8 bits (2^-8 relative, twice) plus the weight product.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)


def test_rms_norm_gradients_equal_torch_rmsnorm_in_float32():
    """Same value and input/weight gradients as ``torch.nn.RMSNorm`` (megatron's ``WrappedTorchNorm``)."""
    x = torch.randn(2, 9, 4, 32, requires_grad=True)
    norm = torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    w = norm.weight.detach().clone().requires_grad_(True)
    g = torch.randn(2, 9, 4, 32)
    want = torch.autograd.grad(norm(x), (x, norm.weight), g)
    out = rms_norm(x, w, 1e-6)
    got = torch.autograd.grad(out, (x, w), g)
    torch.testing.assert_close(out, norm(x), rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_float64_and_its_gradient():
    x = torch.randn(11, 2 * 24, dtype=torch.float64)
    gate, up = x[:, :24], x[:, 24:]
    want = gate / (1 + torch.exp(-gate)) * up  # silu(g) = g * sigmoid(g)
    torch.testing.assert_close(swiglu(x), want, rtol=1e-12, atol=1e-12)
    # d/dg [g s(g) u] = u s (1 + g (1 - s)); d/du = g s.
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(swiglu(xr).sum(), xr)
    s = torch.sigmoid(gate)
    torch.testing.assert_close(grad, torch.cat((up * s * (1 + gate * (1 - s)), gate * s), -1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="even last dim"):
        swiglu(torch.randn(3, 5))


def test_rotary_is_a_complex_rotation_per_channel_pair():
    """Independent reference: pair (x_j, x_{j+D/2}) as x_j + i x_{j+D/2}, multiplied by exp(i angle_j)."""
    seq, heads, dim = 13, 3, 16
    x = torch.randn(seq, heads, dim, dtype=torch.float64)
    angles = _rope_angles(torch.arange(seq), dim)[:, None, :]  # [T, 1, D]
    z = torch.complex(x[..., : dim // 2], x[..., dim // 2 :]) * torch.exp(1j * angles[..., : dim // 2])
    want = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(apply_rotary(x, angles), want, rtol=1e-12, atol=1e-12)
    # Position 0 is the identity; a rotation keeps each pair's norm.
    torch.testing.assert_close(apply_rotary(x, angles)[0], x[0])
    # The backward is the inverse rotation: <rope(x), g> = <x, rope^T(g)> with rope^T = rope(-angles).
    xr = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (grad,) = torch.autograd.grad((apply_rotary(xr, angles) * g).sum(), xr)
    torch.testing.assert_close(grad, apply_rotary_reference(g, -angles), rtol=1e-12, atol=1e-12)


def test_rms_norm_rotary_is_norm_then_rotation():
    """The fused QK-norm + RoPE equals the float64 norm followed by the complex rotation."""
    x = torch.randn(9, 1, 4, 16, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(16, dtype=torch.float64)
    angles = _rope_angles(torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0]), 16)[:, None, None, :]
    normed = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    z = torch.complex(normed[..., :8], normed[..., 8:]) * torch.exp(1j * angles[..., :8])
    want = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(rms_norm_rotary(x, w, 1e-6, angles), want, rtol=1e-12, atol=1e-12)


def test_fused_functions_refuse_bad_input():
    with pytest.raises(ValueError, match="even head dim"):
        apply_rotary(torch.randn(4, 2, 5), torch.zeros(4, 1, 5))
    with pytest.raises(ValueError, match="size-1 head dim"):
        apply_rotary(torch.randn(4, 2, 8), torch.zeros(4, 2, 8))
    with pytest.raises(ValueError, match="backend='triton'"):
        rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6, backend="triton")


# --------------------------------------------------------------------------------------------------
# The fused spec inside megatron-core's GPTModel vs the stock local spec (megatron's own modules)
# --------------------------------------------------------------------------------------------------


def _stock_and_fused_models(hf, **overrides):
    """Two GPTModels with the same weights: megatron's local modules (reference) and the fused spec."""
    from megatron.core.models.gpt import GPTModel

    from rlkit.ckpt.convert import Layout, padded_vocab_size
    from rlkit.parallel.megatron.model import _rope_theta, build_gpt_model, transformer_config_from_hf
    from rlkit.parallel.megatron.spec import gpt_layer_spec

    fused = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), **overrides)
    cfg = hf.config.to_dict()
    stock = GPTModel(
        config=transformer_config_from_hf(cfg, **overrides),
        transformer_layer_spec=gpt_layer_spec(fused=False),
        vocab_size=padded_vocab_size(cfg["vocab_size"], Layout()),
        max_sequence_length=cfg["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=_rope_theta(cfg),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
    )
    # Same parameter names: the fused modules keep the stock state dict.
    stock.load_state_dict(fused.state_dict(), strict=True)
    return stock, fused


def _logits_and_grads(model, forward, micro):
    model.zero_grad(set_to_none=True)
    logits = forward(micro)
    (logits.float().square().mean() + logits.float()[..., 1:7].sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize(("layout", "qk_norm"), [("thd", "fused"), ("bshd", "fused"), ("thd", "torch")])
def test_fused_spec_equals_stock_local_spec(layout, qk_norm):
    """Logits and every parameter gradient of the fused spec == megatron's local spec (fp32, same weights).

    ``qk_norm="torch"`` swaps the QK norms back to ``torch.nn.RMSNorm``: RoPE then runs in
    ``RotarySelfAttention.get_query_key_value_tensors`` instead of inside the norm kernel.
    """
    pytest.importorskip("megatron.core")
    from rlkit.models.tiny import build_tiny_qwen3
    from rlkit.parallel.layouts import pack_bshd
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.spec import FusedRMSNorm, fused_mlp_class, rotary_self_attention_class

    hf = build_tiny_qwen3(seed=4)
    stock, fused = _stock_and_fused_models(hf)
    layer = fused.decoder.layers[0]
    assert isinstance(layer.input_layernorm, FusedRMSNorm)
    assert isinstance(layer.self_attention.k_layernorm, FusedRMSNorm)
    assert isinstance(layer.self_attention, rotary_self_attention_class())
    assert isinstance(layer.mlp, fused_mlp_class())
    assert type(stock.decoder.layers[0].input_layernorm) is torch.nn.RMSNorm
    if qk_norm == "torch":
        for fused_layer, stock_layer in zip(fused.decoder.layers, stock.decoder.layers, strict=True):
            for name in ("q_layernorm", "k_layernorm"):
                norm = getattr(stock_layer.self_attention, name)
                setattr(fused_layer.self_attention, name, type(norm)(norm.weight.shape, eps=norm.eps))
                getattr(fused_layer.self_attention, name).load_state_dict(norm.state_dict())

    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(1, 128, (n,), generator=g) for n in (7, 23, 2, 12)]
    pack = pack_thd if layout == "thd" else pack_bshd
    micro = pack(samples, [1] * len(samples))
    want_logits, want_grads = _logits_and_grads(stock, megatron_forward(stock), micro)
    got_logits, got_grads = _logits_and_grads(fused, megatron_forward(fused), micro)
    # fp32, same formulas in a different operation order: a few ulps of O(1) values.
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=2e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.usefixtures("megatron_world")
def test_rotary_attention_falls_back_to_megatron_for_interleaved_rope():
    """A RoPE variant the fused path does not implement runs megatron's own code: same logits as the stock spec."""
    from rlkit.models.tiny import build_tiny_qwen3
    from rlkit.parallel.megatron.forward import megatron_forward

    hf = build_tiny_qwen3(seed=2)
    stock, fused = _stock_and_fused_models(hf, rotary_interleaved=True)
    micro = pack_thd([torch.arange(1, 10), torch.arange(3, 20)], [1, 1])
    with torch.no_grad():
        want, got = megatron_forward(stock)(micro), megatron_forward(fused)(micro)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_fused_rms_norm_module_marks_sequence_parallel_weights():
    """megatron's norm convention: under SP the weight is flagged so its gradient is summed over TP."""
    from types import SimpleNamespace

    from rlkit.parallel.megatron.spec import FusedRMSNorm

    base = dict(normalization="RMSNorm", layernorm_zero_centered_gamma=False, params_dtype=torch.float32)
    assert FusedRMSNorm(SimpleNamespace(**base, sequence_parallel=True), 8).weight.sequence_parallel
    assert not FusedRMSNorm(SimpleNamespace(**base, sequence_parallel=False), 8).weight.sequence_parallel
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        FusedRMSNorm(SimpleNamespace(**base | dict(layernorm_zero_centered_gamma=True), sequence_parallel=False), 8)
    with pytest.raises(ValueError, match="normalization='RMSNorm'"):
        FusedRMSNorm(SimpleNamespace(**base | dict(normalization="LayerNorm"), sequence_parallel=False), 8)


# --------------------------------------------------------------------------------------------------
# GPU: the torch.compile kernels against the eager reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_compiled_kernels_match_reference_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    report = []
    for num_tokens in (1000, 1537):  # a second length must reuse the kernels (dynamic token dim)
        cases = {
            "rms_norm_hidden": (lambda x, w, b: rms_norm(x, w, 1e-6, backend=b), (num_tokens, 1, 512), 512),
            "rms_norm_head": (lambda x, w, b: rms_norm(x, w, 1e-6, backend=b), (num_tokens, 1, 8, 128), 128),
            "swiglu": (lambda x, w, b: swiglu(x, backend=b), (num_tokens, 1, 2 * 384), None),
        }
        angles = _rope_angles(torch.arange(num_tokens) % 300, 128, 1e6).float().cuda()[:, None, None, :]
        cases["rope"] = (lambda x, w, b, a=angles: apply_rotary(x, a, backend=b), (num_tokens, 1, 8, 128), None)
        cases["qk_norm_rope"] = (
            lambda x, w, b, a=angles: rms_norm_rotary(x, w, 1e-6, a, backend=b),
            (num_tokens, 1, 16, 128),
            128,
        )
        for name, (fn, shape, wdim) in cases.items():
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = None if wdim is None else (1 + 0.1 * torch.randn(wdim, device="cuda")).bfloat16().requires_grad_(True)
            inputs = (x,) if w is None else (x, w)
            g = torch.randn(fn(x, w, "torch").shape, device="cuda", dtype=torch.bfloat16)
            outs = {}
            for backend in ("torch", "compile"):
                out = fn(x, w, backend)
                outs[backend] = (out, *torch.autograd.grad(out, inputs, g))
            for part, (ref, got) in enumerate(zip(outs["torch"], outs["compile"], strict=True)):
                diff = (got.float() - ref.float()).abs()
                report.append(f"{name} T={num_tokens} {part}: max {diff.max():.2e} mean {diff.mean():.2e}")
                # Both round once from float32; the compiled kernel may sum in another order: 1-2 bf16 ulps,
                # and the weight gradient sums T rows (relative to its own scale).
                scale = ref.float().abs().max().item()
                assert diff.max() <= 2e-2 * max(scale, 1.0), report[-1]
    print("\n".join(report))


@pytest.mark.slow
def test_compiled_kernels_reuse_one_graph_per_feature_width():
    """torch.compile path on the CPU (Inductor C++): new token counts reuse the graph; each width has its own.

    The marks of ``fused._rows_dynamic`` are set on a signature's first call only; this checks that the
    later, unmarked calls still hit the symbolic-token graph (no recompile) and match the reference.
    """
    from torch._dynamo.utils import counters

    from rlkit.parallel.megatron import fused

    torch._dynamo.reset()
    fused._STEERED.clear()  # forget earlier first calls too, so this test's first call steers its compile
    before = counters["stats"]["unique_graphs"]
    # Forward graphs only (no_grad) to keep the CPU compile time down; the backward graph inherits the symbols.
    with torch.no_grad():
        for width in (64, 32):
            w = 1 + torch.rand(width)
            for num_tokens in (10, 17, 33):
                x = torch.randn(num_tokens, 1, width)
                got = rms_norm(x, w, 1e-6, backend="compile")
                torch.testing.assert_close(got, rms_norm(x, w, 1e-6, backend="torch"))
    assert counters["stats"]["unique_graphs"] - before == 2  # one per width, whatever the token count
