"""ParallelPlan: validate and size a Megatron training layout before launching 64-128 GPUs.

A layout is the product of five axes over ``world`` GPUs. For attention and dense layers
megatron-core builds the grid ``TP x CP x DP x PP``; for the experts of MoE layers it re-folds the
same ranks into ``ETP x EP x EDP x PP`` (the "decoupled" expert grid of
``megatron.core.parallel_state.initialize_model_parallel``), so both products must equal the
world size while EP may span TP, CP and DP ranks. Pipeline stages take contiguous layer ranges,
optionally with a different count on the first/last stage (``--decoder-first/last-pipeline-num-
layers``) and split further into virtual stages (VPP). Everything here is arithmetic on a
:class:`~rlkit.models.presets.ModelSpec`: no process group, no GPU, milliseconds per plan.

CLI::

    python -m rlkit.parallel.plan --model glm4.5-355b --gpus 64 --tp 8 --pp 4 --cp 2 --ep 16 --etp 1 \
        --sp --recompute full --max-tokens-per-gpu 16384 --cpu-adam
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

from rlkit.models.presets import ModelSpec
from rlkit.parallel.packing import cp_sequence_multiple

Recompute = Literal["none", "selective", "full"]
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
Dispatcher = Literal["allgather", "alltoall", "flex"]


def padded_vocab_size(vocab_size: int, *, tp: int, divisible_by: int = 128) -> int:
    """Megatron's vocabulary padding, the one place rlkit computes it.

    The embedding and output layer are split over ``tp`` ranks in equal, aligned slices, so megatron
    pads the vocabulary (``megatron.training.tokenizer``'s ``_vocab_size_with_padding``) to

        ``padded = ceil(vocab_size / (divisible_by * tp)) * divisible_by * tp``

    e.g. Qwen3's 151936 at ``tp=8`` -> 152576 (= 149 * 1024). Checkpoint converters pad and strip
    embedding rows with this same number.

    Args:
        vocab_size: the tokenizer/HF ``vocab_size``.
        tp: tensor-parallel size.
        divisible_by: ``--make-vocab-size-divisible-by`` (megatron's default 128).

    Returns:
        The padded vocabulary size, ``>= vocab_size``.
    """
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(
            f"padded_vocab_size(vocab_size={vocab_size}, tp={tp}, divisible_by={divisible_by}): all must be >= 1"
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """A Megatron training layout; ``dp`` and ``edp`` are derived from the world size."""

    tp: int = 1
    """Tensor-parallel size (``--tensor-model-parallel-size``)."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size: each sequence is split over ``cp`` ranks."""
    ep: int = 1
    """Expert-parallel size: routed experts are partitioned over ``ep`` ranks."""
    etp: int | None = None
    """Expert tensor-parallel size; ``None`` means megatron's default (equal to ``tp``)."""
    sp: bool = False
    """Sequence parallelism (``--sequence-parallel``), shards norms/dropout over the TP group."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); ``None`` disables."""
    decoder_first_pipeline_num_layers: int | None = None
    """Layers of the first pipeline stage when it differs from the even split (e.g. to make room for embeddings)."""
    decoder_last_pipeline_num_layers: int | None = None
    """Layers of the last pipeline stage when it differs (it also holds the output layer and the loss)."""
    recompute: Recompute = "none"
    """``full`` = ``--recompute-granularity full --recompute-method uniform --recompute-num-layers 1``."""
    max_tokens_per_gpu: int = 8192
    """Dynamic-batch budget per GPU; a CP group shares ``cp * max_tokens_per_gpu`` tokens."""
    use_distributed_optimizer: bool = True
    """``--use-distributed-optimizer``: optimizer state sharded over the DP ranks (ZeRO-1)."""
    optimizer_cpu_offload: bool = False
    """CPU Adam (``--optimizer-cpu-offload``): master weights and moments live in host memory."""
    use_precision_aware_optimizer: bool = False
    """``--use-precision-aware-optimizer``: allows optimizer state in lower precision (the ``*_dtype`` fields)."""
    accumulate_allreduce_grads_in_fp32: bool = False
    """Main gradients (and their all-reduce) in fp32 instead of the parameter dtype."""
    moe_token_dispatcher_type: Dispatcher = "alltoall"
    """How tokens reach their experts' ranks (``--moe-token-dispatcher-type``)."""
    moe_enable_deepep: bool = False
    """DeepEP all-to-all kernels; needs the ``flex`` dispatcher."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocab to a multiple of this times ``tp`` (see :func:`padded_vocab_size`)."""
    main_params_dtype: Literal["fp32", "fp16"] = "fp32"
    """Master-weight dtype; anything but fp32 needs ``use_precision_aware_optimizer``."""
    exp_avg_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = "fp32"
    """Adam first-moment dtype (``--exp-avg-dtype``); non-fp32 needs the precision-aware optimizer."""
    exp_avg_sq_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = "fp32"
    """Adam second-moment dtype (``--exp-avg-sq-dtype``); non-fp32 needs the precision-aware optimizer."""

    def optimizer_bytes_per_param(self) -> int:
        """Bytes of Adam state per parameter: master weight + first + second moment."""
        return sum(DTYPE_BYTES[d] for d in (self.main_params_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype))

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "max_tokens_per_gpu", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelPlan.{name}={getattr(self, name)} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"ParallelPlan.etp={self.etp} must be >= 1 (or None for etp = tp)")
        if self.sp and self.tp == 1:
            raise ValueError(
                "ParallelPlan.sp=True needs tp > 1 (sequence parallelism shards over the TP group); "
                "set sp=False or tp >= 2"
            )
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(
                f"ParallelPlan.vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp}); use vpp=None otherwise"
            )
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            value = getattr(self, name)
            if value is not None and (value < 1 or self.pp == 1):
                raise ValueError(f"ParallelPlan.{name}={value} needs pp > 1 (pp={self.pp}) and a positive count")
        if self.moe_enable_deepep and self.moe_token_dispatcher_type != "flex":
            raise ValueError(
                f"moe_enable_deepep=True needs moe_token_dispatcher_type='flex' "
                f"(got {self.moe_token_dispatcher_type!r}); megatron-core rejects DeepEP with other dispatchers"
            )
        if self.optimizer_cpu_offload and not self.use_distributed_optimizer:
            raise ValueError(
                "optimizer_cpu_offload=True needs use_distributed_optimizer=True "
                "(megatron's HybridDeviceOptimizer wraps the distributed optimizer)"
            )
        for name in ("main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
            if getattr(self, name) != "fp32" and not self.use_precision_aware_optimizer:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} needs use_precision_aware_optimizer=True "
                    "(--use-precision-aware-optimizer); megatron keeps fp32 optimizer state otherwise"
                )

    @property
    def expert_tp(self) -> int:
        """Effective expert tensor-parallel size (``etp`` or ``tp``)."""
        return self.tp if self.etp is None else self.etp

    # ---- validation against a model and a world size -----------------------------------------
    def dp(self, world_size: int) -> int:
        """Data-parallel size ``world / (tp*pp*cp)``; raises if it does not divide."""
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = "
                f"{model_parallel}; world = tp*pp*cp*dp must hold"
            )
        return world_size // model_parallel

    def edp(self, world_size: int) -> int:
        """Expert data-parallel size ``world / (etp*ep*pp)`` (megatron-core's decoupled expert grid)."""
        grid = self.expert_tp * self.ep * self.pp
        if world_size % grid:
            raise ValueError(
                f"expert grid etp*ep*pp = {self.expert_tp}*{self.ep}*{self.pp} = {grid} does not divide world size "
                f"{world_size}; megatron-core needs etp*ep*pp*edp = world (note etp defaults to tp={self.tp})"
            )
        return world_size // grid

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Vocab padded to a multiple of ``make_vocab_size_divisible_by * tp``; see :func:`padded_vocab_size`."""
        return padded_vocab_size(vocab_size, tp=self.tp, divisible_by=self.make_vocab_size_divisible_by)

    def validate(self, model: ModelSpec, world_size: int) -> list[str]:
        """Check every rule for ``model`` on ``world_size`` GPUs.

        Returns:
            Notes that are not errors (e.g. KV-head replication, vocab padding).

        Raises:
            ValueError: on the first broken rule, naming the numbers and a fix.
        """
        notes: list[str] = []
        dp = self.dp(world_size)
        heads, kv = model.num_attention_heads, model.num_kv_heads
        if heads % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide num_attention_heads={heads}; pick tp in "
                f"{[d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]}"
            )
        if kv % self.tp:
            if self.tp % kv:
                raise ValueError(
                    f"tp={self.tp} and num_kv_heads={kv}: tp must divide the KV heads or be a multiple "
                    "of them (KV replication)"
                )
            notes.append(f"tp={self.tp} > num_kv_heads={kv}: each KV head is replicated on {self.tp // kv} TP ranks")
        padded = self.padded_vocab_size(model.vocab_size)
        if padded != model.vocab_size:
            notes.append(
                f"vocab {model.vocab_size} padded to {padded} (multiple of "
                f"{self.make_vocab_size_divisible_by}*tp={self.make_vocab_size_divisible_by * self.tp})"
            )
        self.stage_layer_counts(model.num_layers)  # raises on a bad split
        if model.is_moe:
            self._validate_moe(model, world_size, dp, notes)
        elif self.ep > 1:
            raise ValueError(f"ep={self.ep} but {model.name} is dense (no experts); set ep=1")
        return notes

    def _validate_moe(self, model: ModelSpec, world_size: int, dp: int, notes: list[str]) -> None:
        edp = self.edp(world_size)
        if model.num_experts % self.ep:
            raise ValueError(
                f"ep={self.ep} does not divide num_experts={model.num_experts}; pick a divisor of {model.num_experts}"
            )
        if self.ep > 1 and self.tp > 1 and not self.sp:
            raise ValueError(
                f"ep={self.ep} with tp={self.tp} needs sp=True: megatron requires sequence "
                "parallelism when expert and tensor parallelism are combined"
            )
        if self.moe_token_dispatcher_type == "flex" and self.expert_tp * self.ep == 1:
            raise ValueError("moe_token_dispatcher_type='flex' needs etp*ep > 1; use 'alltoall' on a single rank")
        if self.moe_token_dispatcher_type == "allgather" and self.ep > 1:
            notes.append("allgather dispatcher with ep > 1 all-gathers every token; alltoall/flex scale better")
        if model.moe_ffn_hidden_size % self.expert_tp:
            raise ValueError(f"etp={self.expert_tp} does not divide moe_ffn_hidden_size={model.moe_ffn_hidden_size}")
        notes.append(
            f"dense grid tp{self.tp} x cp{self.cp} x dp{dp} x pp{self.pp}; expert grid etp{self.expert_tp} x "
            f"ep{self.ep} x edp{edp} x pp{self.pp} = {world_size}"
        )

    # ---- pipeline layer map -------------------------------------------------------------------
    def stage_layer_counts(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline stage, following megatron-core's uneven-split rule.

        With ``first``/``last`` set, those stages take that many layers and the remaining
        ``num_layers - first - last`` are split evenly over the middle stages, which must divide.

        Example (DeepSeek-V3, 61 layers, pp=4, last=13): ``(61-13)/3 = 16`` -> ``[16, 16, 16, 13]``.
        """
        first, last = self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        if self.pp == 1:
            return [num_layers]
        remaining, middle = num_layers, self.pp
        if first is not None:
            remaining, middle = remaining - first, middle - 1
        if last is not None:
            remaining, middle = remaining - last, middle - 1
        if remaining < 0 or (middle == 0 and remaining != 0):
            raise ValueError(
                f"decoder_first/last_pipeline_num_layers={first}/{last} do not fit num_layers="
                f"{num_layers} over pp={self.pp}"
            )
        if middle and remaining % middle:
            fix = (
                "set decoder_first_pipeline_num_layers/decoder_last_pipeline_num_layers"
                if first is None and last is None
                else "change the first/last counts"
            )
            raise ValueError(
                f"num_layers={num_layers} (minus first={first}, last={last}) leaves {remaining} layers "
                f"for {middle} stages, not divisible; {fix}"
            )
        each = remaining // middle if middle else 0
        counts = [each] * self.pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        if self.vpp is not None:
            for stage, count in enumerate(counts):
                if count % self.vpp:
                    raise ValueError(f"stage {stage} has {count} layers, not divisible by vpp={self.vpp}")
        return counts

    def layer_map(self, num_layers: int) -> list[range]:
        """Global (0-based) decoder-layer range owned by each pipeline stage."""
        ranges, start = [], 0
        for count in self.stage_layer_counts(num_layers):
            ranges.append(range(start, start + count))
            start += count
        return ranges

    def virtual_layer_map(self, num_layers: int) -> list[list[range]]:
        """Per stage, the layer ranges of its ``vpp`` model chunks, in interleaved order.

        Megatron interleaves chunks round-robin: chunk ``v`` of stage ``p`` holds the
        ``(v*pp + p)``-th block of ``L/(pp*vpp)`` layers. Only even splits are supported here.
        """
        if self.vpp is None:
            return [[r] for r in self.layer_map(num_layers)]
        blocks = self.pp * self.vpp
        if num_layers % blocks or self.decoder_first_pipeline_num_layers or self.decoder_last_pipeline_num_layers:
            raise ValueError(
                f"virtual_layer_map supports even splits only: num_layers={num_layers} over "
                f"pp*vpp={blocks}, no first/last overrides"
            )
        size = num_layers // blocks
        return [
            [range((v * self.pp + p) * size, (v * self.pp + p + 1) * size) for v in range(self.vpp)]
            for p in range(self.pp)
        ]

    # ---- experts ------------------------------------------------------------------------------
    def expert_map(self, num_experts: int) -> list[range]:
        """Global expert ids held by each EP rank (contiguous blocks, as megatron-core assigns them)."""
        if num_experts % self.ep:
            raise ValueError(f"ep={self.ep} does not divide num_experts={num_experts}")
        per_rank = num_experts // self.ep
        return [range(r * per_rank, (r + 1) * per_rank) for r in range(self.ep)]

    # ---- tokens -------------------------------------------------------------------------------
    def cp_padded_length(self, seq_len: int) -> int:
        """Sequence length padded to a multiple of ``2*cp`` (load-balanced causal CP uses 2*cp chunks)."""
        multiple = cp_sequence_multiple(self.cp)
        return -(-seq_len // multiple) * multiple

    def tokens_per_cp_group(self) -> int:
        """Dynamic-batch budget shared by one CP group: ``cp * max_tokens_per_gpu``."""
        return self.cp * self.max_tokens_per_gpu

    def check_sequence_fits(self, seq_len: int) -> None:
        """Raise if one sample of ``seq_len`` tokens (after CP padding) exceeds the CP group's budget.

        slime lets such a sample form its own micro-batch, which then overshoots the memory the
        budget was sized for; the plan reports it instead.
        """
        padded = self.cp_padded_length(seq_len)
        if padded > self.tokens_per_cp_group():
            raise ValueError(
                f"a {seq_len}-token sample (padded to {padded} for cp={self.cp}) exceeds the CP group "
                f"budget cp*max_tokens_per_gpu = {self.cp}*{self.max_tokens_per_gpu} = "
                f"{self.tokens_per_cp_group()}; raise max_tokens_per_gpu or cp"
            )

    # ---- megatron-core translation ------------------------------------------------------------
    def to_megatron(self, model: ModelSpec) -> dict[str, dict[str, Any]]:
        """Keyword arguments for megatron-core, built without importing it.

        Returns:
            ``{"initialize_model_parallel": {...}, "transformer_config": {...}}``: the first for
            ``megatron.core.parallel_state.initialize_model_parallel``, the second the parallelism
            and recompute fields of ``TransformerConfig`` (model fields come from the checkpoint bridge).
        """
        counts = self.stage_layer_counts(model.num_layers)
        init = dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.expert_tp,
        )
        config: dict[str, Any] = dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.expert_tp,
            sequence_parallel=self.sp,
            num_layers=model.num_layers,
            num_layers_in_first_pipeline_stage=self.decoder_first_pipeline_num_layers,
            num_layers_in_last_pipeline_stage=self.decoder_last_pipeline_num_layers,
            recompute_granularity=None if self.recompute == "none" else self.recompute,
            recompute_method="uniform" if self.recompute == "full" else None,
            recompute_num_layers=1 if self.recompute == "full" else None,
        )
        if model.is_moe:
            config.update(
                num_moe_experts=model.num_experts,
                moe_router_topk=model.moe_top_k,
                moe_token_dispatcher_type=self.moe_token_dispatcher_type,
                moe_enable_deepep=self.moe_enable_deepep,
            )
        assert sum(counts) == model.num_layers
        return {"initialize_model_parallel": init, "transformer_config": config}

    def megatron_flags(self) -> list[str]:
        """The matching Megatron-LM / slime command-line flags (PERF_ARGS and the optimizer switches)."""
        flags = [
            "--tensor-model-parallel-size",
            str(self.tp),
            "--pipeline-model-parallel-size",
            str(self.pp),
            "--context-parallel-size",
            str(self.cp),
            "--expert-model-parallel-size",
            str(self.ep),
            "--expert-tensor-parallel-size",
            str(self.expert_tp),
        ]
        if self.sp:
            flags.append("--sequence-parallel")
        if self.vpp is not None:
            flags += ["--num-virtual-stages-per-pipeline-rank", str(self.vpp)]
        if self.decoder_first_pipeline_num_layers is not None:
            flags += ["--decoder-first-pipeline-num-layers", str(self.decoder_first_pipeline_num_layers)]
        if self.decoder_last_pipeline_num_layers is not None:
            flags += ["--decoder-last-pipeline-num-layers", str(self.decoder_last_pipeline_num_layers)]
        if self.recompute == "full":
            flags += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
        elif self.recompute == "selective":
            flags += ["--recompute-granularity", "selective"]
        flags += ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(self.max_tokens_per_gpu)]
        if self.use_distributed_optimizer:
            flags.append("--use-distributed-optimizer")
        if self.optimizer_cpu_offload:
            flags += ["--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d"]
        if self.use_precision_aware_optimizer:
            flags.append("--use-precision-aware-optimizer")
            for name in ("main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
                if getattr(self, name) != "fp32":
                    flags += [f"--{name.replace('_', '-')}", getattr(self, name)]
        if self.accumulate_allreduce_grads_in_fp32:
            flags.append("--accumulate-allreduce-grads-in-fp32")
        flags += ["--moe-token-dispatcher-type", self.moe_token_dispatcher_type]
        if self.moe_enable_deepep:
            flags.append("--moe-enable-deepep")
        return flags


# ---- CLI ----------------------------------------------------------------------------------------------


def _ranges_short(ranges: list[range]) -> str:
    return " ".join(f"{r.start}-{r.stop - 1}({len(r)})" for r in ranges)


def describe(
    plan: ParallelPlan,
    model: ModelSpec,
    world_size: int,
    *,
    gpu_gib: float = 80.0,
    gpus_per_node: int = 8,
    host_gib_per_node: float | None = None,
    reference_model: bool = False,
) -> str:
    """Human-readable report: layout, layer/expert map, memory table and suggestions.

    ``reference_model``: count a frozen KL reference model on the GPU
    (see :func:`rlkit.parallel.memory.estimate_memory`).
    """
    from rlkit.parallel.memory import estimate_memory, suggestions

    notes = plan.validate(model, world_size)
    lines = [
        f"model {model.name}: {model.num_layers} layers, {model.num_params() / 1e9:.1f}B params "
        f"({model.num_active_params() / 1e9:.1f}B active)",
        f"world {world_size}: tp{plan.tp} pp{plan.pp} cp{plan.cp} dp{plan.dp(world_size)}"
        + (f" | ep{plan.ep} etp{plan.expert_tp} edp{plan.edp(world_size)}" if model.is_moe else ""),
        "layers per stage: " + _ranges_short(plan.layer_map(model.num_layers)),
    ]
    if model.is_moe:
        experts = plan.expert_map(model.num_experts)
        lines.append(
            f"experts per EP rank: {len(experts[0])} (rank 0: {experts[0].start}-{experts[0].stop - 1}, "
            f"rank {plan.ep - 1}: {experts[-1].start}-{experts[-1].stop - 1})"
        )
    lines += [f"note: {n}" for n in notes]
    estimate = estimate_memory(plan, model, world_size, gpus_per_node=gpus_per_node, reference_model=reference_model)
    lines.append(estimate.table(gpu_gib=gpu_gib))
    lines += [
        f"suggestion: {s}" for s in suggestions(estimate, plan, gpu_gib=gpu_gib, host_gib_per_node=host_gib_per_node)
    ]
    lines.append("flags: " + " ".join(plan.megatron_flags()))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlkit.parallel.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="preset name or path to an HF config.json / checkpoint dir")
    p.add_argument("--gpus", type=int, required=True)
    for axis in ("tp", "pp", "cp", "ep"):
        p.add_argument(f"--{axis}", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--first-stage-layers", type=int, default=None)
    p.add_argument("--last-stage-layers", type=int, default=None)
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="full")
    p.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    p.add_argument("--cpu-adam", action="store_true", help="--optimizer-cpu-offload")
    p.add_argument("--fp32-grads", action="store_true", help="--accumulate-allreduce-grads-in-fp32")
    p.add_argument("--dispatcher", choices=["allgather", "alltoall", "flex"], default="alltoall")
    p.add_argument("--deepep", action="store_true")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU capacity (H100 80 GB by default)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--host-gib", type=float, default=None, help="host memory per node, to check CPU Adam")
    p.add_argument("--kl-reference", action="store_true", help="a frozen KL reference model on the GPU too")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rlkit.parallel.plan``; returns 0 when the layout is valid."""
    from rlkit.models.presets import get_preset, spec_from_hf_config

    args = _parser().parse_args(argv)
    try:
        is_path = "/" in args.model or args.model.endswith(".json")
        model = spec_from_hf_config(args.model) if is_path else get_preset(args.model)
    except (KeyError, ValueError, OSError) as err:
        print(f"cannot load model {args.model!r}: {err}")
        return 2
    try:
        plan = ParallelPlan(
            tp=args.tp,
            pp=args.pp,
            cp=args.cp,
            ep=args.ep,
            etp=args.etp,
            vpp=args.vpp,
            sp=args.sp,
            decoder_first_pipeline_num_layers=args.first_stage_layers,
            decoder_last_pipeline_num_layers=args.last_stage_layers,
            recompute=args.recompute,
            max_tokens_per_gpu=args.max_tokens_per_gpu,
            optimizer_cpu_offload=args.cpu_adam,
            use_precision_aware_optimizer=args.cpu_adam,
            accumulate_allreduce_grads_in_fp32=args.fp32_grads,
            moe_token_dispatcher_type=args.dispatcher,
            moe_enable_deepep=args.deepep,
        )
        print(
            describe(
                plan,
                model,
                args.gpus,
                gpu_gib=args.gpu_gib,
                gpus_per_node=args.gpus_per_node,
                host_gib_per_node=args.host_gib,
                reference_model=args.kl_reference,
            )
        )
    except ValueError as err:
        print(f"invalid layout: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
