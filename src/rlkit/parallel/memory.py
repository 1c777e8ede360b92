"""Per-GPU and per-node memory of a :class:`~rlkit.parallel.plan.ParallelPlan`, term by term.

Bytes-per-parameter assumptions (BF16 mixed precision, Adam), all overridable in :class:`Precision`:

- weights: 2 B (bf16 model parameters, kept whole on every rank of a TP/EP shard);
- reference: with a KL loss on the GPU, a frozen copy of the weights in the same layout (2 B; rlkit's recipes
  keep it there; slime instead swaps the reference weights in from host memory for its log-prob pass);
- gradients: 2 B, or 4 B with ``--accumulate-allreduce-grads-in-fp32`` (megatron's ``main_grad``
  buffer is full size even with the distributed optimizer, which reduce-scatters into it);
- optimizer: fp32 master weight + ``exp_avg`` + ``exp_avg_sq`` = 12 B (less with the precision-aware
  optimizer's ``main_params_dtype`` / ``exp_avg_dtype`` / ``exp_avg_sq_dtype``), sharded over the DP x CP
  group for dense parameters and over the EDP group for expert parameters by the distributed
  optimizer (ZeRO-1). With ``--optimizer-cpu-offload`` they move to host memory;
- host, CPU Adam: the same optimizer bytes plus a 4 B fp32 gradient staging copy (``--overlap-cpu-optimizer-
  d2h-h2d`` copies grads down and params up) = 16 B per parameter shard.

Activations per token per layer (bytes), for two backends:

- ``megatron``: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), eq. 1-4: ``s*b*h*(34 + 5*a*s/h)`` for a GPT layer. With flash
  attention the ``5*a*s/h`` score term is not stored; the ``34h`` generalises to SwiGLU/GQA/MLA as
  ``2*(2h [norm inputs] + h [QKV input] + q + k + v [attention inputs] + o [projection input]
  + h [MLP input] + 2F [fc1 out] + F [act out])`` with dropout 0 (no masks). With sequence
  parallelism every term is divided by TP; without it the ``4h`` norm/linear inputs are not.
  MoE layers replace ``3F`` with ``top_k*(ETP*h + 3*Fe)`` (permuted tokens, replicated over the
  ETP ranks of an expert; expert fc1 and act outputs) plus the shared experts ``3*Fe*n_shared``, all
  divided by TP: with SP a GPU dispatches ``T/TP`` tokens and, routing being balanced on average,
  its experts receive on average ``T/TP * top_k`` slots' worth of ``3*Fe``-wide work (ETP splits each
  slot's width but lets ETP times as many slots in).
  For MLA, q/k/v are counted at their up-projected widths (the small latents are not).
  Full recompute keeps only the layer input ``2h`` (Korthikanti eq. 5)
  and re-materialises one layer during backward. A 1F1B pipeline stage ``p`` holds ``pp - p``
  micro-batches in flight; with VPP ``v`` this grows by ``1 + (pp-1)/(pp*v)`` (Korthikanti sec. 4.2.3).
- ``hf``: eager HF ``transformers`` Qwen3/Llama layers with SDPA (flash) on GPU, counted from the
  tensors autograd saves: each RMSNorm saves an fp32 copy of its input, the bf16 normalised value
  and its output (``8h``); q/k head norms plus RoPE keep ``8`` B per q/k element (RoPE saves only
  cos/sin); the flash kernel keeps q, k, v (unrepeated, native GQA), its output (which the
  o-projection reuses) and an fp32 log-sum-exp; SwiGLU keeps gate, up, SiLU(gate) and their
  product (``8F``). Gradient checkpointing keeps the ``2h`` layer input per layer. The test
  ``test_hf_activation_formula_matches_saved_tensors`` checks this count on CPU with a kernel
  that saves exactly what flash attention saves.

Logits: ``tokens x padded_vocab/TP x 4 B`` (fp32 logits for log-probs and entropy) on the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlkit.models.presets import ModelSpec
from rlkit.parallel.plan import ParallelPlan

GIB = 1024**3
Backend = Literal["megatron", "hf"]


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per parameter or activation element (see the module docstring)."""

    weight: int = 2
    grad: int = 2
    grad_fp32: int = 4
    grad_staging: int = 4
    """fp32 gradient copy on the host for CPU Adam (added to the optimizer state bytes)."""
    activation: int = 2
    logits: int = 4


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Memory of one GPU in pipeline stage ``stage`` (bytes)."""

    stage: int
    dense_params: int
    expert_params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    activations_no_recompute: int
    logits: int
    host_optimizer: int
    reference: int = 0

    @property
    def total(self) -> int:
        """GPU bytes: weights + reference + grads + optimizer + activations + logits."""
        return self.weights + self.reference + self.grads + self.optimizer + self.activations + self.logits


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Per-stage GPU memory and per-node host memory of a plan."""

    stages: list[StageMemory]
    host_per_node: int
    gpus_per_node: int
    assumptions: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        """The stage with the largest GPU total."""
        return max(self.stages, key=lambda s: s.total)

    def table(self, *, gpu_gib: float = 80.0) -> str:
        """A text table of every term per stage, against ``gpu_gib`` of GPU memory."""
        with_reference = any(s.reference for s in self.stages)
        head = (
            f"{'stage':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'act':>8} {'act(no rc)':>10} "
            f"{'logits':>8}"
            + (f" {'ref':>8}" if with_reference else "")
            + f" {'total':>8}  GiB (capacity {gpu_gib:.0f})"
        )
        rows = [head]
        for s in self.stages:
            terms = [s.weights, s.grads, s.optimizer, s.activations, s.activations_no_recompute, s.logits]
            terms += [s.reference, s.total] if with_reference else [s.total]
            rows.append(
                f"{s.stage:>5} "
                + " ".join(f"{t / GIB:>{10 if i == 4 else 8}.2f}" for i, t in enumerate(terms))
                + ("  OVER" if s.total > gpu_gib * GIB else "")
            )
        if self.host_per_node:
            rows.append(
                f"host memory per node ({self.gpus_per_node} GPUs) for CPU Adam: {self.host_per_node / GIB:.0f} GiB"
            )
        return "\n".join(rows)


def activation_bytes_per_token_layer(
    model: ModelSpec,
    layer: int,
    *,
    tp: int = 1,
    etp: int = 1,
    sp: bool = False,
    backend: Backend = "megatron",
    act_bytes: int = 2,
) -> float:
    """Activation bytes stored for backward per token by decoder layer ``layer`` (no recompute).

    See the module docstring for the derivation of each backend's formula. ``act_bytes`` applies to the
    ``megatron`` formula; the ``hf`` one counts the bytes of the (bf16 and fp32) tensors autograd saves.
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    if backend == "hf":
        if model.is_moe_layer(layer) or model.is_mla:
            raise ValueError("the 'hf' activation formula covers dense GQA layers (Qwen3/Llama) only")
        nh, nkv, d = model.num_attention_heads, model.num_kv_heads, model.head_dim
        norms = 2 * 8 * h + 4 * 2
        # q/k: fp32 head-norm input (4) + normalised bf16 (2) + RoPE output (2); v (2); kernel output
        # (2, which the o-projection reuses: SDPA returns a transposed view of a BSHD buffer, so
        # HF's transpose(1, 2).contiguous() copies nothing) + fp32 log-sum-exp per head; fp32 rsqrt
        # per head-norm row (4).
        attention = 8 * (nh + nkv) * d + 2 * nkv * d + 2 * nh * d + 4 * nh + 4 * (nh + nkv)
        return float(norms + attention + 8 * f)
    linear_inputs = 4 * h  # two norm inputs, QKV input, MLP input
    attention = model.q_width + model.kv_width + model.attn_out_width
    if model.is_moe_layer(layer):
        k, fe = model.moe_top_k, model.moe_ffn_hidden_size
        mlp = k * h * etp + 3 * k * fe + 3 * model.num_shared_experts * fe
    else:
        mlp = 3 * f
    sharded = attention + mlp
    unsharded = linear_inputs / tp if sp else linear_inputs
    return act_bytes * (unsharded + sharded / tp)


def _stage_params(plan: ParallelPlan, model: ModelSpec, stage: range, index: int, include_mtp: bool) -> tuple[int, int]:
    """(dense, expert) parameters held by one GPU of a stage."""
    padded = plan.padded_vocab_size(model.vocab_size)
    dense = sum(model.layer_dense_params(i) for i in stage)
    expert = sum(model.layer_expert_params(i) for i in stage)
    last = index == plan.pp - 1
    if index == 0:
        dense += model.embedding_params(padded)
    if last:
        dense += model.output_params(padded)
        if model.tie_embeddings and plan.pp > 1:
            dense += model.embedding_params(padded)  # megatron keeps a synced copy on the last stage
        if include_mtp and model.mtp_num_layers:
            mtp = model.mtp_num_layers
            expert += mtp * model.layer_expert_params(model.num_layers - 1)
            dense += mtp * (model.mtp_params() - model.layer_expert_params(model.num_layers - 1))
    # TP shards every dense matrix; norms and routers are replicated but are < 0.1% of a layer.
    return -(-dense // plan.tp), -(-expert // (plan.ep * plan.expert_tp))


def estimate_memory(
    plan: ParallelPlan,
    model: ModelSpec,
    world_size: int,
    *,
    gpus_per_node: int = 8,
    backend: Backend = "megatron",
    include_mtp: bool = False,
    precision: Precision | None = None,
    reference_model: bool = False,
) -> MemoryEstimate:
    """Estimate GPU memory per pipeline stage and host memory per node for CPU Adam.

    Args:
        plan: the layout; validated against ``model`` and ``world_size`` first.
        model: architecture numbers.
        world_size: total training GPUs.
        gpus_per_node: GPUs sharing one host (for the host-memory total).
        backend: which activation formula applies (``megatron`` or ``hf``).
        include_mtp: whether MTP modules are trained (placed on the last stage).
        precision: bytes-per-element assumptions.
        reference_model: a frozen reference model of the KL loss in the same layout on the GPU (rlkit's
            recipes build one for a non-zero ``--kl-loss-coef``).

    Returns:
        A :class:`MemoryEstimate`; every term is bytes per GPU.
    """
    p = precision or Precision()
    plan.validate(model, world_size)
    dp, edp = plan.dp(world_size), (plan.edp(world_size) if model.is_moe else 1)
    dense_shards = dp * plan.cp if plan.use_distributed_optimizer else 1
    expert_shards = edp if plan.use_distributed_optimizer else 1
    grad_bytes = p.grad_fp32 if plan.accumulate_allreduce_grads_in_fp32 else p.grad
    optimizer_bytes = plan.optimizer_bytes_per_param()
    host_bytes = optimizer_bytes + p.grad_staging
    tokens = plan.max_tokens_per_gpu
    stages = []
    for index, layers in enumerate(plan.layer_map(model.num_layers)):
        dense, expert = _stage_params(plan, model, layers, index, include_mtp)
        optimizer_params = dense / dense_shards + expert / expert_shards
        in_flight = plan.pp - index
        if plan.vpp is not None:
            # Korthikanti et al. sec. 4.2.3: interleaving raises the first stage's activation memory by
            # 1 + (pp - 1) / (pp * vpp); applied to every stage as an upper bound.
            in_flight *= 1 + (plan.pp - 1) / (plan.pp * plan.vpp)
        per_layer = [
            activation_bytes_per_token_layer(
                model, i, tp=plan.tp, etp=plan.expert_tp, sp=plan.sp, backend=backend, act_bytes=p.activation
            )
            for i in layers
        ]
        full = sum(per_layer) * tokens * in_flight
        if plan.recompute == "full":
            # the hf formula is a byte count of bf16 autograd tensors, so it ignores Precision.activation
            kept = (2 if backend == "hf" else p.activation) * model.hidden_size / (plan.tp if plan.sp else 1)
            activations = kept * tokens * len(layers) * in_flight + max(per_layer, default=0) * tokens
        else:
            activations = full
        last = index == plan.pp - 1
        logits = tokens * plan.padded_vocab_size(model.vocab_size) // plan.tp * p.logits if last else 0
        stages.append(
            StageMemory(
                stage=index,
                dense_params=dense,
                expert_params=expert,
                weights=(dense + expert) * p.weight,
                grads=(dense + expert) * grad_bytes,
                optimizer=0 if plan.optimizer_cpu_offload else int(optimizer_params * optimizer_bytes),
                activations=int(activations),
                activations_no_recompute=int(full),
                logits=logits,
                host_optimizer=int(optimizer_params * host_bytes) if plan.optimizer_cpu_offload else 0,
                reference=(dense + expert) * p.weight if reference_model else 0,
            )
        )
    assumptions = [
        f"bytes/param: weights {p.weight}, grads {grad_bytes}, optimizer {optimizer_bytes} "
        f"(sharded over dp*cp={dense_shards} dense, edp={expert_shards} experts), host CPU Adam "
        f"{host_bytes}",
        f"activations: {backend} formula, {tokens} tokens/GPU, 1F1B in-flight pp-p",
    ]
    host = max(s.host_optimizer for s in stages) * gpus_per_node
    return MemoryEstimate(stages=stages, host_per_node=host, gpus_per_node=gpus_per_node, assumptions=assumptions)


def suggestions(
    estimate: MemoryEstimate, plan: ParallelPlan, *, gpu_gib: float = 80.0, host_gib_per_node: float | None = None
) -> list[str]:
    """What to change when the worst stage does not fit ``gpu_gib`` (or the host cannot hold CPU Adam)."""
    out: list[str] = []
    worst = estimate.worst
    if worst.total > gpu_gib * GIB:
        over = (worst.total - gpu_gib * GIB) / GIB
        out.append(f"stage {worst.stage} needs {worst.total / GIB:.1f} GiB > {gpu_gib:.0f} GiB (over by {over:.1f})")
        if not plan.optimizer_cpu_offload and worst.optimizer:
            out.append(f"CPU Adam (--optimizer-cpu-offload) frees {worst.optimizer / GIB:.1f} GiB of optimizer state")
        if plan.recompute != "full":
            out.append(
                "--recompute-granularity full keeps only layer inputs "
                f"(activations {worst.activations / GIB:.1f} GiB now)"
            )
        if worst.activations + worst.logits > over * GIB:
            factor = over * GIB / max(worst.activations + worst.logits, 1)
            out.append(f"a smaller --max-tokens-per-gpu (about {int(plan.max_tokens_per_gpu * (1 - factor))})")
        out.append("more pipeline/expert parallelism (pp, ep) to shard weights and gradients")
    if host_gib_per_node is not None and estimate.host_per_node > host_gib_per_node * GIB:
        out.append(
            f"CPU Adam needs {estimate.host_per_node / GIB:.0f} GiB host memory per node > "
            f"{host_gib_per_node:.0f} GiB; add nodes (more dp/ep sharding) or drop CPU Adam"
        )
    return out
