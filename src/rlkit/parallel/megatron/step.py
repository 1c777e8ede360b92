"""One RL optimizer step over packed micro-batches: DataPacker -> forward -> log-probs -> loss -> backward.

Data flow of :func:`train_step` (slime's ``train_one_step`` reduced to its parts)::

    RLBatch --DataPacker.pack--> PackPlan (micro-batches of one DP rank, global normalizer)
      for each micro-batch:  pack_thd (THD, cu_seqlens) or pack_bshd (padded rows)
        forward(micro) -> logits [..., T, V]       (megatron GPTModel, or HF transformers for reference)
        rlkit.algos.logprobs_and_entropy           (log p of the next token, chunked, exact gradient)
        rlkit.algos.rl_loss(normalizer=global)     (each micro-batch's share of the global-batch loss; the
                                                    KL term reads ref_log_probs, TIS rollout_log_probs)
        backward (megatron-core's forward_backward_no_pipelining, or a plain loop)
    grad norm (L2 over all parameters) -> clip -> optimizer.step()

Because the normalizer is computed once for the global batch (``PackPlan.normalizer``), summing the
micro-batch losses gives the global loss whatever the split, so THD packing, padding and the HF
reference all produce the same loss and gradient up to float rounding.

Model parallelism (after :func:`rlkit.parallel.megatron.model.init_model_parallel` with any size > 1):

* **DP**: rank ``d`` runs ``PackPlan.micro_batches[d]`` (``DataPacker(dp_size=D)`` balances the ranks);
  every rank runs the same number of micro-batches (an empty one is a padding sequence with zero loss).
* **CP**: each THD micro-batch is cut by :func:`rlkit.parallel.context.cp_shard` (chunks ``i`` and
  ``2cp-1-i`` of every sequence); the model gets the local tokens and ``PackedSeqParams`` with the *full*
  ``cu_seqlens``; the loss terms of the local tokens are this rank's share.
* **TP**: the logits are vocab-parallel ``[T, V'/tp]``; log-probs and entropy come from
  :func:`rlkit.algos.logprobs.vocab_parallel_logprobs_and_entropy` over the TP group, with megatron's
  vocabulary padding masked out. **SP**: the stream is padded to a multiple of ``cp * tp``.
* **EP**: megatron's allgather dispatcher gathers equal-sized token blocks, so micro-batch ``j`` is padded
  to its longest length over the DP ranks.
* **PP**: megatron-core's pipeline schedule (``get_forward_backward_func()``, 1F1B) with
  ``variable_seq_lengths`` (dense) or one padded length per step (MoE, whose allgather dispatcher
  megatron refuses with variable lengths).
* Gradients are summed over DP x CP (rlkit losses carry the global normalizer) and the norm counts each
  parameter once: :mod:`rlkit.parallel.megatron.distributed`.

Shape legend: ``N`` samples, ``R_i`` response tokens of sample ``i``, ``T`` packed tokens, ``B`` rows,
``S`` padded row length, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rlkit.algos.logprobs import IGNORE_INDEX, logprobs_and_entropy, vocab_parallel_logprobs_and_entropy
from rlkit.algos.losses import PolicyLossConfig, rl_loss
from rlkit.parallel.context import cp_shard
from rlkit.parallel.layouts import PackedBatch, pack_bshd, pack_thd, padding_multiples
from rlkit.parallel.megatron.distributed import ParallelContext
from rlkit.parallel.megatron.forward import ForwardFn, MicroBatch, host_to_device, micro_batch_to_device
from rlkit.parallel.packing import DataPacker, PackPlan

Layout = Literal["thd", "bshd"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLBatch:
    """The training inputs of one optimizer step (one DP rank's view is the whole batch here).

    Attributes:
        tokens: ``N`` int64 ``[L_i]`` prompt + response token ids.
        response_lengths: ``N`` ints ``R_i``.
        advantages: ``N`` float ``[R_i]`` per-response-token advantages.
        old_log_probs: ``N`` float ``[R_i]`` behaviour-policy log-probs of the response tokens (the trainer's).
        loss_masks: ``N`` ``[R_i]`` 0/1 masks, or ``None`` for all ones.
        ref_log_probs: ``N`` float ``[R_i]`` reference-model log-probs (the KL loss), or ``None``.
        rollout_log_probs: ``N`` float ``[R_i]`` log-probs reported by the rollout engine (TIS), or ``None``.
    """

    tokens: Sequence[Tensor]
    response_lengths: Sequence[int]
    advantages: Sequence[Tensor]
    old_log_probs: Sequence[Tensor]
    loss_masks: Sequence[Tensor] | None = None
    ref_log_probs: Sequence[Tensor] | None = None
    rollout_log_probs: Sequence[Tensor] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for name in ("response_lengths", "advantages", "old_log_probs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} samples; give one per sample")
        if self.loss_masks is not None and len(self.loss_masks) != n:
            raise ValueError(f"loss_masks has {len(self.loss_masks)} entries for {n} samples")
        for name, per_sample in self.per_token_values().items():
            if len(per_sample) != n:
                raise ValueError(f"{name} has {len(per_sample)} entries for {n} samples; give one per sample")
            for i, (values, r) in enumerate(zip(per_sample, self.response_lengths, strict=True)):
                if values.shape[-1] != r:
                    raise ValueError(f"sample {i}: {name} {tuple(values.shape)} must have response_length={r} entries")

    def per_token_values(self) -> dict[str, Sequence[Tensor]]:
        """The per-response-token inputs this batch carries, by name (``advantages``, ``old_log_probs``, ...)."""
        values = {"advantages": self.advantages, "old_log_probs": self.old_log_probs}
        for name in ("ref_log_probs", "rollout_log_probs"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return values

    def loss_token_counts(self) -> list[int]:
        """Loss tokens per sample (``sum(loss_mask)``, or ``R_i`` when there is no mask)."""
        if self.loss_masks is None:
            return [int(r) for r in self.response_lengths]
        return [int(torch.as_tensor(m).sum()) for m in self.loss_masks]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one :func:`train_step` did.

    Attributes:
        loss: the global-batch loss (sum over micro-batches), float.
        grad_norm: L2 norm of all gradients before clipping, float.
        metrics: ``rl_loss`` metrics summed over micro-batches (global-batch values).
        num_micro_batches: micro-batches run.
        num_tokens: tokens fed to the model, padding included.
    """

    loss: float
    grad_norm: float
    metrics: dict[str, float]
    num_micro_batches: int
    num_tokens: int


def build_micro_batch(
    batch: RLBatch,
    indices: Sequence[int],
    *,
    layout: Layout,
    pad_id: int = 0,
    seq_multiple: int = 1,
    total_multiple: int = 1,
) -> MicroBatch:
    """Pack the samples ``indices`` of ``batch`` as THD (``pack_thd``) or padded rows (``pack_bshd``).

    Every per-token input of ``batch`` (:meth:`RLBatch.per_token_values`: advantages, old / reference / rollout
    log-probs) lands in ``micro.values`` at the prediction positions, 0 elsewhere, so it is padded, CP-sharded and
    moved exactly as the tokens are. ``seq_multiple`` / ``total_multiple`` pad THD sequences and the stream
    (:func:`pack_thd`).
    """
    tokens = [batch.tokens[i] for i in indices]
    responses = [int(batch.response_lengths[i]) for i in indices]
    masks = None if batch.loss_masks is None else [batch.loss_masks[i] for i in indices]
    values = {name: [per_sample[i].float() for i in indices] for name, per_sample in batch.per_token_values().items()}
    if layout == "thd":
        return pack_thd(
            tokens, responses, loss_masks=masks, values=values, sample_ids=list(indices), pad_id=pad_id,
            seq_multiple=seq_multiple, total_multiple=total_multiple,
        )  # fmt: skip
    if layout == "bshd":
        return pack_bshd(tokens, responses, loss_masks=masks, values=values, pad_id=pad_id)
    raise ValueError(f"layout={layout!r}: use 'thd' (packed) or 'bshd' (padded)")


# Padded vocabulary columns get this logit: exp(fill - max) is exactly 0 in float32 and fill * 0 stays finite
# (an -inf fill would make the entropy's p * z a NaN).
_VOCAB_PADDING_LOGIT = -1e30


def token_log_probs(
    logits: Tensor,
    targets: Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    tp_group: Any = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropy) of ``targets`` under ``logits``, unsharded or vocab-parallel.

    Args:
        logits: ``[..., V']`` with ``V' >= vocab_size`` (megatron's padded columns are dropped), or with
            ``tp_group`` this TP rank's ``[..., V'/tp]`` slice, columns ``[r V'/tp, (r+1) V'/tp)``.
        targets: ``[...]`` int64 target ids or ``IGNORE_INDEX``.
        vocab_size: the real vocabulary size ``V``.
        temperature: divides the logits.
        compute_entropy: also return the entropy.
        tp_group: the tensor-parallel group when the logits are vocab-parallel (size > 1), else ``None``.

    Returns:
        ``(log_probs [...], entropy [...] | None)`` float32, identical on every TP rank.
    """
    import torch.distributed as dist

    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return logprobs_and_entropy(
            logits[..., :vocab_size], targets, temperature=temperature, compute_entropy=compute_entropy
        )
    width = logits.shape[-1]
    vocab_start = dist.get_rank(tp_group) * width
    real = min(max(vocab_size - vocab_start, 0), width)
    if real < width:
        fill = max(_VOCAB_PADDING_LOGIT, torch.finfo(logits.dtype).min)
        logits = logits.masked_fill(torch.arange(width, device=logits.device) >= real, fill)
    shape = targets.shape
    log_probs, entropy = vocab_parallel_logprobs_and_entropy(
        logits.reshape(-1, width), targets.reshape(-1), vocab_start=vocab_start, group=tp_group,
        temperature=temperature,
    )  # fmt: skip
    return log_probs.reshape(shape), entropy.reshape(shape) if compute_entropy else None


def micro_batch_loss(
    logits: Tensor,
    micro: MicroBatch,
    indices: Sequence[int],
    *,
    loss_config: PolicyLossConfig,
    normalizer: float,
    sample_loss_token_counts: Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: Any = None,
    metrics_normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the global RL loss.

    Args:
        logits: ``[T, V']`` (THD) or ``[B, S, V']`` (padded), prediction-aligned with ``micro.target_ids``;
            ``V' >= vocab_size`` (megatron pads the vocabulary; padded columns are dropped). With
            ``tp_group``: this TP rank's ``[T, V'/tp]`` slice (see :func:`token_log_probs`).
        micro: the packed micro-batch (under CP: this rank's tokens of it); ``micro.values`` holds
            ``advantages``, ``old_log_probs`` and, when the loss uses them, ``ref_log_probs`` (KL) and
            ``rollout_log_probs`` (TIS).
        indices: global sample index of each sample of ``micro`` (row order for padded input).
        loss_config: ``rl_loss`` hyper-parameters.
        normalizer: global normalizer of the step (``PackPlan.normalizer``).
        sample_loss_token_counts: ``[N]`` loss tokens of every sample of the global batch.
        metrics_normalizer: the global loss-token count (``rl_loss``'s, needed by ``seq_mean_token_sum_norm``).
        vocab_size: the real vocabulary size ``V``.
        temperature: sampling temperature of the rollout.
        tp_group: tensor-parallel group of vocab-parallel logits, else ``None``.

    Returns:
        ``(loss, metrics)`` from :func:`rlkit.algos.losses.rl_loss`.
    """
    targets = torch.where(micro.loss_mask.to(logits.device) != 0, micro.target_ids.to(logits.device), IGNORE_INDEX)
    log_probs, entropy = token_log_probs(
        logits, targets, vocab_size=vocab_size, temperature=temperature, tp_group=tp_group
    )
    device = log_probs.device
    if isinstance(micro, PackedBatch):
        sample_ids = micro.sample_ids
    else:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        sample_ids = rows[:, None].expand_as(micro.target_ids)
    return rl_loss(
        log_probs,
        micro.values["old_log_probs"].to(device),
        micro.values["advantages"].to(device),
        micro.loss_mask.to(device),
        config=loss_config,
        normalizer=normalizer,
        ref_log_probs=_value_on(micro, "ref_log_probs", device),
        entropy=entropy,
        rollout_log_probs=_value_on(micro, "rollout_log_probs", device),
        sample_ids=host_to_device(sample_ids, device),
        sample_loss_token_counts=host_to_device(sample_loss_token_counts, device),
        metrics_normalizer=metrics_normalizer,
    )


def _value_on(micro: MicroBatch, name: str, device: torch.device) -> Tensor | None:
    value = micro.values.get(name)
    return None if value is None else value.to(device)


# ---- the micro-batches of this rank -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RankMicroBatches:
    """This rank's micro-batches: ``full`` packed streams, ``local`` (CP-sharded) views, sample indices."""

    indices: list[list[int]]
    full: list[MicroBatch]
    local: list[MicroBatch]
    seq_length: int


def _check_packer(packer: DataPacker, ctx: ParallelContext, layout: Layout) -> None:
    if packer.dp_size != ctx.dp_size or packer.cp_size != ctx.cp_size:
        raise ValueError(
            f"DataPacker(dp_size={packer.dp_size}, cp_size={packer.cp_size}) does not match megatron's groups "
            f"(dp={ctx.dp_size}, cp={ctx.cp_size}); build the packer with the model's dp and cp sizes"
        )
    if ctx.is_parallel and layout != "thd":
        raise ValueError(f"layout={layout!r}: model-parallel steps run packed THD micro-batches; use layout='thd'")


def _stream_length(lengths: Sequence[int], seq_multiple: int, total_multiple: int) -> int:
    """Tokens of :func:`pack_thd`'s stream for samples of ``lengths`` (``total_multiple`` when empty)."""
    total = sum(-(-int(n) // seq_multiple) * seq_multiple for n in lengths)
    return max(-(-total // total_multiple) * total_multiple, total_multiple)


def _rank_micro_batches(
    model: Any, batch: RLBatch, plan: PackPlan, ctx: ParallelContext, layout: Layout
) -> _RankMicroBatches:
    """Pack this DP rank's micro-batches (kept when empty, so every rank runs the same collectives)."""
    from rlkit.parallel.megatron.distributed import max_over_data_parallel

    mine = plan.micro_batches[ctx.dp_rank]
    if not ctx.is_parallel:
        mine = [mb for mb in mine if mb]
        full = [build_micro_batch(batch, mb, layout=layout) for mb in mine]
        return _RankMicroBatches(mine, full, full, 0)
    seq_multiple, total_multiple = padding_multiples(
        cp_size=ctx.cp_size, tp_size=ctx.tp_size, sequence_parallel=ctx.sequence_parallel
    )
    lengths = [_stream_length([len(batch.tokens[i]) for i in mb], seq_multiple, total_multiple) for mb in mine]
    config = getattr(model, "config", None)
    if ctx.ep_size > 1:
        # The allgather MoE dispatcher all-gathers equal-sized blocks over the EP ranks, which hold other
        # DP ranks' micro-batches: pad micro-batch j to its longest length over the DP ranks.
        lengths = max_over_data_parallel(lengths)
    if ctx.pp_size > 1 and not getattr(config, "variable_seq_lengths", True):
        lengths = [max(lengths)] * len(lengths)
    full = [
        build_micro_batch(batch, mb, layout="thd", seq_multiple=seq_multiple, total_multiple=n)
        for mb, n in zip(mine, lengths, strict=True)
    ]
    local = [_cp_local(m, ctx) for m in full]
    return _RankMicroBatches(mine, full, local, max(lengths))


def _cp_local(micro: PackedBatch, ctx: ParallelContext) -> PackedBatch:
    """This CP rank's tokens of ``micro``; ``cu_seqlens`` stays the full stream's (the attention needs it)."""
    if ctx.cp_size == 1:
        return micro
    shard = cp_shard(micro, cp_size=ctx.cp_size, cp_rank=ctx.cp_rank)
    return dataclasses.replace(
        micro,
        input_ids=shard.input_ids,
        position_ids=shard.position_ids,
        sample_ids=shard.sample_ids,
        target_ids=shard.target_ids,
        loss_mask=shard.loss_mask,
        values=shard.values,
    )


def _tp_group(ctx: ParallelContext) -> Any:
    if ctx.tp_size == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _run_schedule(model, forward, micros, loss_func_of, *, seq_length: int, forward_only: bool = False) -> None:
    """megatron-core's forward(-backward) schedule over ``micros`` (1F1B across stages when PP > 1).

    ``loss_func_of(j)`` returns the loss function of micro-batch ``j``, ``output -> (loss, num_tokens, logged)``;
    the model is built with ``calculate_per_token_loss=True`` so the schedule does not rescale the losses.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not torch.cuda.is_available():
        from rlkit.parallel.megatron.distributed import apply_cpu_distributed_patches

        apply_cpu_distributed_patches()
    if not getattr(model.config, "calculate_per_token_loss", False):
        # Without it the schedule divides every micro-batch loss by the micro-batch count; rlkit's
        # losses already carry the global normalizer.
        raise ValueError("build the model with calculate_per_token_loss=True to use megatron's schedule")
    items = iter(enumerate(micros))

    def forward_step(data_iterator, _model):
        j, micro = next(data_iterator)
        return forward(micro), loss_func_of(j)

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=items,
        model=[model],
        num_microbatches=len(micros),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


# ---- the no-grad log-prob pass -----------------------------------------------------------------------------


@torch.no_grad()
def compute_log_probs(
    forward: ForwardFn,
    tokens: Sequence[Tensor],
    response_lengths: Sequence[int],
    *,
    packer: DataPacker,
    vocab_size: int,
    layout: Layout = "thd",
    temperature: float = 1.0,
    model: Any = None,
) -> list[Tensor]:
    """Log-probs of every response token without gradients: the old-policy and reference-model passes.

    Args:
        forward: ``micro -> logits`` of the policy or the reference model (``forward.megatron_forward``, ...).
        tokens: ``N`` int ``[L_i]`` prompt + response ids (the whole batch, the same on every rank).
        response_lengths: ``N`` ints ``R_i``.
        packer: micro-batch planner with megatron's DP and CP sizes.
        vocab_size: real vocabulary size (megatron's padded logit columns are dropped).
        layout: ``"thd"`` or ``"bshd"`` (model-parallel runs need ``"thd"``).
        temperature: rollout sampling temperature.
        model: the megatron model behind ``forward``; needed when megatron's groups have a size > 1 (its
            config tells sequence parallelism and the pipeline stage).

    Returns:
        ``N`` float32 CPU ``[R_i]`` tensors, ``log p(response token j | prefix)``, in the input order, on every
        rank (DP ranks exchange their samples, CP ranks their tokens, the last PP stage sends its results).
    """
    ctx = _context(model)
    _check_packer(packer, ctx, layout)
    if ctx.is_parallel and model is None:
        raise ValueError("compute_log_probs under model parallelism needs model= (the megatron model of forward)")
    plan = packer.pack([len(t) for t in tokens])
    zeros = [torch.zeros(int(r)) for r in response_lengths]
    batch = RLBatch(tokens=tokens, response_lengths=response_lengths, advantages=zeros, old_log_probs=zeros)
    rank_micros = _rank_micro_batches(model, batch, plan, ctx, layout)
    tp_group = _tp_group(ctx)
    local_log_probs: dict[int, Tensor] = {}

    def log_probs_of(j: int, logits: Tensor) -> Tensor:
        micro = rank_micros.local[j]
        values, _ = token_log_probs(
            logits, micro.target_ids.to(logits.device), vocab_size=vocab_size, temperature=temperature,
            compute_entropy=False, tp_group=tp_group,
        )  # fmt: skip
        local_log_probs[j] = values.float().cpu()
        return values

    if ctx.pp_size > 1:

        def loss_func_of(j: int):
            def loss_func(output: Tensor):
                values = log_probs_of(j, output)
                return values.sum(), torch.ones((), dtype=torch.int), {}

            return loss_func

        _run_schedule(
            model, forward, rank_micros.local, loss_func_of, seq_length=rank_micros.seq_length, forward_only=True
        )
    else:
        for j, micro in enumerate(rank_micros.local):
            log_probs_of(j, forward(micro))
    out: dict[int, Tensor] = {}
    if ctx.is_last_stage:
        for j, (indices, micro) in enumerate(zip(rank_micros.indices, rank_micros.full, strict=True)):
            stream = _cp_gather(local_log_probs[j], micro, ctx)
            for index, values in zip(indices, micro.unpack_response(stream), strict=True):
                out[index] = values.clone()
    if ctx.is_parallel:
        out = _share_results(out, ctx)
    return [out[i] for i in range(len(tokens))]


def _cp_gather(local: Tensor, micro: MicroBatch, ctx: ParallelContext) -> Tensor:
    """The full stream ``[T]`` from every CP rank's ``[T / cp]`` values."""
    if ctx.cp_size == 1:
        return local
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rlkit.parallel.context import cp_unsplit

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    pieces = [torch.empty_like(local, device=device) for _ in range(ctx.cp_size)]
    dist.all_gather(pieces, local.to(device), group=parallel_state.get_context_parallel_group())
    return cp_unsplit([p.cpu() for p in pieces], micro.cu_seqlens)


def _share_results(out: dict[int, Tensor], ctx: ParallelContext) -> dict[int, Tensor]:
    """Every rank's ``{sample index: values}`` merged over DP, then sent from the last PP stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if ctx.is_last_stage and ctx.dp_size > 1:
        parts: list[Any] = [None] * ctx.dp_size
        dist.all_gather_object(parts, out, group=parallel_state.get_data_parallel_group())
        out = {k: v for part in parts for k, v in part.items()}
    if ctx.pp_size > 1:
        box = [out]
        dist.broadcast_object_list(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        out = box[0]
    return out


# ---- the train step ------------------------------------------------------------------------------------------


def _context(model: Any) -> ParallelContext:
    config = getattr(model, "config", None)
    return ParallelContext.current(sequence_parallel=bool(getattr(config, "sequence_parallel", False)))


def _local_grad_norm(parameters: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # float32 accumulation: bf16 squares of many small entries lose the tail of the sum.
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _check_loss_inputs(batch: RLBatch, loss_config: PolicyLossConfig, max_response_len: int | None) -> None:
    """Name the input the loss configuration needs and the batch lacks, before any forward runs."""
    if loss_config.use_kl_loss and batch.ref_log_probs is None:
        raise ValueError(
            f"loss_config.use_kl_loss=True (kl_loss_coef={loss_config.kl_loss_coef}) needs RLBatch.ref_log_probs: "
            "compute them with compute_log_probs on the reference model, or set use_kl_loss=False"
        )
    if loss_config.use_tis and batch.rollout_log_probs is None:
        raise ValueError(
            "loss_config.use_tis=True needs RLBatch.rollout_log_probs (the rollout engine's log-probs of the "
            "response tokens), or set use_tis=False"
        )
    if loss_config.aggregation == "seq_mean_token_sum_norm" and max_response_len is None:
        raise ValueError(
            "loss_config.aggregation='seq_mean_token_sum_norm' divides by num_samples * max_response_len: pass "
            "train_step(..., max_response_len=<the generation budget, --rollout-max-response-len>)"
        )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: RLBatch,
    *,
    packer: DataPacker,
    loss_config: PolicyLossConfig,
    forward: ForwardFn,
    vocab_size: int,
    layout: Layout = "thd",
    max_grad_norm: float | None = 1.0,
    temperature: float = 1.0,
    use_megatron_schedule: bool = False,
    max_response_len: int | None = None,
) -> StepResult:
    """One optimizer step on ``batch``, on one process or on every rank of a megatron layout.

    Under model parallelism every rank calls this with the same ``batch`` (the whole global batch) and
    its own part of the model; see the module docstring for what each axis does.

    Args:
        model: the policy (megatron ``GPTModel`` or HF model), in train mode.
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters, or ``None`` to stop after the
            backward, the gradient reduction and the grad norm (gradients are left in ``.grad``); or
            megatron's ``DistributedOptimizer`` with ``model`` wrapped in megatron's DDP
            (:func:`rlkit.parallel.megatron.distributed.build_distributed_optimizer`, CUDA).
        batch: the step's samples; with ``loss_config.use_kl_loss`` it needs ``ref_log_probs``, with
            ``loss_config.use_tis`` ``rollout_log_probs``.
        packer: micro-batch planner; its ``dp_size`` and ``cp_size`` must equal megatron's.
        loss_config: ``rl_loss`` hyper-parameters; ``loss_config.aggregation`` picks the normalizer.
        forward: ``micro -> logits``, e.g. :func:`~rlkit.parallel.megatron.forward.megatron_forward` or
            :func:`~rlkit.parallel.megatron.forward.hf_forward`.
        vocab_size: the real vocabulary size (logit columns beyond it are megatron's padding).
        layout: ``"thd"`` packed or ``"bshd"`` padded micro-batches (one process only).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        temperature: rollout sampling temperature.
        use_megatron_schedule: run megatron-core's ``forward_backward_no_pipelining`` instead of a plain
            loop (same result; the model needs ``calculate_per_token_loss=True``, which
            :func:`~rlkit.parallel.megatron.model.build_gpt_model` sets). PP > 1 always uses megatron's
            pipeline schedule.
        max_response_len: the generation budget ``L`` (``--rollout-max-response-len``) of the
            ``seq_mean_token_sum_norm`` aggregation, whose normalizer is ``N * L`` for the ``N`` samples of the
            global batch: a constant of the step, so every micro-batch, DP rank and CP shard divides by it.

    Returns:
        A :class:`StepResult` with the global loss, the pre-clip global gradient norm and summed metrics,
        the same on every rank.
    """
    from rlkit.parallel.megatron.distributed import is_megatron_optimizer

    _check_loss_inputs(batch, loss_config, max_response_len)
    ctx = _context(model)
    _check_packer(packer, ctx, layout)
    megatron_optimizer = is_megatron_optimizer(optimizer)
    if megatron_optimizer:
        clip = getattr(getattr(optimizer, "config", None), "clip_grad", None)
        if clip is not None and (clip or None) != max_grad_norm:
            raise ValueError(
                f"max_grad_norm={max_grad_norm} but the megatron optimizer clips at clip_grad={clip}; "
                "megatron's optimizer clips inside step(): pass the same value (None for clip_grad=0)"
            )
        model.zero_grad_buffer()
        optimizer.zero_grad()
    counts = batch.loss_token_counts()
    plan: PackPlan = packer.pack([len(t) for t in batch.tokens], loss_token_counts=counts)
    normalizer = plan.normalizer(loss_config.aggregation, max_response_len=max_response_len)
    rank_micros = _rank_micro_batches(model, batch, plan, ctx, layout)
    loss_fn_kwargs = dict(
        loss_config=loss_config,
        normalizer=normalizer,
        metrics_normalizer=plan.normalizer("token_mean"),
        sample_loss_token_counts=torch.tensor(counts, dtype=torch.float32),
        vocab_size=vocab_size,
        temperature=temperature,
        tp_group=_tp_group(ctx),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    # Metrics are summed on the device and read once after the last micro-batch: a float() per metric and
    # micro-batch would make the host wait for the GPU ~6 times per micro-batch and starve the next launches.
    sums: dict[str, Tensor] = {}

    def record(metrics: dict[str, Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().to(torch.float64)
            sums[name] = sums[name] + value if name in sums else value

    device = params[0].device if params else torch.device("cpu")
    micros = [micro_batch_to_device(m, device) for m in rank_micros.local]
    indices = rank_micros.indices
    loss_fn_kwargs["sample_loss_token_counts"] = host_to_device(loss_fn_kwargs["sample_loss_token_counts"], device)
    if use_megatron_schedule or ctx.pp_size > 1:

        def loss_func_of(j: int):
            def loss_func(output: Tensor):
                loss, metrics = micro_batch_loss(output, micros[j], indices[j], **loss_fn_kwargs)
                record(metrics)
                # (loss, num_tokens, logged): with calculate_per_token_loss the schedule does not rescale.
                return loss, torch.ones((), dtype=torch.int), metrics

            return loss_func

        _run_schedule(model, forward, micros, loss_func_of, seq_length=rank_micros.seq_length)
    else:
        for micro, mb in zip(micros, indices, strict=True):
            loss, metrics = micro_batch_loss(forward(micro), micro, mb, **loss_fn_kwargs)
            loss.backward()
            record(metrics)
    names = sorted(sums)
    totals = dict(zip(names, torch.stack([sums[n] for n in names]).tolist(), strict=True)) if names else {}
    if ctx.is_parallel:
        from rlkit.parallel.megatron.distributed import sum_metrics

        totals = sum_metrics(totals, ctx)
    if megatron_optimizer:
        from megatron.core.distributed import finalize_model_grads

        # DDP's reduce-scatter (a sum: calculate_per_token_loss), TP norm and tied-embedding gradients; then
        # megatron's optimizer computes the global norm, clips, steps its shard and all-gathers the weights.
        finalize_model_grads([model])
        _, norm, _ = optimizer.step()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
    else:
        if ctx.is_parallel:
            from rlkit.parallel.megatron.distributed import finalize_grads, grad_norm

            finalize_grads(model)
            norm = grad_norm(params)
        else:
            norm = _local_grad_norm(params)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm.to(params[0].device))
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=totals.get("loss", 0.0),
        grad_norm=float(norm),
        metrics=totals,
        num_micro_batches=len(micros),
        num_tokens=sum(int(m.input_ids.numel()) for m in micros),
    )
