"""Apply a family mapping under a parallel layout: HF <-> megatron-core per-rank state dicts.

One conversion *unit* is one megatron tensor of the full model (a rule instantiated at a layer, expert or MTP
index). Converting HF -> megatron a unit reads its HF tensors (checking each shape against the config), fuses
them (QKV interleaved per query group, ``[gate; up]``), pads the vocabulary, and cuts the result into the
tensor-parallel pieces of every rank that holds it. The reverse gathers the pieces, strips the padding and
splits the fusion. Units are processed one at a time, so memory is bounded by the largest unit plus the
writer's buffer, whatever the model size.

Layout: anything with integer attributes ``tp``, ``pp``, ``ep``, ``etp`` (and optionally
``decoder_first_pipeline_num_layers`` / ``decoder_last_pipeline_num_layers``,
``make_vocab_size_divisible_by``) works, e.g. ``rlkit.parallel.plan.ParallelPlan`` or :class:`Layout`.
A rank is ``(pp_rank, tp_rank, ep_rank)``; its state dict uses megatron-core names with *local* indices:
decoder layers are numbered within the pipeline stage, experts within the expert-parallel rank
(``SequentialMLP``'s ``local_experts.{j}``, global expert ``ep_rank * experts_per_rank + j``). Expert
weights are split by ``etp`` (1 or ``tp``); with ``etp=1`` every tensor-parallel rank holds whole experts.

References: megatron-core ``GPTModel`` / ``TransformerLayer`` / ``SelfAttention`` / ``MLASelfAttention`` /
``MoELayer`` state dicts (local spec); ``_vocab_size_with_padding`` in megatron's tokenizer utilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from rlkit.ckpt.mappings import Dims, Family, Rule
from rlkit.parallel.plan import padded_vocab_size as plan_padded_vocab_size

RankKey = tuple[int, int, int]  # (pp_rank, tp_rank, ep_rank)


class TensorSource(Protocol):
    """Anything that yields tensors by name: a dict or :class:`rlkit.ckpt.hf.SafetensorsReader`."""

    def __contains__(self, name: object) -> bool: ...  # noqa: D105

    def get(self, name: str) -> Any: ...  # noqa: D102


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A sharding layout for conversion (a stand-in for ``ParallelPlan``; any duck-typed object works).

    Attributes:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        etp: expert tensor-parallel size, 1 or ``tp``.
        decoder_first_pipeline_num_layers: layers on the first stage (None: even split).
        decoder_last_pipeline_num_layers: layers on the last stage (None: even split).
        make_vocab_size_divisible_by: vocab is padded to a multiple of this times ``tp`` (megatron's default 128).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "etp", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.etp not in (1, self.tp):
            raise ValueError(f"etp={self.etp} must be 1 or tp={self.tp}; other expert-TP grids are not supported")


def as_layout(plan: Any) -> Layout:
    """Read a :class:`Layout` from any object with ``tp``/``pp``/``ep``/``etp`` attributes (duck typing)."""
    if isinstance(plan, Layout):
        return plan
    return Layout(
        tp=plan.tp,
        pp=plan.pp,
        ep=getattr(plan, "ep", 1),
        # ParallelPlan.etp=None means "same as tp"; its expert_tp property resolves that
        etp=getattr(plan, "expert_tp", None) or getattr(plan, "etp", None) or 1,
        decoder_first_pipeline_num_layers=getattr(plan, "decoder_first_pipeline_num_layers", None),
        decoder_last_pipeline_num_layers=getattr(plan, "decoder_last_pipeline_num_layers", None),
        make_vocab_size_divisible_by=getattr(plan, "make_vocab_size_divisible_by", 128),
    )


def stage_layers(num_layers: int, layout: Layout) -> list[range]:
    """Decoder layers of each pipeline stage: optional uneven first/last stage, the rest split evenly."""
    first, last = layout.decoder_first_pipeline_num_layers, layout.decoder_last_pipeline_num_layers
    sizes: list[int | None] = [None] * layout.pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    rest = num_layers - sum(s for s in sizes if s is not None)
    free = sizes.count(None)
    # Every stage holds at least one layer (megatron-core refuses middle stages without layers).
    if rest < 0 or (free and (rest % free or rest == 0)) or (not free and rest):
        raise ValueError(
            f"num_layers={num_layers} cannot be split over pp={layout.pp} with "
            f"decoder_first_pipeline_num_layers={first}, decoder_last_pipeline_num_layers={last}"
        )
    counts = [s if s is not None else rest // free for s in sizes]
    starts = [sum(counts[:i]) for i in range(layout.pp)]
    return [range(s, s + c) for s, c in zip(starts, counts, strict=True)]


def padded_vocab_size(vocab: int, layout: Layout) -> int:
    """Megatron's vocab padding under ``layout`` (:func:`rlkit.parallel.plan.padded_vocab_size`)."""
    return plan_padded_vocab_size(vocab, tp=layout.tp, divisible_by=layout.make_vocab_size_divisible_by)


@dataclass(frozen=True)
class Unit:
    """One megatron tensor of the full model: its rule, names, pipeline stage and expert index.

    Two kinds of unit are not one-to-one. A *replica* is a second megatron copy of a tensor converted elsewhere
    (the tied head on the last stage, the embedding on the MTP stage): written on import, not read back on
    export. A *copy* (``copy_of`` set) is an HF tensor duplicating the main HF tensor ``copy_of`` (an MTP layer's
    ``embed_tokens`` / ``shared_head.head``): it has no megatron tensor of its own; it is checked equal to
    ``copy_of`` on import and re-emitted from the megatron tensor ``local_name`` on ``stage`` on export.
    """

    rule: Rule
    megatron: str  # global name (global layer and expert indices)
    hf: tuple[str, ...]
    stage: int
    local_name: str  # name inside the stage / expert-parallel rank
    expert: int | None = None
    replica: bool = False
    copy_of: str | None = None


def iter_units(
    family: Family, config: Mapping[str, Any], layout: Layout, *, mtp: bool = True, mtp_copies: bool = True
) -> Iterator[Unit]:
    """Every megatron tensor of the model under ``layout``, layer by layer (tied head on pp>1 included).

    ``mtp=False`` leaves out the MTP layers (transformers does not load or save them, so a checkpoint written
    by ``save_pretrained`` lacks them; released checkpoints carry them). ``mtp_copies=False`` leaves out the
    MTP layers' HF copies of the embedding and head (:attr:`Rule.shares`), which some checkpoints omit.
    """
    dims = family.dims(config)
    if not mtp:
        dims = replace(dims, num_mtp=0)
    stages = stage_layers(dims.num_layers, layout)
    stage_of = {layer: s for s, r in enumerate(stages) for layer in r}
    last = layout.pp - 1
    rules = [r for r in family.rules if (r.when is None or config.get(r.when)) and (mtp_copies or r.shares is None)]
    global_rules = [r for r in rules if r.scope == "global"]
    # Layer-major order (embedding, layer 0 ... layer N-1, MTP, final norm and head) follows the order HF shards
    # store tensors in, so a streaming reader walks each shard file once.
    for rule in global_rules:
        if rule.megatron.startswith("embedding."):
            yield Unit(rule, rule.megatron, rule.hf, 0, rule.megatron)
    for layer, stage, mtp_prefix in _layer_slots(dims, stages, stage_of):
        moe = family.is_moe_layer(config, layer)
        for rule in rules:
            if rule.scope == "global" or (rule.scope == "mtp" and mtp_prefix is None):
                continue  # MTP-only tensors (enorm, hnorm, eh_proj) exist only in MTP layers
            if (rule.scope == "dense" and moe) or (rule.scope in ("moe", "expert") and not moe):
                continue
            yield from _instantiate(rule, layer, stage, mtp_prefix, stages, dims, layout)
    for rule in global_rules:
        if rule.megatron.startswith("embedding."):
            if dims.num_mtp and layout.pp > 1:
                # GPTModel builds an embedding on the MTP stage too (`pre_process or mtp_process`), tied to stage 0's.
                yield Unit(rule, rule.megatron, rule.hf, last, rule.megatron, replica=True)
            continue
        if rule.megatron == "output_layer.weight" and dims.tied:
            # Tied embeddings: megatron keeps a copy of the embedding on the last stage only when pp > 1.
            if layout.pp > 1:
                yield Unit(rule, rule.megatron, ("model.embed_tokens.weight",), last, rule.megatron, replica=True)
            continue
        yield Unit(rule, rule.megatron, rule.hf, last, rule.megatron)


def _layer_slots(dims: Dims, stages: list[range], stage_of: dict[int, int]) -> Iterator[tuple[int, int, str | None]]:
    # Decoder layers, then MTP layers (HF layer num_layers + k, megatron `mtp.layers.{k}` on the last stage).
    for layer in range(dims.num_layers):
        yield layer, stage_of[layer], None
    for k in range(dims.num_mtp):
        yield dims.num_layers + k, len(stages) - 1, f"mtp.layers.{k}"


def _instantiate(
    rule: Rule, layer: int, stage: int, mtp_prefix: str | None, stages: list[range], dims: Dims, layout: Layout
) -> Iterator[Unit]:
    local_layer = layer - stages[stage].start
    experts = range(dims.experts) if rule.scope == "expert" else [None]
    per_rank = dims.experts // layout.ep if dims.experts else 0
    for expert in experts:
        hf = tuple(t.format(layer=layer, expert=expert) for t in rule.hf)
        if mtp_prefix is not None:
            k = int(mtp_prefix.rsplit(".", 1)[1])
            if rule.shares is not None:
                yield _shared_copy_unit(rule, hf, dims, len(stages))
                continue
            if rule.scope == "mtp":
                name = rule.megatron.format(mtp=k)
                yield Unit(rule, name, hf, stage, name, expert)
                continue
            template = rule.megatron.replace("decoder.layers.{layer}", mtp_prefix + ".transformer_layer")
            name = template.format(expert=expert)
            local = template.format(expert=None if expert is None else expert % per_rank)
            yield Unit(rule, name, hf, stage, local, expert)
            continue
        name = rule.megatron.format(layer=layer, expert=expert)
        local = rule.megatron.format(layer=local_layer, expert=None if expert is None else expert % per_rank)
        yield Unit(rule, name, hf, stage, local, expert)


def _shared_copy_unit(rule: Rule, hf: tuple[str, ...], dims: Dims, num_stages: int) -> Unit:
    # The embedding lives on stage 0 (always), the untied head on the last stage; a tied head is the embedding.
    megatron, copy_of = rule.megatron, rule.shares
    if megatron == "output_layer.weight" and dims.tied:
        megatron, copy_of = "embedding.word_embeddings.weight", "model.embed_tokens.weight"
    stage = 0 if megatron.startswith("embedding.") else num_stages - 1
    return Unit(rule, megatron, hf, stage, megatron, copy_of=copy_of)


# --- tensor transforms --------------------------------------------------------------------------------------


def fuse(rule: Rule, tensors: list[torch.Tensor], dims: Dims) -> torch.Tensor:
    """HF tensors -> one full megatron tensor.

    ``qkv``: q ``[heads*d, ...]``, k and v ``[groups*d, ...]`` become ``[groups, (heads/groups + 2)*d, ...]``
    flattened, i.e. per query group ``[q heads of the group; k; v]`` (megatron-core ``linear_qkv``).
    ``gate_up``: ``cat([gate, up], 0)`` (megatron ``linear_fc1`` with ``gated_linear_unit``).
    """
    if rule.fuse == "copy":
        return tensors[0]
    if rule.fuse == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    g = dims.groups
    rest = q.shape[1:]
    grouped = [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def unfuse(rule: Rule, full: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    """Inverse of :func:`fuse`."""
    if rule.fuse == "copy":
        return [full]
    if rule.fuse == "gate_up":
        return list(full.chunk(2, dim=0))
    g, d = dims.groups, dims.head_dim
    rest = full.shape[1:]
    per_group = full.reshape(g, -1, *rest)
    q, k, v = per_group.split([dims.heads // g * d, d, d], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def shard(rule: Rule, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The tensor-parallel piece ``rank`` of ``size`` of a full (fused, vocab-padded) megatron tensor.

    ``column`` splits dim 0 (a ``[gate; up]`` tensor splits gate and up separately, so each rank holds
    ``[gate_r; up_r]``), ``row`` splits dim 1, ``vocab`` dim 0.
    """
    if rule.split == "replicated" or size == 1:
        return full
    if rule.split == "row":
        return full.chunk(size, dim=1)[rank].contiguous()
    if rule.fuse == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=0)[rank].contiguous()


def unshard(rule: Rule, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` given the pieces of every rank in rank order."""
    if rule.split == "replicated" or len(pieces) == 1:
        return pieces[0]
    if rule.split == "row":
        return torch.cat(pieces, dim=1)
    if rule.fuse == "gate_up":
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=0)


def split_size(unit: Unit, layout: Layout) -> int:
    """How many pieces a unit is cut into: ``etp`` for routed experts, ``tp`` otherwise."""
    return layout.etp if unit.expert is not None else layout.tp


def unit_ranks(unit: Unit, dims: Dims, layout: Layout) -> Iterator[tuple[RankKey, int]]:
    """``((pp, tp, ep), piece)`` for every rank holding the unit and the piece index it holds.

    Non-expert tensors are on every expert-parallel rank of their stage; a routed expert only on
    ``expert // (experts / ep)``.
    """
    ep_ranks = [unit.expert // (dims.experts // layout.ep)] if unit.expert is not None else range(layout.ep)
    size = split_size(unit, layout)
    for ep_rank in ep_ranks:
        for tp_rank in range(layout.tp):
            yield (unit.stage, tp_rank, ep_rank), tp_rank % size


# --- HF -> megatron -------------------------------------------------------------------------------------------


def read_hf_unit(unit: Unit, source: TensorSource, dims: Dims) -> list[torch.Tensor]:
    """Load a unit's HF tensors, raising an error that names a missing or mis-shaped tensor and its shape."""
    tensors = []
    origin = getattr(source, "origin", lambda _: None)  # PerExpertView: the fused tensor a name is read from
    for name, expr in zip(unit.hf, unit.rule.shapes, strict=True):
        expected = dims.shape(expr)
        if name not in source:
            raise KeyError(f"HF tensor {name!r} (expected shape {expected}) is missing; it feeds {unit.megatron}")
        tensor = source.get(name)
        if tuple(tensor.shape) != expected:
            fused = f" (a slice of the fused {origin(name)!r})" if origin(name) else ""
            raise ValueError(
                f"HF tensor {name!r}{fused} has shape {tuple(tensor.shape)}, expected {expected} from the config "
                f"(it feeds {unit.megatron}); is config.json the one this checkpoint was saved with?"
            )
        tensors.append(tensor)
    return tensors


def full_megatron_tensor(unit: Unit, source: TensorSource, dims: Dims, layout: Layout) -> torch.Tensor:
    """The fused, vocab-padded megatron tensor of one unit (all TP pieces together)."""
    full = fuse(unit.rule, read_hf_unit(unit, source, dims), dims)
    if unit.rule.split == "vocab":
        pad = padded_vocab_size(dims.vocab, layout) - full.shape[0]
        full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])]) if pad else full
    return full


def check_layout(family: Family, config: Mapping[str, Any], layout: Layout) -> Dims:
    """Validate that ``layout`` divides the model; returns its :class:`Dims`."""
    dims = family.dims(config)
    if dims.groups % layout.tp:
        raise ValueError(f"tp={layout.tp} does not divide num_key_value_heads={dims.groups}; pick tp dividing it")
    if dims.experts and dims.experts % layout.ep:
        raise ValueError(f"ep={layout.ep} does not divide the {dims.experts} routed experts; pick ep dividing it")
    stage_layers(dims.num_layers, layout)
    return dims


def has_mtp_hf(source: TensorSource, dims: Dims) -> bool:
    """Whether an HF checkpoint carries its MTP layers (``model.layers.{num_layers}.enorm.weight``)."""
    return dims.num_mtp > 0 and f"model.layers.{dims.num_layers}.enorm.weight" in source


def has_mtp_copies(source: TensorSource, family: Family, dims: Dims) -> bool:
    """Whether an HF checkpoint with MTP layers carries every MTP copy of a main tensor (:attr:`Rule.shares`).

    DeepSeek-V3 and GLM-4.5 releases do; a checkpoint lacking any of them is converted without them (megatron
    uses the main tensors anyway) and exported without them.
    """
    names = [
        t.format(layer=dims.num_layers + k) for r in family.rules if r.shares for t in r.hf for k in range(dims.num_mtp)
    ]
    return has_mtp_hf(source, dims) and all(name in source for name in names)


def check_hf_copy(unit: Unit, source: TensorSource, dims: Dims) -> None:
    """Check that an HF copy unit equals the main tensor it duplicates; the error names both tensors."""
    (copy,) = read_hf_unit(unit, source, dims)
    if unit.copy_of not in source:
        raise KeyError(f"HF tensor {unit.copy_of!r} is missing; {unit.hf[0]!r} is a copy of it")
    main = source.get(unit.copy_of)
    if copy.dtype != main.dtype or not torch.equal(copy, main):
        diff = (copy.double() - main.double()).abs().max().item()
        raise ValueError(
            f"HF tensor {unit.hf[0]!r} ({copy.dtype}) differs from {unit.copy_of!r} ({main.dtype}), max |diff| "
            f"{diff:.3g}; megatron-core's MTP layers share the main model's {unit.megatron}, so a checkpoint whose "
            "MTP copy differs cannot be represented: make the two equal or drop the copy"
        )


def has_mtp_megatron(shards: Mapping[RankKey, Any], layout: Layout) -> bool:
    """Whether megatron shards carry MTP layers (``mtp.layers.0.enorm.weight`` on the last stage)."""
    return "mtp.layers.0.enorm.weight" in shards.get((layout.pp - 1, 0, 0), {})


def accept_fused_experts(source: TensorSource) -> TensorSource:
    """Let a source with transformers-5 fused experts read under per-expert checkpoint names.

    Returns ``source`` itself, or a :class:`~rlkit.ckpt.experts.PerExpertView` of it when it holds fused experts
    (``mlp.experts.gate_up_proj`` ``[E, 2F, H]``, ``down_proj`` ``[E, H, F]``).
    """
    from rlkit.ckpt.experts import PerExpertView, has_fused_experts

    keys = getattr(source, "keys", None)
    return PerExpertView(source) if keys is not None and has_fused_experts(keys()) else source


def hf_to_megatron(
    hf: TensorSource, config: Mapping[str, Any], *, layout: Any = None, family: Family | None = None
) -> dict[RankKey, dict[str, torch.Tensor]]:
    """Convert an HF state dict (or lazy source) into megatron-core per-rank state dicts, in memory.

    Args:
        hf: HF checkpoint tensors by name (``dict`` or :class:`~rlkit.ckpt.hf.SafetensorsReader`). Routed
            experts may be per expert (checkpoint names) or fused as a live transformers-5 ``model.state_dict()``
            holds them (:mod:`rlkit.ckpt.experts`).
        config: the HF ``config.json`` as a dict; ``model_type`` picks the family unless ``family`` is given.
        layout: a :class:`Layout` or duck-typed plan (default: one rank).
        family: override the family dispatch.

    Returns:
        ``{(pp_rank, tp_rank, ep_rank): {megatron local name: tensor}}`` for every rank. Tensors of one rank
        may be views sharing storage with the input.
    """
    from rlkit.ckpt.mappings import family_for_config

    layout = as_layout(layout or Layout())
    family = family or family_for_config(config)
    dims = check_layout(family, config, layout)
    hf = accept_fused_experts(hf)
    out: dict[RankKey, dict[str, torch.Tensor]] = {
        (p, t, e): {} for p in range(layout.pp) for t in range(layout.tp) for e in range(layout.ep)
    }
    for unit in iter_units(
        family, config, layout, mtp=has_mtp_hf(hf, dims), mtp_copies=has_mtp_copies(hf, family, dims)
    ):
        if unit.copy_of is not None:
            check_hf_copy(unit, hf, dims)
            continue
        full = full_megatron_tensor(unit, hf, dims, layout)
        size = split_size(unit, layout)
        for rank, piece in unit_ranks(unit, dims, layout):
            out[rank][unit.local_name] = shard(unit.rule, full, piece, size)
    return out


def megatron_to_hf(
    shards: Mapping[RankKey, Mapping[str, torch.Tensor]],
    config: Mapping[str, Any],
    *,
    layout: Any = None,
    family: Family | None = None,
    mtp_shared_copies: bool = True,
    fused_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """Gather megatron-core per-rank state dicts back into one HF state dict (inverse of :func:`hf_to_megatron`).

    Args:
        shards: ``{(pp_rank, tp_rank, ep_rank): state dict}``; ranks without routed experts may be omitted
            for ``ep_rank > 0``, since non-expert tensors are read from ``ep_rank`` 0.
        config: the HF config dict.
        layout: the layout the shards were cut with.
        family: override the family dispatch.
        mtp_shared_copies: with MTP layers, also emit their copies of the embedding and head
            (``model.layers.{L}.embed_tokens.weight``, ``model.layers.{L}.shared_head.head.weight``) as released
            DeepSeek-V3 / GLM-4.5 checkpoints carry them; fresh tensors equal to the main ones.
        fused_experts: return routed experts as transformers 5 holds them in memory (``mlp.experts.gate_up_proj``
            ``[E, 2F, H]``, ``down_proj`` ``[E, H, F]``; :func:`rlkit.ckpt.experts.fuse_experts`), for
            ``load_state_dict`` into a live HF MoE model; default: per-expert checkpoint names.

    Returns:
        HF tensors by name, vocab padding removed; a tied head is not emitted.
    """
    from rlkit.ckpt.mappings import family_for_config

    layout = as_layout(layout or Layout())
    family = family or family_for_config(config)
    dims = check_layout(family, config, layout)
    out: dict[str, torch.Tensor] = {}
    units = iter_units(family, config, layout, mtp=has_mtp_megatron(shards, layout), mtp_copies=mtp_shared_copies)
    for unit in units:
        if unit.replica:
            continue
        for name, tensor in zip(unit.hf, hf_tensors_of_unit(unit, shards, dims, layout), strict=True):
            out[name] = tensor
    if fused_experts:
        from rlkit.ckpt.experts import fuse_experts

        return fuse_experts(out)
    return out


def hf_tensors_of_unit(
    unit: Unit, shards: Mapping[RankKey, Mapping[str, torch.Tensor]], dims: Dims, layout: Layout
) -> list[torch.Tensor]:
    """Gather one unit's TP pieces from ``shards``, strip vocab padding and un-fuse into HF tensors."""
    size = split_size(unit, layout)
    ep_rank = unit.expert // (dims.experts // layout.ep) if unit.expert is not None else 0
    pieces = []
    for tp_rank in range(size):
        rank = (unit.stage, tp_rank, ep_rank)
        if rank not in shards or unit.local_name not in shards[rank]:
            raise KeyError(f"megatron tensor {unit.local_name!r} (global {unit.megatron}) is missing on rank {rank}")
        pieces.append(shards[rank][unit.local_name])
    full = unshard(unit.rule, pieces)
    if unit.rule.split == "vocab":
        full = full[: dims.vocab]
    if unit.copy_of is not None:
        full = full.clone()  # its own storage: safetensors refuses tensors that share memory with another
    return unfuse(unit.rule, full, dims)


# --- command line ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m rlkit.ckpt.convert``: HF -> megatron shards (``--hf``) or back (``--megatron``)."""
    import argparse

    from rlkit.ckpt import stream
    from rlkit.ckpt.mappings import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m rlkit.ckpt.convert", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="HF checkpoint directory (config.json + safetensors) to convert to megatron")
    source.add_argument("--megatron", help="megatron checkpoint written by this tool, to convert back to HF")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="checked against config.json model_type")
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1, help=f"{name} size")
    parser.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    parser.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--max-buffer-mb", type=int, default=1024, help="write buffer of all shards together")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.hf is not None:
        layout = Layout(
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            etp=args.etp,
            decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )
        stats = stream.convert_hf_to_megatron(
            args.hf,
            args.out,
            layout=layout,
            family=args.family,
            max_buffer_bytes=args.max_buffer_mb << 20,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    else:
        stats = stream.convert_megatron_to_hf(
            args.megatron,
            args.out,
            max_shard_bytes=args.max_buffer_mb << 20,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    print(stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
