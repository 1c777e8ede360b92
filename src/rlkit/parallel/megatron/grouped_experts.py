"""Routed experts as two grouped GEMMs (``torch._grouped_mm``) instead of megatron-core's per-expert loop.

:func:`rlkit.parallel.megatron.spec.gpt_layer_spec` uses it for MoE layers by default (``grouped_experts=True``).
Measured on an H100 (RESULTS.md): one EP8 rank of Qwen3-30B-A3B (16 experts, hidden 2048, width 768, 8K routed
tokens, bf16, forward + backward) 2.2 ms against 10.7 ms for the loop (``benchmarks/grouped_experts.py``); a GRPO
step of 4 Qwen3-30B-A3B layers with all 128 experts on the GPU 6.5x the loop (``benchmarks/megatron_step.py``).

The technique
-------------
megatron-core's local spec runs a MoE layer's routed experts with ``SequentialMLP``: it splits the permuted
tokens by the tokens-per-expert counts on the host and launches three GEMMs per local expert on its slice. With
8-16 experts per GPU (the MoE seeds) that is 24-48 small GEMMs per layer, 384 at 128 experts. A grouped GEMM
does each projection of all experts in one kernel (``out[rows of e] = x[rows of e] @ W_e^T``), with the group
boundaries read on the device. (megatron's allgather token dispatcher, which rlkit uses, still moves the counts
to the host once per layer for its own permutation; the grouped experts add no host read of their own.)

Hopper's grouped GEMM loads through TMA, which needs every group's start row 16-byte aligned (8 rows in
bf16) for the weight gradient, where the token dimension is contracted group by group. The permuted tokens
are therefore copied into a buffer whose groups are padded to multiples of ``align`` rows with zeros (torchtitan
pads the same way); the buffer's size is a host-side bound, ``T + (align - 1) E`` rounded up, so no count is
read back, and the last group runs to its end (zero rows, zero output, zero gradient).

Shape legend: ``T`` routed token copies on this rank, ``H`` hidden size, ``F`` expert MLP width, ``E`` local
experts, ``R`` padded rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit._optional import require
from rlkit.parallel.megatron.distributed import forward_hooks_would_run


def swiglu_experts_reference(
    x: Tensor, tokens_per_expert: list[int], probs: Tensor, fc1_weight: Tensor, fc2_weight: Tensor
) -> Tensor:
    """Each expert's SwiGLU MLP on its contiguous slice of tokens, scaled by the routing probability.

    ``out[t] = (silu(x_t W1g_e^T) * (x_t W1u_e^T) * p_t) W2_e^T`` for the expert ``e`` owning row ``t``,
    in megatron-core's ``MLP`` order (activation in the input dtype, the probability applied after it and
    rounded back to that dtype).

    Args:
        x: ``[T, H]`` tokens sorted by expert.
        tokens_per_expert: ``E`` counts summing to ``T``.
        probs: ``[T]`` routing weights.
        fc1_weight: ``[E, 2F, H]``, gate rows first.
        fc2_weight: ``[E, H, F]``.

    Returns:
        ``[T, H]``, dtype of ``x``.
    """
    outs = []
    for e, (rows, p) in enumerate(zip(x.split(tokens_per_expert), probs.split(tokens_per_expert), strict=True)):
        gate, up = F.linear(rows, fc1_weight[e]).chunk(2, dim=-1)
        act = F.silu(gate) * up
        act = (act * p.unsqueeze(-1)).to(act.dtype)
        outs.append(F.linear(act, fc2_weight[e]))
    return torch.cat(outs) if outs else x.new_zeros(x.shape)


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ W_e^T`` for groups ending at ``offs``; gradients as grouped GEMMs too.

    The weights come either stacked (one ``[E, N, K]`` tensor) or one ``[N, K]`` tensor per expert (megatron's
    ``local_experts``). Per-expert weights are stacked for the GEMM. Where they lie evenly spaced in one storage
    (:func:`pack_local_expert_weights`) the stack is a strided view, kept for the backward at no cost. Otherwise
    it is a copy: kept only with ``save_stacked_copy`` (one more copy of the layer's expert weights alive until
    its backward: 4.5 GiB for 4 Qwen3-30B-A3B layers at EP1 without recompute), else stacked again in the
    backward (measured 16% of that step's time).
    """

    @staticmethod
    def forward(ctx, x: Tensor, offs: Tensor, save_stacked_copy: bool, *weights: Tensor) -> Tensor:
        stacked = _stacked(weights)
        keep = save_stacked_copy or stacked.data_ptr() == weights[0].data_ptr()  # a copy, or the weights' memory
        ctx.num_weights = len(weights)
        ctx.save_for_backward(x, offs, *((stacked,) if keep else weights))
        return _grouped_mm()(x, stacked.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, offs, *weights = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_mm()(grad, _stacked(weights), offs=offs)  # [R, N] x [E, N, K] -> [R, K]
        if any(ctx.needs_input_grad[3:]):
            grad_weight = _grouped_mm()(grad.t(), x, offs=offs)  # [N, R] x [R, K] per group -> [E, N, K]
            grad_weights = grad_weight.unbind(0) if ctx.num_weights > 1 else (grad_weight,)
        return grad_x, None, None, *(grad_weights or (None,) * ctx.num_weights)


def _stacked(weights: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """``[E, N, K]``: the one stacked tensor, a strided view of evenly spaced expert weights, or a stacked copy."""
    if len(weights) == 1 and weights[0].dim() == 3:
        return weights[0]
    first = weights[0]
    if first.is_contiguous() and all(w.shape == first.shape and w.dtype == first.dtype for w in weights):
        step = first.numel() * first.element_size()
        base = first.data_ptr()
        if all(w.is_contiguous() and w.data_ptr() == base + e * step for e, w in enumerate(weights)):
            offset = first.storage_offset()
            if first.untyped_storage().nbytes() >= (offset + len(weights) * first.numel()) * first.element_size():
                return first.as_strided((len(weights), *first.shape), (first.numel(), *first.stride()), offset)
    return torch.stack(weights)


def _grouped_mm():
    """``torch.nn.functional.grouped_mm`` (public from torch 2.10), else ``torch._grouped_mm`` (2.8-2.9)."""
    return getattr(F, "grouped_mm", None) or torch._grouped_mm


def grouped_mm_is_fast(device: torch.device) -> bool:
    """Whether ``device`` runs the grouped GEMM as one kernel without reading the group sizes on the host.

    NVIDIA CUDA from compute capability 9.0 (Hopper's grouped kernel; measured on H100). Ampere's is a per-group
    loop with a host read of the offsets (torch's fallback), no better than megatron's loop; ROCm is left to
    megatron's loop (not tested). On the CPU the same fallback is exact and is what the CPU tests exercise, so it
    counts as usable there.
    """
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if device.type == "cuda":
        # ROCm reports gfx9 as capability 9.x too; its grouped GEMM support is not what this checks.
        return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


def grouped_swiglu_experts(
    x: Tensor,
    tokens_per_expert: Tensor,
    probs: Tensor,
    fc1_weight: Tensor | Sequence[Tensor],
    fc2_weight: Tensor | Sequence[Tensor],
    *,
    save_stacked_copy: bool = False,
    align: int = 8,
) -> Tensor:
    """:func:`swiglu_experts_reference` as two grouped GEMMs on a group-padded copy of the tokens.

    Args:
        x, probs: as for the reference.
        fc1_weight, fc2_weight: as for the reference (``[E, 2F, H]``, ``[E, H, F]``), or a sequence of ``E``
            per-expert ``[2F, H]`` / ``[H, F]`` tensors, which then get their own gradients.
        save_stacked_copy: per-expert weights that are not evenly spaced in one buffer (see
            :func:`pack_local_expert_weights`): keep their stacked copy for the backward (faster; one copy of the
            expert weights alive until the backward) instead of stacking them again there. A stack that is a
            view of the weights is always kept.
        tokens_per_expert: ``[E]`` int counts (any device; never read on the host).
        align: rows each group is padded to (8: 16 bytes of bf16).

    Returns:
        ``[T, H]``, dtype of ``x``.
    """
    fc1 = (fc1_weight,) if torch.is_tensor(fc1_weight) else tuple(fc1_weight)
    fc2 = (fc2_weight,) if torch.is_tensor(fc2_weight) else tuple(fc2_weight)
    num_tokens, num_experts = x.shape[0], fc1[0].shape[0] if len(fc1) == 1 and fc1[0].dim() == 3 else len(fc1)
    device = x.device
    counts = tokens_per_expert.to(device=device, dtype=torch.long)
    padded = (counts + align - 1) // align * align
    padded_starts = torch.cumsum(padded, 0) - padded
    starts = torch.cumsum(counts, 0) - counts
    expert_of = torch.repeat_interleave(torch.arange(num_experts, device=device), counts, output_size=num_tokens)
    dest = torch.arange(num_tokens, device=device) - starts[expert_of] + padded_starts[expert_of]
    rows = -(-(num_tokens + (align - 1) * num_experts) // align) * align
    # Group ends; the last group runs to the buffer's end, so every row belongs to a group (a fill, no copy from host).
    offs = torch.cumsum(padded, 0).to(torch.int32)
    offs[-1] = rows
    x_rows = x.new_zeros(rows, x.shape[1]).index_copy(0, dest, x)
    p_rows = probs.new_zeros(rows).index_copy(0, dest, probs)
    gate, up = _GroupedLinear.apply(x_rows, offs, save_stacked_copy, *fc1).chunk(2, dim=-1)
    act = F.silu(gate) * up
    act = (act * p_rows.unsqueeze(-1)).to(act.dtype)
    return _GroupedLinear.apply(act, offs, save_stacked_copy, *fc2).index_select(0, dest)


@functools.cache
def grouped_sequential_mlp_class():
    """megatron-core's ``SequentialMLP`` computing with :func:`grouped_swiglu_experts` (lazy: needs megatron)."""
    experts = require("megatron.core.transformer.moe.experts", purpose="grouped experts")

    class GroupedSequentialMLP(experts.SequentialMLP):
        """``SequentialMLP`` (same experts, parameters and names) whose forward is two grouped GEMMs.

        Falls back to the parent's loop for what it does not cover: expert tensor parallelism, biases,
        activations other than SwiGLU, probabilities applied on the input, FP8, float64 (on CUDA anything but
        bf16), GPUs before Hopper (:func:`grouped_mm_is_fast`), widths not a multiple of 8, and forward hooks on
        the expert modules (megatron DDP's ``overlap_param_gather``).
        """

        def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor):
            """As ``SequentialMLP.forward``: ``([T, H], None)``."""
            if not self._grouped_ok(permuted_local_hidden_states):
                return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
            fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
            fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
            if not torch.is_tensor(tokens_per_expert):
                tokens_per_expert = torch.tensor(tokens_per_expert)
            if tokens_per_expert.device.type == "cpu":  # megatron's allgather dispatcher: free to check here
                total = int(tokens_per_expert.sum())
                if total != permuted_local_hidden_states.shape[0]:
                    raise ValueError(
                        f"tokens_per_expert sums to {total} but {permuted_local_hidden_states.shape[0]} permuted "
                        "tokens were dispatched to this rank's experts"
                    )
            # Weights re-pointed out of pack_local_expert_weights' layout (megatron's DistributedOptimizer buffer:
            # experts interleaved in reverse) are stacked as a copy. Under full uniform recompute only the layers
            # being recomputed hold saved tensors, so keeping that copy costs little memory and saves a re-stack.
            recomputed = self.config.recompute_granularity == "full" and self.config.recompute_method == "uniform"
            out = grouped_swiglu_experts(
                permuted_local_hidden_states,
                tokens_per_expert,
                permuted_probs,
                fc1,
                fc2,
                save_stacked_copy=recomputed,
            )
            return out, None

        def _grouped_ok(self, x: Tensor) -> bool:
            config, first = self.config, self.local_experts[0]
            return (
                grouped_mm_is_fast(x.device)
                # CUDA's one-kernel grouped GEMM is bf16 only (other dtypes: torch's per-group loop with a host read)
                and x.dtype in ((torch.bfloat16,) if x.is_cuda else (torch.float32, torch.bfloat16, torch.float16))
                and self.num_local_experts > 1
                and self.tp_group.size() == 1
                and not (config.fp8 or getattr(config, "fp4", None))
                and not config.moe_apply_probs_on_input
                and config.gated_linear_unit
                and first.activation_func is F.silu
                and config.activation_func_clamp_value is None
                and config.glu_linear_offset == 0
                and getattr(first.linear_fc1, "bias", None) is None
                and getattr(first.linear_fc2, "bias", None) is None
                and x.dim() == 2
                and x.shape[1] % 8 == 0
                and config.moe_ffn_hidden_size % 8 == 0
                # last, it walks every expert module: a hook on a skipped module would not run (megatron DDP's
                # overlap_param_gather waits for the parameter all-gather in a forward pre-hook; FSDP and
                # offloading hook modules too)
                and not forward_hooks_would_run(self.local_experts.modules())
            )

    return GroupedSequentialMLP


def pack_local_expert_weights(model: torch.nn.Module) -> int:
    """Lay each grouped-expert layer's ``fc1`` and ``fc2`` weights out as one ``[E, N, K]`` buffer each.

    The parameters stay separate ``Parameter`` objects with their names (checkpoints, optimizers and megatron's
    DDP see no difference); only their storage becomes consecutive slices of one buffer, so the grouped GEMM
    reads them as a strided view instead of stacking a copy every forward. Call it after the model is on its
    device and before any wrapper re-points parameter storage (``model.to`` to another device undoes it, which
    is still correct, only slower).

    Returns:
        The number of expert layers packed.
    """
    grouped_class = grouped_sequential_mlp_class()
    packed = 0
    for module in model.modules():
        if not isinstance(module, grouped_class) or module.num_local_experts < 2:
            continue
        for linear in ("linear_fc1", "linear_fc2"):
            weights = [getattr(expert, linear).weight for expert in module.local_experts]
            buffer = torch.stack([w.detach() for w in weights])
            for weight, part in zip(weights, buffer.unbind(0), strict=True):
                weight.data = part
        packed += 1
    return packed


def with_grouped_experts(layer_spec):
    """``layer_spec`` (a MoE layer's ``ModuleSpec``) with its routed experts as :func:`grouped_sequential_mlp_class`."""
    experts = layer_spec.submodules.mlp.submodules.experts
    experts.module = grouped_sequential_mlp_class()
    return layer_spec
