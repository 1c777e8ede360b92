"""Grouped-GEMM routed experts: the per-expert loop's values and gradients, and megatron's model with them."""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch

from rlkit.parallel.megatron.grouped_experts import grouped_swiglu_experts, swiglu_experts_reference

COUNTS = [5, 0, 16, 3, 1]  # an empty expert, an aligned one, and groups that need padding


def _problem(dtype, *, hidden=16, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts, tokens = len(COUNTS), sum(COUNTS)
    x = torch.randn(tokens, hidden, generator=g)
    probs = torch.rand(tokens, generator=g)
    fc1 = torch.randn(experts, 2 * width, hidden, generator=g) / 4
    fc2 = torch.randn(experts, hidden, width, generator=g) / 4
    return [t.to(dtype) for t in (x, fc1, fc2)], probs


def _per_expert(weight, layout):
    """``[E, N, K]`` as E leaf tensors: separate allocations, or views evenly spaced in one buffer (DDP's layout)."""
    if layout == "separate":
        return [w.clone().requires_grad_() for w in weight.unbind(0)]
    buffer = torch.cat([weight.flatten(), weight.new_zeros(7)])  # room after the last expert, as in a grad buffer
    views = buffer[: weight.numel()].view(weight.shape).unbind(0)
    return [torch.nn.Parameter(v) for v in views]  # leaves that share the buffer's storage


@pytest.mark.parametrize("weights", ["stacked", "separate", "one buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_float64_loop(dtype, weights):
    (x, fc1, fc2), probs = _problem(dtype)
    inputs = [t.clone().requires_grad_() for t in (x, probs, fc1, fc2)]
    if weights == "stacked":
        got = grouped_swiglu_experts(inputs[0], torch.tensor(COUNTS), inputs[1], inputs[2], inputs[3])
        leaves = inputs
    else:
        w1, w2 = _per_expert(fc1, weights), _per_expert(fc2, weights)
        if weights == "one buffer":
            assert w1[1].data_ptr() == w1[0].data_ptr() + w1[0].numel() * w1[0].element_size()
        got = grouped_swiglu_experts(inputs[0], torch.tensor(COUNTS), inputs[1], w1, w2)
        leaves = [inputs[0], inputs[1], *w1, *w2]
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got, leaves, upstream.to(dtype))
    if weights != "stacked":
        experts = len(COUNTS)
        got_grads = [*got_grads[:2], torch.stack(got_grads[2 : 2 + experts]), torch.stack(got_grads[2 + experts :])]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = swiglu_experts_reference(ref_inputs[0], COUNTS, ref_inputs[1], ref_inputs[2], ref_inputs[3])
    want_grads = torch.autograd.grad(want, ref_inputs, upstream.double())
    # float32: the same sums in another order; bf16: rounded inputs, bf16 GEMM outputs and activation (~1e-2).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    for name, g_got, g_want in zip(("x", "probs", "fc1", "fc2"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_got.double(), g_want, **tol, msg=name)
    assert float(got_grads[2][1].abs().max()) == 0.0  # the empty expert's weights get no gradient


def test_per_expert_weights_are_not_kept_stacked_for_the_backward():
    """The backward re-stacks per-expert weights: no [E, N, K] copy outlives the forward (memory per MoE layer)."""
    (x, fc1, fc2), probs = _problem(torch.float32)
    w1, w2 = _per_expert(fc1, "separate"), _per_expert(fc2, "separate")
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grouped_swiglu_experts(x.requires_grad_(), torch.tensor(COUNTS), probs, w1, w2)
    assert tuple(fc1.shape) not in saved_shapes and tuple(fc2.shape) not in saved_shapes, saved_shapes
    assert tuple(w1[0].shape) in saved_shapes  # the experts' own weights are what the backward keeps
    out.sum().backward()
    grads = [w.grad.clone() for w in w1 + w2]
    # save_stacked_copy=True keeps the stacks instead, and the gradients are the same
    saved_shapes.clear()
    for w in w1 + w2:
        w.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grouped_swiglu_experts(x, torch.tensor(COUNTS), probs, w1, w2, save_stacked_copy=True)
    assert tuple(fc1.shape) in saved_shapes and tuple(fc2.shape) in saved_shapes, saved_shapes
    out.sum().backward()
    for w, want in zip(w1 + w2, grads, strict=True):
        torch.testing.assert_close(w.grad, want, rtol=0, atol=0)


def test_frozen_experts_get_no_weight_gradient_and_the_input_gradient_is_unchanged():
    (x, fc1, fc2), probs = _problem(torch.float32)
    x = x.requires_grad_()
    frozen = grouped_swiglu_experts(x, torch.tensor(COUNTS), probs, list(fc1.unbind(0)), list(fc2.unbind(0)))
    (grad_frozen,) = torch.autograd.grad(frozen.sum(), x)
    ref = [t.double().requires_grad_(t is x) for t in (x, probs, fc1, fc2)]
    want = swiglu_experts_reference(ref[0], COUNTS, ref[1], ref[2], ref[3])
    (grad_want,) = torch.autograd.grad(want.sum(), ref[0])
    torch.testing.assert_close(grad_frozen.double(), grad_want, rtol=1e-5, atol=1e-5)


def test_weights_evenly_spaced_in_one_buffer_are_stacked_without_a_copy():
    from rlkit.parallel.megatron.grouped_experts import _stacked

    (_, fc1, _), _ = _problem(torch.float32)
    in_buffer, separate = _per_expert(fc1, "one buffer"), _per_expert(fc1, "separate")
    view = _stacked(in_buffer)
    assert view.data_ptr() == in_buffer[0].data_ptr()  # a view of the buffer
    torch.testing.assert_close(view, fc1, rtol=0, atol=0)
    copy = _stacked(separate)
    assert copy.data_ptr() != separate[0].data_ptr()
    torch.testing.assert_close(copy, fc1, rtol=0, atol=0)
    # out of order in the buffer: no view can express it, so a copy in expert order
    reordered = [in_buffer[1], in_buffer[0], *in_buffer[2:]]
    torch.testing.assert_close(_stacked(reordered), fc1[[1, 0, *range(2, len(COUNTS))]], rtol=0, atol=0)


def test_qwen3_moe_with_grouped_experts_equals_the_loop_and_hf():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")
    from rlkit.models.tiny import build_tiny_qwen3_moe
    from rlkit.parallel.layouts import pack_thd
    from rlkit.parallel.megatron import grouped_experts
    from rlkit.parallel.megatron import model as megatron_model
    from rlkit.parallel.megatron.forward import megatron_forward

    megatron_model.init_model_parallel()
    try:
        hf = build_tiny_qwen3_moe(seed=3)
        loop = megatron_model.build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), grouped_experts=False)
        grouped = megatron_model.build_gpt_model(hf.config, hf_state_dict=hf.state_dict())  # the default
        assert type(grouped.decoder.layers[0].mlp.experts).__name__ == "GroupedSequentialMLP"
        assert type(loop.decoder.layers[0].mlp.experts).__name__ == "SequentialMLP"
        # build_gpt_model packs each layer's expert weights into one buffer: the grouped GEMM reads a view
        for layer in grouped.decoder.layers:
            for linear in ("linear_fc1", "linear_fc2"):
                weights = [getattr(expert, linear).weight for expert in layer.mlp.experts.local_experts]
                assert grouped_experts._stacked(weights).data_ptr() == weights[0].data_ptr(), linear
        samples = [torch.randint(1, 128, (n,)) for n in (11, 4, 17)]
        micro = pack_thd(samples, [1, 1, 1])
        upstream = torch.randn(micro.input_ids.shape[0], 128)
        calls = []
        counted = functools.partial(_counted, calls, grouped_experts.grouped_swiglu_experts)
        results = {}
        for name, model in (("loop", loop), ("grouped", grouped)):
            with mock.patch.object(grouped_experts, "grouped_swiglu_experts", counted):
                logits = megatron_forward(model)(micro)
            (logits.float()[:, :128] * upstream).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[name] = (logits.detach(), grads)
        assert len(calls) == len(grouped.decoder.layers)  # the grouped path ran, once per MoE layer
        (want_logits, want_grads), (got_logits, got_grads) = results["loop"], results["grouped"]
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            # float32, the expert sums in another order: ~1e-7 of each gradient's own scale (up to ~50 here)
            scale = float(grad.abs().max())
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
        with torch.no_grad():
            per_sample = micro.unpack_tokens(got_logits.T)
            for tokens, logits in zip(samples, per_sample, strict=True):
                want = hf.eval()(input_ids=tokens[None]).logits[0]
                torch.testing.assert_close(logits.T[:, : want.shape[-1]], want, rtol=1e-5, atol=2e-5)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_expert_counts_that_do_not_sum_to_the_tokens_are_refused():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")
    from rlkit.models.tiny import build_tiny_qwen3_moe
    from rlkit.parallel.megatron import model as megatron_model

    megatron_model.init_model_parallel()
    try:
        hf = build_tiny_qwen3_moe(seed=5)
        experts = megatron_model.build_gpt_model(hf.config, hf_state_dict=hf.state_dict()).decoder.layers[0].mlp.experts
        num = experts.num_local_experts
        x, probs = torch.randn(10, hf.config.hidden_size), torch.rand(10)
        with pytest.raises(ValueError, match="sums to 11 but 10 permuted tokens"):
            experts(x, torch.tensor([11] + [0] * (num - 1)), probs)
        out, _ = experts(x, torch.tensor([10] + [0] * (num - 1)), probs)  # the same call with matching counts
        assert out.shape == x.shape
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_packed_expert_weights_export_to_hf_safetensors_unchanged(tmp_path):
    """Packed experts are views of one buffer: the HF export and its safetensors shards still hold each expert."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")
    from rlkit.ckpt.convert import megatron_to_hf
    from rlkit.ckpt.hf import SafetensorsWriter, iter_safetensors
    from rlkit.models.tiny import build_tiny_qwen3_moe
    from rlkit.parallel.megatron import model as megatron_model

    megatron_model.init_model_parallel()
    try:
        hf = build_tiny_qwen3_moe(seed=5)
        model = megatron_model.build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
        config = hf.config.to_dict()
        exported = megatron_to_hf(
            {(0, 0, 0): model.state_dict()}, config, layout=megatron_model.megatron_layout(model.config)
        )
        storages = [t.untyped_storage().data_ptr() for t in exported.values()]
        assert len(set(storages)) < len(storages)  # the exported experts are views of the packed buffers
        writer = SafetensorsWriter(tmp_path, max_shard_bytes=1 << 16)  # several shards, experts split across them
        for name, tensor in exported.items():
            writer.add(name, tensor)
        writer.close()
        written = dict(iter_safetensors(tmp_path))
        want = megatron_to_hf(
            {(0, 0, 0): {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}},  # unpacked
            config,
            layout=megatron_model.megatron_layout(model.config),
        )
        assert written.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(written[name], tensor, rtol=0, atol=0, msg=name)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _counted(calls, fn, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


@pytest.mark.gpu
def test_grouped_experts_on_gpu_equal_the_loop():
    """bf16 on CUDA (Hopper's grouped GEMM): values and gradients against the float64 loop, groups of all sizes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(3)
    counts = [0, 1, 7, 8, 9, 130, 64, 33]
    hidden, width, tokens = 256, 128, sum(counts)
    x = torch.randn(tokens, hidden, generator=g)
    probs = torch.rand(tokens, generator=g)
    fc1 = torch.randn(len(counts), 2 * width, hidden, generator=g) / 16
    fc2 = torch.randn(len(counts), hidden, width, generator=g) / 16
    upstream = torch.randn(tokens, hidden, generator=g)
    inputs = [
        t.cuda().to(torch.bfloat16 if t is not probs else torch.float32).requires_grad_() for t in (x, probs, fc1, fc2)
    ]
    got = grouped_swiglu_experts(inputs[0], torch.tensor(counts, device="cuda"), inputs[1], inputs[2], inputs[3])
    got_grads = torch.autograd.grad(got, inputs, upstream.cuda().bfloat16())
    ref = [t.detach().double().cpu().requires_grad_() for t in inputs]
    want = swiglu_experts_reference(ref[0], counts, ref[1], ref[2], ref[3])
    want_grads = torch.autograd.grad(want, ref, upstream.double())
    for name, a, b in zip(("out", "x", "probs", "fc1", "fc2"), (got, *got_grads), (want, *want_grads), strict=True):
        rel = float((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30))
        print(f"{name}: relative error {rel:.2e}")
        assert rel < 2e-2, name  # bf16 inputs, GEMM outputs and activation: ~4e-3 per rounding
