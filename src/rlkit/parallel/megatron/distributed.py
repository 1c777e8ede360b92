"""Gradient reduction, gradient norm and rank coordinates of a model-parallel megatron-core step.

How a sharded step adds up to the single-process one
----------------------------------------------------
rlkit's losses carry the *global* normalizer (``PackPlan.normalizer``), so the loss of a rank is its
share of the global loss and the global gradient is the **sum** of the ranks' gradients:

* **DP x CP**: every data-parallel rank takes its own micro-batches and every context-parallel rank its
  slice of each sequence; dense gradients are summed over the DP x CP group, expert gradients over the
  expert-DP group (megatron marks expert weights with ``allreduce = False``). megatron's DDP would
  *average* instead (it assumes a per-rank mean loss); this module sums.
* **TP**: parameters split over TP ranks (``tensor_model_parallel = True``) already hold their slice of the
  gradient. Replicated parameters whose input differs per TP rank hold partial sums and are summed over
  TP: norms and the router under sequence parallelism (``sequence_parallel = True``) and the per-head
  QK-norm weights (each TP rank sees other heads) - megatron's ``_allreduce_non_tensor_model_parallel_grads``.
* **PP with tied embeddings**: the last stage holds a copy of the word embedding as its output layer;
  both copies get the sum of their gradients over the embedding group (megatron's
  ``_allreduce_word_embedding_grads``), so they stay equal after the optimizer step.

The gradient norm counts each parameter once: TP duplicates only on TP rank 0 and the tied copy only on
the first stage (megatron's ``param_is_not_tensor_parallel_duplicate`` and ``param_is_not_shared``), the
squares summed over the model-parallel group (TP x PP) for dense and over the expert
tensor x model x pipeline group for expert parameters, as megatron's optimizers do.

CPU (gloo)
----------
megatron-core 0.16.1 allocates communication buffers with ``device=torch.cuda.current_device()`` (tensor-
and sequence-parallel mappings, pipeline p2p shapes) and a token counter on ``"cuda"`` inside its pipeline
schedules. :func:`apply_cpu_distributed_patches` points the ``torch`` name of exactly those modules at a
proxy whose ``cuda.current_device()`` is ``"cpu"`` and which maps ``device="cuda"`` to the CPU, so the
same megatron code runs under gloo for the CPU tests; nothing changes on a CUDA machine.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_CPU_PATCHED = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelContext:
    """This rank's coordinates in megatron's grid (all sizes 1 when megatron's groups do not exist).

    Attributes:
        tp_size / tp_rank: tensor parallel.
        pp_size / pp_rank: pipeline parallel.
        cp_size / cp_rank: context parallel.
        dp_size / dp_rank: data parallel (without CP).
        ep_size: expert parallel.
        sequence_parallel: megatron sequence parallelism is on (set by the caller from the model config).
    """

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    ep_size: int = 1
    sequence_parallel: bool = False

    @classmethod
    def current(cls, *, sequence_parallel: bool = False) -> ParallelContext:
        """Read the coordinates from megatron's parallel state (single process if it is not initialised)."""
        try:
            from megatron.core import parallel_state as ps
        except ImportError:
            return cls()
        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            sequence_parallel=sequence_parallel,
        )

    @property
    def is_parallel(self) -> bool:
        """More than one rank takes part in the step."""
        return self.tp_size * self.pp_size * self.cp_size * self.dp_size * self.ep_size > 1

    @property
    def is_last_stage(self) -> bool:
        """This rank computes the logits and the loss."""
        return self.pp_rank == self.pp_size - 1


def _groups():
    from megatron.core import parallel_state as ps

    return ps


def _is_expert(param: Tensor) -> bool:
    return not getattr(param, "allreduce", True)


def _sum_grads(params: Sequence[Tensor], group) -> None:
    """All-reduce (SUM) the ``.grad`` of ``params`` over ``group`` in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


def finalize_grads(model: torch.nn.Module) -> None:
    """Turn every rank's local gradients into its slice of the global-loss gradient (see module docstring).

    Args:
        model: this rank's megatron module, after the backward of all its micro-batches (``.grad`` set;
            parameters without a gradient, e.g. experts no token reached, get zeros so that every rank
            joins the same collectives).
    """
    ps = _groups()
    config = model.config
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    tp_partial = [
        p
        for n, p in named
        if (config.sequence_parallel and getattr(p, "sequence_parallel", False))
        or (config.qk_layernorm and ("q_layernorm" in n or "k_layernorm" in n))
    ]
    _sum_grads(tp_partial, ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1 and getattr(model, "share_embeddings_and_output_weights", False):
        if ps.is_rank_in_embedding_group():
            _sum_grads([model.shared_embedding_or_output_weight()], ps.get_embedding_group())
    _sum_grads([p for _, p in named if not _is_expert(p)], ps.get_data_parallel_group(with_context_parallel=True))
    _sum_grads([p for _, p in named if _is_expert(p)], ps.get_expert_data_parallel_group())


def grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """L2 norm of the full model's gradient, each parameter counted once over all ranks.

    Args:
        parameters: this rank's parameters (after :func:`finalize_grads`).

    Returns:
        0-dim float32 tensor, the same on every rank: ``sqrt(sum over unique params of ||grad||^2)``.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    ps = _groups()
    params = [p for p in parameters if p.grad is not None]
    # A rank without gradients still joins the all-reduces, on the device its backend needs (NCCL: CUDA).
    fallback = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    device = params[0].grad.device if params else fallback
    squares = torch.zeros(2, dtype=torch.float32, device=device)  # [dense, expert]
    for p in params:
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            # float32 accumulation: bf16 squares of many small entries lose the tail of the sum.
            squares[int(_is_expert(p))] += torch.linalg.vector_norm(p.grad.float()) ** 2
    dense, expert = squares[:1].clone(), squares[1:].clone()
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return torch.sqrt(dense + expert)[0]


def sum_metrics(totals: dict[str, float], ctx: ParallelContext) -> dict[str, float]:
    """Global-batch metrics: sum over DP x CP, then broadcast from the last pipeline stage.

    Args:
        totals: this rank's summed micro-batch metrics (empty on stages without the loss).
        ctx: this rank's coordinates.

    Returns:
        The same dict on every rank.
    """
    ps = _groups()
    if ctx.pp_size > 1:
        box = [totals]
        dist.broadcast_object_list(
            box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
        names = sorted(box[0])
        local = [totals.get(name, 0.0) if ctx.is_last_stage else 0.0 for name in names]
    else:
        names = sorted(totals)
        local = [totals[name] for name in names]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ctx.pp_size > 1:
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(names, values.tolist(), strict=True))


def max_over_data_parallel(values: Sequence[int]) -> list[int]:
    """Element-wise max of integer lists over the DP x CP group (equal-length micro-batches for EP)."""
    ps = _groups()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group(with_context_parallel=True))
    return [int(v) for v in t.tolist()]


# ---- megatron's DDP + DistributedOptimizer (CUDA) -------------------------------------------------------


def build_distributed_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    clip_grad: float | None = 1.0,
    optimizer_cpu_offload: bool = False,
    bucket_size: int | None = None,
):
    """Wrap this rank's model in megatron's DDP and build megatron's ``DistributedOptimizer`` (AdamW) over it.

    The optimizer state (fp32 master weights, Adam moments) is sharded over the DP ranks (ZeRO-1); gradients
    live in DDP's fp32 ``main_grad`` buffers and are reduce-scattered over DP. The model must be built with
    ``calculate_per_token_loss=True`` (:func:`rlkit.parallel.megatron.model.build_gpt_model` does): DDP then
    *sums* over DP instead of averaging, as rlkit's global-normalizer losses need. Pass both to
    :func:`rlkit.parallel.megatron.step.train_step`; ``optimizer.step()`` computes the global grad norm (each
    parameter once) and clips to ``clip_grad``.

    ``optimizer_cpu_offload`` (``--optimizer-cpu-offload``) is refused: megatron-core 0.16.1's
    ``HybridDeviceOptimizer`` (the host-side Adam behind it) did not reproduce the on-GPU ``DistributedOptimizer``
    step in rlkit's GPU test on an H100 with bfloat16 weights, and fails outright with float32 weights (its
    torch AdamW gets non-leaf views of the weights: "can't optimize a non-leaf Tensor"); its
    ``use_precision_aware_optimizer`` mode needs Transformer Engine (0.16.1's ``OptimizerConfig`` calls
    ``is_te_min_version``). :mod:`rlkit.parallel.memory` still sizes a CPU-Adam layout for planning.

    Args:
        model: this rank's megatron module (CUDA).
        lr: learning rate (constant; schedule it by writing ``param_group["lr"]``).
        weight_decay: decoupled (AdamW) weight decay.
        adam_betas: Adam ``(beta1, beta2)``.
        adam_eps: Adam epsilon.
        clip_grad: global grad-norm clip (``None``: no clipping).
        optimizer_cpu_offload: must be ``False`` (see above).
        bucket_size: DDP gradient bucket size in elements (``None``: megatron's default).

    Returns:
        ``(ddp_model, optimizer)``.

    Raises:
        ValueError: with ``optimizer_cpu_offload``, on CPU (0.16.1's optimizer checks ``param.type() ==
            "torch.cuda.*Tensor"``), or without ``calculate_per_token_loss``.
    """
    from rlkit._optional import require

    require("megatron.core.optimizer", purpose="megatron's DistributedOptimizer")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if optimizer_cpu_offload:
        raise ValueError(
            "optimizer_cpu_offload=True is not supported: megatron-core 0.16.1's HybridDeviceOptimizer did not "
            "reproduce the on-GPU DistributedOptimizer step in rlkit's GPU test (bf16 weights, H100) and rejects "
            "float32 weights; use the on-GPU distributed optimizer (optimizer_cpu_offload=False)"
        )
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise ValueError(
            "megatron's DistributedOptimizer needs the model on CUDA (megatron-core 0.16.1 checks for "
            "torch.cuda tensor types); on the CPU pass a torch.optim optimizer to train_step instead"
        )
    config = model.config
    if not config.calculate_per_token_loss:
        raise ValueError(
            "build the model with calculate_per_token_loss=True: otherwise megatron's DDP averages gradients "
            "over DP, while rlkit's losses carry the global normalizer and need the sum"
        )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=True,
        average_in_collective=False,
        bucket_size=bucket_size,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1],
        adam_eps=adam_eps,
        clip_grad=0.0 if clip_grad is None else float(clip_grad),
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=True,
    )
    return ddp_model, get_megatron_optimizer(optimizer_config, [ddp_model])


def is_megatron_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of megatron-core's (``MegatronOptimizer`` or its chained form)."""
    return type(optimizer).__module__.startswith("megatron.core.optimizer")


# ---- CPU: megatron-core's CUDA-only allocations -------------------------------------------------------


class _CpuCuda:
    """``torch.cuda`` as megatron's communication code sees it on a CPU-only machine."""

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cpu_device(kwargs: dict[str, Any]) -> dict[str, Any]:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = "cpu"
    return kwargs


class _CpuTorch(types.ModuleType):
    """``torch`` with ``cuda.current_device() == "cpu"`` and ``device="cuda"`` factories sent to the CPU."""

    cuda = _CpuCuda()

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "tensor", "full"):
            return lambda *args, **kwargs: value(*args, **_cpu_device(kwargs))
        return value


def apply_cpu_distributed_patches() -> None:
    """Let megatron-core's TP/SP mappings, MoE dispatch and pipeline schedules run under gloo (idempotent).

    Only the module-level ``torch`` name of the listed megatron modules changes; torch itself does not.
    Also skips the initial all-reduce that copies the word embedding to the last pipeline stage (megatron
    moves it to CUDA first): rlkit loads that copy from the checkpoint (the converter writes it).
    """
    global _CPU_PATCHED
    if _CPU_PATCHED or torch.cuda.is_available():
        return
    import importlib

    proxy = _CpuTorch()
    for name in (
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.utils",
    ):
        importlib.import_module(name).torch = proxy
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_without_initial_sync(self) -> None:
        # Upstream all-reduces the embedding copy after `weight.data.cuda()`; the checkpoint sets both copies.
        self._is_in_embd_group = lambda: False
        try:
            setup(self)
        finally:
            del self._is_in_embd_group

    LanguageModule.setup_embeddings_and_output_layer = setup_without_initial_sync
    # Sequence parallelism forks the CUDA RNG around the embedding dropout; rlkit trains without dropout,
    # so on the CPU the tracker is megatron's inference tracker, whose fork() is a no-op.
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _CPU_PATCHED = True


def forward_hooks_would_run(modules: Iterable[torch.nn.Module | None]) -> bool:
    """Whether a forward (pre-)hook would run on one of ``modules`` if they were called.

    A fused path that reads these modules' weights without calling them must then fall back to calling them:
    megatron's DDP with ``overlap_param_gather`` waits for a module's parameter all-gather in a forward pre-hook;
    offloading, FSDP and adapter wrappers hook modules too. Global module hooks count for every module.
    """
    if torch.nn.modules.module._global_forward_pre_hooks or torch.nn.modules.module._global_forward_hooks:
        return True
    return any(m is not None and (m._forward_pre_hooks or m._forward_hooks) for m in modules)
