"""Grouped-GEMM experts under megatron-core's DDP, and the strided weight stack against ``torch.stack``.

Review of the grouped experts becoming the MoE default (544575c..1f6bc01). The DDP tests build megatron's
``DistributedDataParallel`` on one gloo rank, its CUDA-only buffer allocations sent to the CPU; the reference is
megatron's own per-expert ``SequentialMLP`` loop (``build_gpt_model(grouped_experts=False)``).
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch

from rlkit.parallel.megatron import grouped_experts

VOCAB = 128


def _problem():
    """The tiny Qwen3-MoE (8 experts, 2 layers), a packed micro-batch of 3 samples and an upstream logit gradient."""
    from rlkit.models.tiny import build_tiny_qwen3_moe
    from rlkit.parallel.layouts import pack_thd

    hf = build_tiny_qwen3_moe(seed=3)
    g = torch.Generator().manual_seed(0)
    micro = pack_thd([torch.randint(1, VOCAB, (n,), generator=g) for n in (11, 4, 17)], [1, 1, 1])
    upstream = torch.randn(micro.input_ids.shape[0], VOCAB, generator=g)
    return hf, micro, upstream


@pytest.fixture(scope="module")
def moe(megatron_world):
    """:func:`_problem` and the loop model's parameter gradients (megatron's ``SequentialMLP``, one process)."""
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model

    hf, micro, upstream = _problem()
    loop = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), grouped_experts=False)
    (megatron_forward(loop)(micro).float()[:, :VOCAB] * upstream).sum().backward()
    loop_grads = {name: p.grad.clone() for name, p in loop.named_parameters()}
    return hf, micro, upstream, loop_grads


def _grouped_model(hf):
    from rlkit.parallel.megatron.model import build_gpt_model

    return build_gpt_model(hf.config, hf_state_dict=hf.state_dict())  # grouped experts, packed: the default


def _megatron_ddp(model, set_attribute=setattr, **ddp_fields):
    """megatron's DDP around ``model`` on the CPU (its buffers are allocated on ``torch.cuda.current_device()``).

    ``set_attribute`` patches megatron's module-level ``torch``: ``monkeypatch.setattr`` in this process, plain
    ``setattr`` in a spawned rank (which exits after the test).
    """
    import megatron.core.distributed.distributed_data_parallel as ddp_module
    import megatron.core.distributed.param_and_grad_buffer as buffer_module
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from rlkit.parallel.megatron.distributed import _CpuTorch

    set_attribute(buffer_module, "torch", _CpuTorch())
    set_attribute(ddp_module, "torch", _CpuTorch())
    config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=False, **ddp_fields)
    return DistributedDataParallel(config=model.config, ddp_config=config, module=model)


def _expert_layers(model):
    return [layer.mlp.experts for layer in model.decoder.layers]


def _counted(calls, fn, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("use_distributed_optimizer", [False, True])
def test_megatron_ddp_main_grads_equal_the_loop(moe, monkeypatch, use_distributed_optimizer):
    """DDP's grad hooks see the per-expert gradients of the grouped GEMM: ``main_grad`` == the loop's ``.grad``.

    Without the distributed optimizer the packed weights stay a strided view; with it DDP re-points them into its
    parameter buffer (experts interleaved with each other's fc2, in reverse order) and the module stacks a copy.
    """
    from rlkit.parallel.megatron.forward import megatron_forward

    hf, micro, upstream, loop_grads = moe
    ddp = _megatron_ddp(_grouped_model(hf), monkeypatch.setattr, use_distributed_optimizer=use_distributed_optimizer)
    fc1 = [expert.linear_fc1.weight for expert in _expert_layers(ddp.module)[0].local_experts]
    is_view = grouped_experts._stacked(fc1).data_ptr() == fc1[0].data_ptr()
    assert is_view != use_distributed_optimizer
    calls = []
    counted = functools.partial(_counted, calls, grouped_experts.grouped_swiglu_experts)
    ddp.zero_grad_buffer()
    with mock.patch.object(grouped_experts, "grouped_swiglu_experts", counted):
        logits = megatron_forward(ddp)(micro)
    (logits.float()[:, :VOCAB] * upstream).sum().backward()
    ddp.finish_grad_sync()
    assert len(calls) == len(ddp.module.decoder.layers)  # the grouped path ran
    for name, param in ddp.module.named_parameters():
        want = loop_grads[name]
        # float32, the expert sums in another order: ~1e-7 of each gradient's own scale
        torch.testing.assert_close(param.main_grad, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)


def _ep2_ddp_worker(rank: int, results, loop_grads) -> None:
    import re

    from megatron.core import parallel_state

    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel

    init_model_parallel(expert_model_parallel_size=2)  # 4 local experts per rank; DP2 for the dense weights
    hf, micro, upstream = _problem()
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    ddp = _megatron_ddp(model)  # this process only: plain setattr
    ddp.zero_grad_buffer()
    (megatron_forward(ddp)(micro).float()[:, :VOCAB] * upstream).sum().backward()
    ddp.finish_grad_sync()
    per_rank = _expert_layers(model)[0].num_local_experts
    errors = {}
    for name, param in ddp.module.named_parameters():
        local = re.fullmatch(r"(.*local_experts\.)(\d+)(\..*)", name)
        global_name = f"{local[1]}{rank * per_rank + int(local[2])}{local[3]}" if local else name
        # both ranks feed the same micro-batch: every gradient is twice the one-process one (DDP sums over DP;
        # each expert sees both ranks' tokens through the allgather dispatcher)
        want = 2 * loop_grads[global_name]
        errors[name] = float((param.main_grad - want).abs().max() / want.abs().max().clamp_min(1e-30))
    parallel_state.destroy_model_parallel()
    # TP2 + SP with expert TP 1 (slime's --expert-tensor-parallel-size 1): the experts are whole on each TP rank, so
    # the grouped path runs (the TP2 MoE case of test_megatron_mp_step has expert TP 2, where it falls back)
    init_model_parallel(tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    grads, calls = {}, []
    counted = functools.partial(_counted, calls, grouped_experts.grouped_swiglu_experts)
    for grouped in (False, True):
        model = build_gpt_model(
            hf.config, hf_state_dict=hf.state_dict(), sequence_parallel=True, grouped_experts=grouped
        )
        with mock.patch.object(grouped_experts, "grouped_swiglu_experts", counted):
            logits = megatron_forward(model)(micro).float()  # this rank's vocabulary columns
        upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(rank))
        (logits * upstream).sum().backward()
        grads[grouped] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == len(model.decoder.layers), calls  # only the grouped model's layers, each once
    assert grads[True].keys() == grads[False].keys()
    for name, want in grads[False].items():
        error = float((grads[True][name] - want).abs().max() / want.abs().max().clamp_min(1e-30))
        errors[f"tp2 etp1: {name}"] = error
    results[rank] = errors
    parallel_state.destroy_model_parallel()


def test_two_ranks_ep2_ddp_and_tp2_etp1_equal_the_loop(moe):
    """2 gloo ranks. EP2 under megatron's DDP: each rank's ``main_grad`` == twice the one-process loop's ``.grad``.

    Then TP2 + SP with expert TP 1: the grouped model's gradients == the loop model's on each rank.
    """
    from gloo_ranks import run_on_gloo_ranks

    _, _, _, loop_grads = moe
    results = run_on_gloo_ranks(_ep2_ddp_worker, 2, loop_grads)
    for rank, errors in sorted(results.items()):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (rank, worst, errors[worst])  # float32, sums in another order: <1e-6


def test_overlap_param_gather_waits_for_the_expert_weights(moe, monkeypatch):
    """With ``overlap_param_gather`` every bucket's all-gather is waited on before its weights are read."""
    from rlkit.parallel.megatron.forward import megatron_forward

    hf, micro, _, _ = moe
    # small buckets, so that expert weights sit in buckets of their own (as in any real-size model)
    ddp = _megatron_ddp(
        _grouped_model(hf),
        monkeypatch.setattr,
        use_distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        bucket_size=1000,
    )
    groups = ddp.bucket_groups + ddp.expert_parallel_bucket_groups
    ddp.start_param_sync()  # what DistributedOptimizer.step does at the end of a step
    assert all(group.param_gather_handle is not None for group in groups)
    megatron_forward(ddp)(micro)
    pending = [
        name
        for group in groups
        if group.param_gather_handle is not None
        for bucket in group.buckets
        for name, param in ddp.module.named_parameters()
        if param in bucket.params
    ]
    assert not pending, f"all-gathers never waited on before the forward read these weights: {pending[:4]}"


@pytest.mark.parametrize("use_distributed_optimizer", [False, True])
def test_no_stacked_copy_of_the_expert_weights_outlives_the_forward(moe, monkeypatch, use_distributed_optimizer):
    """What autograd keeps of the expert weights for the backward shares their storage (no per-layer copy)."""
    from rlkit.parallel.megatron.forward import megatron_forward

    hf, micro, _, _ = moe
    ddp = _megatron_ddp(_grouped_model(hf), monkeypatch.setattr, use_distributed_optimizer=use_distributed_optimizer)
    layers = _expert_layers(ddp.module)
    stacked_shapes = {
        (len(layer.local_experts), *getattr(layer.local_experts[0], linear).weight.shape)
        for layer in layers
        for linear in ("linear_fc1", "linear_fc2")
    }
    weight_storages = {
        getattr(expert, linear).weight.untyped_storage().data_ptr()
        for layer in layers
        for expert in layer.local_experts
        for linear in ("linear_fc1", "linear_fc2")
    }
    saved = []

    def pack(tensor):
        if tuple(tensor.shape) in stacked_shapes:
            saved.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        megatron_forward(ddp)(micro)
    copies = [ptr for ptr in saved if ptr not in weight_storages]
    assert not copies, f"{len(copies)} stacked copies of expert weights kept for the backward"


def _layouts():
    """``name -> (E per-expert [N, K] tensors, expect a view)``: the layouts ``_stacked`` may meet."""
    n, k, e = 6, 4, 5
    size = n * k
    buffer = torch.arange(3 * e * size, dtype=torch.float32)

    def views(flat, starts):
        return [flat[s : s + size].view(n, k) for s in starts]

    return {
        "evenly spaced": (views(buffer, [i * size for i in range(e)]), True),
        "evenly spaced at an offset": (views(buffer, [7 + i * size for i in range(e)]), True),
        "exactly fills its storage": (views(buffer, [len(buffer) - (e - i) * size for i in range(e)]), True),
        "reversed (DDP's order)": (views(buffer, [(e - 1 - i) * size for i in range(e)]), False),
        "interleaved with another weight (fc1, fc2, ...)": (views(buffer, [2 * i * size for i in range(e)]), False),
        "overlapping": (views(buffer, [i * (size - 1) for i in range(e)]), False),
        "one repeated": ([buffer[:size].view(n, k)] * e, False),
        "transposed": ([t.t() for t in views(buffer, [i * size for i in range(e)])], False),
        "separate allocations": ([torch.randn(n, k) for _ in range(e)], False),
        "empty": ([buffer[:0].view(0, k) for _ in range(e)], True),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_strided_stack_equals_torch_stack(layout):
    """``_stacked`` gives ``torch.stack``'s values in expert order; a view only where they lie evenly spaced."""
    weights, expect_view = _layouts()[layout]
    got = grouped_experts._stacked(weights)
    torch.testing.assert_close(got, torch.stack(weights), rtol=0, atol=0)
    if got.numel():
        assert (got.data_ptr() == weights[0].data_ptr()) == expect_view


def test_load_state_dict_keeps_the_packed_layout(moe):
    """``load_state_dict`` after ``build_gpt_model`` copies into the packed buffer: still a view, the new values."""
    hf, _, _, _ = moe
    model = _grouped_model(hf)
    new = {name: torch.randn_like(t) if torch.is_tensor(t) else t for name, t in model.state_dict().items()}
    model.load_state_dict(new)
    for layer in _expert_layers(model):
        for linear in ("linear_fc1", "linear_fc2"):
            weights = [getattr(expert, linear).weight for expert in layer.local_experts]
            stacked = grouped_experts._stacked(weights)
            assert stacked.data_ptr() == weights[0].data_ptr()
            torch.testing.assert_close(stacked, torch.stack([w.detach().clone() for w in weights]), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor):
            torch.testing.assert_close(tensor, new[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("counts", [[0, 0, 0], [3, 0], [0, 3], [9], [8, 8]], ids=str)
@pytest.mark.parametrize("save_stacked_copy", [False, True])
def test_edge_counts_equal_the_float64_loop(counts, save_stacked_copy):
    """No tokens at all (an EP rank whose experts got none), an empty last or first expert, one expert, full groups.

    Per-expert weights packed in one buffer as ``build_gpt_model`` lays them out, ``save_stacked_copy`` as the
    module passes it; values and gradients against the float64 per-expert loop.
    """
    g = torch.Generator().manual_seed(1)
    experts, tokens, hidden, width = len(counts), sum(counts), 16, 8
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    probs = torch.rand(tokens, generator=g, requires_grad=True)
    fc1 = torch.randn(experts, 2 * width, hidden, generator=g) / 4
    fc2 = torch.randn(experts, hidden, width, generator=g) / 4
    w1 = [torch.nn.Parameter(w) for w in fc1.clone().unbind(0)]  # views of one buffer: the packed layout
    w2 = [torch.nn.Parameter(w) for w in fc2.clone().unbind(0)]
    out = grouped_experts.grouped_swiglu_experts(
        x, torch.tensor(counts), probs, w1, w2, save_stacked_copy=save_stacked_copy
    )
    upstream = torch.randn(tokens, hidden, generator=g)
    grads = torch.autograd.grad((out * upstream).sum(), [x, probs, *w1, *w2], allow_unused=True)
    ref = [t.detach().double().requires_grad_() for t in (x, probs, fc1, fc2)]
    want = grouped_experts.swiglu_experts_reference(ref[0], counts, ref[1], ref[2], ref[3])
    want_grads = torch.autograd.grad((want * upstream.double()).sum(), ref, allow_unused=True)
    assert out.shape == (tokens, hidden)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    got = [grads[0], grads[1], torch.stack(grads[2 : 2 + experts]), torch.stack(grads[2 + experts :])]
    for name, g_got, g_want in zip(("x", "probs", "fc1", "fc2"), got, want_grads, strict=True):
        g_want = torch.zeros_like(g_got, dtype=torch.float64) if g_want is None else g_want  # no tokens: no graph
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-6, msg=name)
