"""Weight sync from a megatron-core trainer to a rollout engine: HF-named tensors, gathered, bucketed, optional FP8.

After each optimizer step the rollout engine needs the new policy in the layout it loads: Hugging Face names
and shapes, q/k/v and gate/up split, the vocabulary unpadded, experts whole. The trainer holds megatron-core
tensors instead, cut over tensor-parallel (TP), expert-parallel (EP, and expert-TP) and pipeline (PP) ranks.
This module walks the model one megatron tensor (a *unit* of :mod:`rlkit.ckpt.convert`) at a time:

1. gather the unit's TP pieces over the TP group (expert units: the expert-TP group, then their experts over
   the EP group), on device with ``all_gather``;
2. turn them into HF tensors with the checkpoint mapping of the model family (:func:`rlkit.ckpt.convert.
   hf_tensors_of_unit`: the one table of names and fusions, shared with the checkpoint converter);
3. optionally quantize each eligible 2-D weight to 128x128 blockwise FP8 e4m3 (:mod:`rlkit.ckpt.fp8`):
   ``fp8="quantize"`` emits ``<name>`` (float8_e4m3fn) and ``<name>_scale_inv`` (float32) for engines that
   load FP8 checkpoints; ``fp8="roundtrip"`` quantizes and dequantizes back to the weight's dtype, which is
   what a BF16 engine (the embedded one) needs to run the weights an FP8 rollout engine would run;
4. group the tensors into buckets of at most ``bucket_bytes``, so memory beyond the model is bounded by one
   bucket whatever the model size (a tensor larger than a bucket travels alone).

Pipeline stages: given the pipeline group (``SyncGroups.pp``, as :func:`megatron_layout_and_groups` sets it), each
stage's member broadcasts its units' HF tensors to the other stages, so every rank yields the whole model, identical
on all ranks (slime instead gives every stage its own sender into the engine). Without it, a rank yields only its own
stage's units.

Two ways to deliver the buckets, after slime's ``UpdateWeightFromTensor`` / ``UpdateWeightFromDistributed``:

* colocated (:func:`sync_colocated`): the engine shares the GPU with the trainer; each bucket is copied in
  place into the engine's parameters (``EmbeddedEngine.load_weight_buckets``), device to device, no
  re-allocation, no CPU round trip;
* decoupled (:func:`sync_decoupled`): the engine runs in another process / on another GPU
  (:class:`~rlkit.rollout.engines.process.ProcessEngine`); trainer rank 0 broadcasts each bucket (metadata,
  then one flat byte buffer) into a two-member group (NCCL on GPU, gloo on CPU) that the engine joined with
  ``ProcessEngine.init_weight_group``; the protocol is in :mod:`rlkit.rollout.engines.process`.

Names: HF checkpoint names (per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``); ``fused_experts=True``
emits transformers 5's in-memory ``mlp.experts.gate_up_proj`` ``[E, 2F, H]`` / ``down_proj`` ``[E, H, F]``
instead, which is what a live transformers MoE model (the embedded engine) holds.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from rlkit.ckpt import fp8 as fp8_lib
from rlkit.ckpt.convert import Layout, Unit, as_layout, check_layout, hf_tensors_of_unit, iter_units
from rlkit.ckpt.mappings import FAMILIES, family_for_config
from rlkit.parallel.megatron.model import hf_config_dict, megatron_layout

Fp8Mode = Literal["off", "quantize", "roundtrip"]
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


@dataclass(frozen=True, kw_only=True)
class WeightSyncConfig:
    """How the trainer's weights are turned into engine tensors.

    Attributes:
        bucket_bytes: largest bucket in bytes (slime's ``--update-weight-buffer-size``, 512 MiB by default).
        fp8: ``off``; ``quantize`` (FP8 e4m3 weights plus ``_scale_inv`` for engines that load FP8);
            ``roundtrip`` (quantize and dequantize, for BF16 engines that should run what an FP8 engine runs).
        fp8_block: FP8 tile ``(rows, columns)``.
        fp8_compile: quantize with ``torch.compile`` (one fused pass; on GPU ~15x faster than eager).
        fused_experts: emit routed experts as transformers 5 holds them in memory (for a live HF MoE model).
    """

    bucket_bytes: int = 512 << 20
    fp8: Fp8Mode = "off"
    fp8_block: tuple[int, int] = fp8_lib.DEFAULT_BLOCK
    fp8_compile: bool = False
    fused_experts: bool = False

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={self.bucket_bytes} must be >= 1")
        if self.fp8 not in ("off", "quantize", "roundtrip"):
            raise ValueError(f"fp8={self.fp8!r} must be 'off', 'quantize' or 'roundtrip'")
        if self.fp8 == "quantize" and self.fused_experts:
            raise ValueError(
                "fp8='quantize' with fused_experts=True: FP8 checkpoints keep experts per expert with one "
                "scale_inv each; use fused_experts=False for an FP8 engine, or fp8='roundtrip' for a BF16 one"
            )


@dataclass(frozen=True, kw_only=True)
class SyncGroups:
    """The process groups the gather runs over (None: a group of one, nothing to gather).

    Attributes:
        tp: tensor-parallel group (dense weights, vocabulary).
        ep: expert-parallel group (routed experts are spread over it).
        etp: expert tensor-parallel group (routed experts' weights are cut over it).
        pp_rank: this rank's pipeline stage.
        pp: the pipeline group (ranks in stage order). Given, each stage's tensors are broadcast from the stage's
            member to the others, so every rank yields the whole model; None: each rank yields its own stage.
    """

    tp: Any = None
    ep: Any = None
    etp: Any = None
    pp_rank: int = 0
    pp: Any = None


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved: tensors and bytes as the engine receives them, buckets, wall seconds."""

    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float


def megatron_layout_and_groups(config: Any = None) -> tuple[Layout, SyncGroups]:
    """The :class:`~rlkit.ckpt.convert.Layout` and :class:`SyncGroups` of megatron-core's parallel state.

    Call after ``rlkit.parallel.megatron.model.init_model_parallel``. ``config``: the model's
    ``TransformerConfig`` (``model.config``), for its pipeline split (see
    :func:`rlkit.parallel.megatron.model.megatron_layout`); required with more than one stage.
    """
    from megatron.core import parallel_state as ps

    layout = megatron_layout(config)
    groups = SyncGroups(
        tp=ps.get_tensor_model_parallel_group(),
        ep=ps.get_expert_model_parallel_group(),
        etp=ps.get_expert_tensor_parallel_group(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_group() if layout.pp > 1 else None,
    )
    return layout, groups


def local_megatron_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """This rank's megatron tensors by local name (parameters and buffers, detached; wrappers' ``.module`` removed)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP / Float16Module wrappers
    out = {name: p.detach() for name, p in model.named_parameters()}
    out.update({name: b.detach() for name, b in model.named_buffers()})
    return out


# --- gather ---------------------------------------------------------------------------------------------------


def _size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(tensor: Tensor, group: Any) -> list[Tensor]:
    if _size(group) == 1:
        return [tensor]
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(_size(group))]
    dist.all_gather(out, tensor, group=group)
    return out


def _check_groups(layout: Layout, groups: SyncGroups) -> None:
    sizes = [("tp", groups.tp, layout.tp), ("ep", groups.ep, layout.ep), ("etp", groups.etp, layout.etp)]
    if groups.pp is not None:
        sizes.append(("pp", groups.pp, layout.pp))
    for name, group, expected in sizes:
        if _size(group) != expected:
            raise ValueError(
                f"the {name} group has {_size(group)} ranks but layout.{name}={expected}; pass the groups the model "
                "was built with (megatron_layout_and_groups(model.config) reads both from megatron-core and the model)"
            )


def _local(local: Mapping[str, Tensor], unit: Unit) -> Tensor:
    if unit.local_name not in local:
        raise KeyError(
            f"megatron tensor {unit.local_name!r} (global {unit.megatron}) is not on this rank; "
            f"is the layout the model's (an uneven pipeline split: megatron_layout_and_groups(model.config))? "
            f"This rank has e.g. {sorted(local)[:4]}"
        )
    return local[unit.local_name]


class _ExpertGather:
    """Gathers routed experts over the EP group: the call for a rank's local expert ``j`` returns all ranks' ``j``.

    Experts of a (layer, rule) come in global order ``0..E-1``; the first ``E/ep`` of them (EP rank 0's) trigger
    the collectives, the others are served from what those brought, so memory holds at most one rule of one layer.
    """

    def __init__(self, groups: SyncGroups, per_rank: int) -> None:
        self.groups, self.per_rank = groups, per_rank
        self.stash: dict[tuple[str, int], list[Tensor]] = {}

    def pieces(self, unit: Unit, local: Mapping[str, Tensor]) -> list[Tensor]:
        """Expert ``unit.expert``'s expert-TP pieces (in expert-TP rank order)."""
        # Experts e = r * per_rank + j of EP ranks r share the local name (local index j) of this layer and rule.
        if unit.expert < self.per_rank:  # EP rank 0's local expert j: every EP rank sends its local expert j
            mine = _all_gather(_local(local, unit), self.groups.etp)
            by_ep = list(zip(*[_all_gather(p, self.groups.ep) for p in mine], strict=True))
            for ep_rank, etp_pieces in enumerate(by_ep):
                self.stash[(unit.local_name, ep_rank)] = list(etp_pieces)
        return self.stash.pop((unit.local_name, unit.expert // self.per_rank))


@functools.lru_cache(maxsize=8)
def _stage_units(family_name: str, cfg_json: str, layout: Layout, has_mtp: bool, stage: int | None) -> tuple[Unit, ...]:
    # The walk over the mapping table is the same every sync; caching it takes ~15% off the host time.
    cfg = json.loads(cfg_json)
    units = iter_units(FAMILIES[family_name], cfg, layout, mtp=has_mtp, mtp_copies=False)
    return tuple(u for u in units if not u.replica and (stage is None or u.stage == stage))


# Weights are never FP8 here (FP8 is applied after the gather); the index travels in the broadcast header.
_STAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 4


def _broadcast_from_stage(tensors: list[Tensor] | None, count: int, src: int, group: Any, device) -> list[Tensor]:
    """The stage ``src`` (global rank) sends its unit's HF tensors to the rest of the pipeline group.

    Per tensor: a header ``int64 [dtype index, ndim, *shape]`` (padded to 4 dims), then the data.
    """
    out = []
    for i in range(count):
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
        if tensors is not None:
            tensor = tensors[i].contiguous()
            header[0], header[1] = _STAGE_DTYPES.index(tensor.dtype), tensor.dim()
            header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
        dist.broadcast(header, src, group=group)
        if tensors is None:
            dtype_index, ndim, *shape = header.tolist()
            tensor = torch.empty(shape[:ndim], dtype=_STAGE_DTYPES[dtype_index], device=device)
        dist.broadcast(tensor, src, group=group)
        out.append(tensor)
    return out


def iter_hf_tensors(
    model: torch.nn.Module | Mapping[str, Tensor],
    hf_config: Any,
    *,
    layout: Any = None,
    groups: SyncGroups | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(HF name, tensor)`` of the model, gathered over TP / expert-TP / EP (and PP) groups.

    With ``groups.pp`` every rank yields every stage's tensors (broadcast by the stage holding them); without it,
    only its own stage's. Every rank of the groups must iterate to the end (collectives inside). Tensors stay on the
    model's device and dtype; many are views of the live parameters (copy them before the next optimizer step
    if they must outlive it).

    Args:
        model: a megatron-core ``GPTModel`` (possibly wrapped), or this rank's megatron tensors by local name.
        hf_config: the HF config (object or ``config.json`` dict) the model was built from.
        layout: the model's parallel layout (:class:`~rlkit.ckpt.convert.Layout` or a ``ParallelPlan``);
            default one rank.
        groups: the process groups of ``layout`` (default: none, i.e. every size must be 1).

    Yields:
        HF checkpoint names and tensors: ``[out, in]`` weights, ``[hidden]`` norms, the unpadded ``[V, H]``
        embedding (and head when untied), per-expert ``[F, H]`` / ``[H, F]`` expert weights.
    """
    cfg = hf_config_dict(hf_config)
    layout, groups = as_layout(layout or Layout()), groups or SyncGroups()
    _check_groups(layout, groups)
    family = family_for_config(cfg)
    dims = check_layout(family, cfg, layout)
    local = local_megatron_tensors(model) if isinstance(model, torch.nn.Module) else model
    device = next(iter(local.values())).device
    gather_stages = _size(groups.pp) > 1
    has_mtp = any(name.startswith("mtp.layers.") for name in local)
    if gather_stages:  # only the last stage holds the MTP layers; every stage must walk the same units
        flag = torch.tensor([int(has_mtp)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=groups.pp)
        has_mtp = bool(flag.item())
    experts = _ExpertGather(groups, dims.experts // layout.ep if dims.experts else 0)
    cfg_json = json.dumps(cfg, sort_keys=True, default=str)
    for unit in _stage_units(family.name, cfg_json, layout, has_mtp, None if gather_stages else groups.pp_rank):
        if unit.stage != groups.pp_rank:  # another stage's unit (gather_stages): it broadcasts, we receive
            src = dist.get_global_rank(groups.pp, unit.stage)
            yield from zip(unit.hf, _broadcast_from_stage(None, len(unit.hf), src, groups.pp, device), strict=True)
            continue
        if unit.expert is not None:
            ep_rank = unit.expert // experts.per_rank
            pieces = experts.pieces(unit, local)
            shards = {(unit.stage, t, ep_rank): {unit.local_name: p} for t, p in enumerate(pieces)}
        else:
            pieces = _all_gather(_local(local, unit), groups.tp) if unit.rule.split != "replicated" else None
            shards = {
                (unit.stage, t, 0): {unit.local_name: pieces[t] if pieces else _local(local, unit)}
                for t in range(layout.tp)
            }
        tensors = hf_tensors_of_unit(unit, shards, dims, layout)
        if gather_stages:
            src = dist.get_global_rank(groups.pp, unit.stage)
            tensors = _broadcast_from_stage(tensors, len(unit.hf), src, groups.pp, device)
        yield from zip(unit.hf, tensors, strict=True)


# --- FP8, fused experts, buckets ------------------------------------------------------------------------------


def apply_fp8(
    named: Iterable[tuple[str, Tensor]],
    *,
    mode: Fp8Mode,
    block: tuple[int, int] = fp8_lib.DEFAULT_BLOCK,
    compile: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """Quantize FP8-eligible weights (:func:`rlkit.ckpt.fp8.is_fp8_weight`) on the way; others pass through.

    ``quantize``: ``name`` -> ``(name, Q float8_e4m3fn [M, N])``, ``(name + "_scale_inv", float32
    [ceil(M/b0), ceil(N/b1)])``. ``roundtrip``: ``name`` -> ``Q * scale_inv`` in the weight's dtype (error per
    element at most ``2^-4 |W|`` for normal values, plus ``2^-10 scale_inv`` below e4m3's normal range).
    """
    for name, tensor in named:
        if mode == "off" or not fp8_lib.is_fp8_weight(name):
            yield name, tensor
            continue
        if mode == "roundtrip":
            yield name, (_compiled_roundtrip() if compile else fp8_roundtrip)(tensor, block=block)
            continue
        quantized = fp8_lib.quantize_state_dict({name: tensor}, block=block, compile=compile)
        yield name, quantized[name]
        yield name + fp8_lib.SCALE_SUFFIX, quantized[name + fp8_lib.SCALE_SUFFIX]


def fp8_roundtrip(weight: Tensor, *, block: tuple[int, int] = fp8_lib.DEFAULT_BLOCK) -> Tensor:
    """``dequantize_blockwise(*quantize_blockwise(W))`` in ``W``'s dtype: the weight an FP8 engine computes with."""
    q, scale_inv = fp8_lib.quantize_blockwise(weight, block=block)
    return fp8_lib.dequantize_blockwise(q, scale_inv, block=block, dtype=weight.dtype)


_COMPILED: list = []


def _compiled_roundtrip():
    # One fused kernel instead of ~10 eager passes; compiled once per process (dynamic shapes after the first).
    if not _COMPILED:
        _COMPILED.append(torch.compile(fp8_roundtrip))
    return _COMPILED[0]


def fuse_experts_stream(named: Iterable[tuple[str, Tensor]], *, num_experts: int) -> Iterator[tuple[str, Tensor]]:
    """Per-expert tensors -> transformers 5's fused ``gate_up_proj`` / ``down_proj``, one layer at a time.

    A layer's experts are held until all ``num_experts`` x 3 projections arrived, then stacked with
    :func:`rlkit.ckpt.experts.fuse_experts`; other tensors pass through in order.
    """
    from rlkit.ckpt.experts import fuse_experts

    pending: dict[str, dict[str, Tensor]] = {}
    for name, tensor in named:
        match = _PER_EXPERT.match(name)
        if match is None:
            yield name, tensor
            continue
        layer = pending.setdefault(match["prefix"], {})
        layer[name] = tensor
        if len(layer) == 3 * num_experts:
            yield from fuse_experts(pending.pop(match["prefix"])).items()
    if pending:
        raise KeyError(f"incomplete experts at the end of the stream: {sorted(pending)}")


def bucketize(named: Iterable[tuple[str, Tensor]], *, bucket_bytes: int) -> Iterator[dict[str, Tensor]]:
    """Group ``(name, tensor)`` pairs into dicts of at most ``bucket_bytes`` (a larger tensor travels alone)."""
    bucket: dict[str, Tensor] = {}
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        if name in bucket:
            raise ValueError(f"tensor {name!r} emitted twice in one sync")
        bucket[name] = tensor
        size += nbytes
    if bucket:
        yield bucket


def hf_weight_buckets(
    model: torch.nn.Module | Mapping[str, Tensor],
    hf_config: Any,
    *,
    config: WeightSyncConfig = WeightSyncConfig(),
    layout: Any = None,
    groups: SyncGroups | None = None,
) -> Iterator[dict[str, Tensor]]:
    """The whole pipeline: :func:`iter_hf_tensors` -> :func:`apply_fp8` -> experts fused if asked -> buckets.

    Every rank of the model's TP/EP groups must consume the iterator to the end (collectives inside).
    """
    named = iter_hf_tensors(model, hf_config, layout=layout, groups=groups)
    named = apply_fp8(named, mode=config.fp8, block=config.fp8_block, compile=config.fp8_compile)
    if config.fused_experts:
        num_experts = family_for_config(hf_config_dict(hf_config)).dims(hf_config_dict(hf_config)).experts
        named = fuse_experts_stream(named, num_experts=num_experts)
    return bucketize(named, bucket_bytes=config.bucket_bytes)


class _Counted:
    """Counts what passes through a bucket iterator."""

    def __init__(self, buckets: Iterable[Mapping[str, Tensor]]) -> None:
        self.buckets, self.num_tensors, self.num_bytes, self.num_buckets = buckets, 0, 0, 0

    def __iter__(self) -> Iterator[Mapping[str, Tensor]]:
        for bucket in self.buckets:
            self.num_buckets += 1
            self.num_tensors += len(bucket)
            self.num_bytes += sum(t.numel() * t.element_size() for t in bucket.values())
            yield bucket

    def stats(self, start: float, device: torch.device | None) -> SyncStats:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return SyncStats(self.num_tensors, self.num_bytes, self.num_buckets, time.perf_counter() - start)


def _model_device(model: torch.nn.Module | Mapping[str, Tensor]) -> torch.device | None:
    tensors = model.parameters() if isinstance(model, torch.nn.Module) else iter(model.values())
    first = next(tensors, None)
    return None if first is None else first.device


# --- delivery -------------------------------------------------------------------------------------------------


def sync_colocated(
    model: torch.nn.Module | Mapping[str, Tensor],
    engine: Any | None,
    hf_config: Any,
    *,
    config: WeightSyncConfig = WeightSyncConfig(),
    layout: Any = None,
    groups: SyncGroups | None = None,
) -> SyncStats:
    """Copy the trainer's weights into an engine on the same device, bucket by bucket, in place.

    Args:
        model: the megatron-core model (or this rank's local tensors).
        engine: an engine with ``load_weight_buckets(buckets)`` (:class:`~rlkit.rollout.engines.embedded.
            EmbeddedEngine`) holding an HF model of the same config, or None on a rank without an engine (it
            still takes part in the gathers).
        hf_config: the HF config of the model.
        config: buckets, FP8 and expert layout (an embedded BF16 engine takes ``fp8`` ``off`` or ``roundtrip``).
        layout: the model's parallel layout (default one rank).
        groups: the model's process groups.

    Returns:
        :class:`SyncStats` of this rank (after a CUDA synchronize, so ``seconds`` is the full time).
    """
    if engine is not None and not hasattr(engine, "load_weight_buckets"):
        raise TypeError(f"{type(engine).__name__} has no load_weight_buckets; colocated sync needs an EmbeddedEngine")
    if engine is not None and config.fp8 == "quantize":
        raise ValueError(
            "fp8='quantize' emits FP8 weights and scale_inv tensors, which a BF16 engine cannot hold; "
            "use fp8='roundtrip' to run FP8-rounded weights in the embedded engine"
        )
    start = time.perf_counter()
    counted = _Counted(hf_weight_buckets(model, hf_config, config=config, layout=layout, groups=groups))
    if engine is None:
        for _ in counted:
            pass
    else:
        engine.load_weight_buckets(counted)
    return counted.stats(start, _model_device(model))


def sync_decoupled(
    model: torch.nn.Module | Mapping[str, Tensor],
    engine: Any | None,
    hf_config: Any,
    *,
    config: WeightSyncConfig = WeightSyncConfig(),
    layout: Any = None,
    groups: SyncGroups | None = None,
) -> SyncStats:
    """Broadcast the trainer's weights to an engine in another process, bucket by bucket.

    The engine (on the sending rank only, usually global rank 0) is a
    :class:`~rlkit.rollout.engines.process.ProcessEngine` whose ``init_weight_group`` was called; every other
    rank of the model's groups passes ``engine=None`` and only takes part in the gathers.

    Raises:
        ValueError: pp > 1 without ``groups.pp`` (the sender would only have its own stage).
    """
    if as_layout(layout or Layout()).pp > 1 and (groups is None or groups.pp is None):
        raise ValueError(
            "sync_decoupled with pp>1 needs groups.pp (the pipeline group) so that the sender gathers every stage; "
            "megatron_layout_and_groups(model.config) sets it"
        )
    if engine is not None and not hasattr(engine, "update_weights_by_broadcast"):
        raise TypeError(f"{type(engine).__name__} has no update_weights_by_broadcast; pass a ProcessEngine")
    start = time.perf_counter()
    counted = _Counted(hf_weight_buckets(model, hf_config, config=config, layout=layout, groups=groups))
    if engine is None:
        for _ in counted:
            pass
    else:
        engine.update_weights_by_broadcast(counted)
    return counted.stats(start, _model_device(model))
