"""Build a megatron-core ``GPTModel`` from an HF config and load HF weights through :mod:`rlkit.ckpt`.

The layer spec is megatron-core's *local* spec (no Transformer Engine, no Apex) with one change: its
core attention is :class:`PackedCoreAttention`, which accepts THD-packed input (``PackedSeqParams``
with ``qkv_format="thd"``) through :func:`rlkit.parallel.megatron.attention.packed_causal_attention`,
and padded ``[S, B]`` input through causal SDPA. Weights are converted in memory by
:func:`rlkit.ckpt.convert.hf_to_megatron`, so the names and fusions (QKV interleaved per query group,
``[gate; up]``) are the same table the checkpoint converter uses.

Supported: Qwen3 dense (``model_type="qwen3"``) and Qwen3-MoE with every layer sparse
(``model_type="qwen3_moe"``, ``SequentialMLP`` experts run as grouped GEMMs, no load-balancing loss), under
any TP (with or without sequence parallelism), PP, CP, EP and DP layout that megatron-core accepts: every rank builds
its own part (:func:`build_gpt_model`) after :func:`init_model_parallel` created the groups.
megatron-core is imported inside the functions (``pip install "rlkit[megatron]"``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit._optional import require
from rlkit.parallel.megatron.grouped_experts import pack_local_expert_weights
from rlkit.parallel.megatron.spec import FusedRMSNorm, gpt_layer_spec

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


def _megatron(purpose: str):
    return require("megatron.core", purpose=purpose)


def hf_config_dict(hf_config: Any) -> dict[str, Any]:
    """An HF ``PretrainedConfig`` or a plain ``config.json`` dict, as a dict."""
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def _rope_theta(config: Mapping[str, Any]) -> float:
    # transformers 5 nests it under rope_parameters; 4.x and config.json files keep rope_theta at the top.
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("the HF config has neither rope_parameters.rope_theta nor rope_theta")
    if params.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ValueError(f"rope scaling {params or config.get('rope_scaling')} is not supported; use plain RoPE")
    return float(theta)


def transformer_config_from_hf(hf_config: Any, *, params_dtype: torch.dtype = torch.float32, **overrides: Any):
    """megatron-core ``TransformerConfig`` equivalent to an HF Qwen3 config.

    Args:
        hf_config: HF config object or dict with ``model_type="qwen3"``.
        params_dtype: parameter dtype (float32, or bfloat16 with ``bf16=True`` set for you).
        **overrides: extra ``TransformerConfig`` fields (e.g. ``recompute_granularity``).

    Returns:
        A ``megatron.core.transformer.TransformerConfig`` with dropout off and the fused CUDA-only
        kernels disabled (they need Apex/TE).
    """
    cfg = hf_config_dict(hf_config)
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={cfg.get('model_type')!r} is not supported by the megatron backend yet; "
            f"supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported (Qwen3 has no QKV bias)")
    transformer_config = _megatron("building a megatron-core model").transformer.TransformerConfig
    heads = cfg["num_attention_heads"]
    fields = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg["rms_norm_eps"],
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Weights come from the checkpoint: skip megatron's init (it needs the CUDA RNG tracker).
        perform_initialization=False,
        use_cpu_initialization=True,
        # Fused kernels below come from Apex / TE / CUDA-only JIT paths, absent from the local spec.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    if cfg["model_type"] == "qwen3_moe":
        fields.update(_moe_fields(cfg))
    fields.update(overrides)
    return transformer_config(**fields)


def _moe_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE routing in megatron-core terms (transformers' ``Qwen3MoeSparseMoeBlock``).

    HF: ``p = softmax(router logits)`` over all experts, keep the top-k, renormalise them when
    ``norm_topk_prob``. Renormalised top-k of a softmax equals the softmax of the top-k logits, which
    is megatron's ``moe_router_pre_softmax=False``; without renormalisation it is ``pre_softmax=True``.
    """
    from rlkit.ckpt.mappings.qwen3_moe import num_experts

    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"mlp_only_layers={cfg.get('mlp_only_layers')}, decoder_sparse_step={cfg.get('decoder_sparse_step')}: "
            "only all-sparse Qwen3-MoE is supported (mlp_only_layers=[] and decoder_sparse_step=1)"
        )
    return dict(
        num_moe_experts=num_experts(cfg),
        moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_router_pre_softmax=not cfg.get("norm_topk_prob", True),
        moe_router_score_function="softmax",
        # The RL loss is the objective; a load-balancing loss would make the gradient differ from HF's.
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        # allgather: no CUDA side stream (alltoall creates one at construction, which fails on CPU).
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",
    )


def _layer_spec(config, *, fused: bool, compiled_sublayers: bool, grouped_experts: bool):
    """The decoder's block spec: :func:`gpt_layer_spec` layers, with the fused spec a fused final norm.

    The final norm is then a :class:`FusedRMSNorm` (HF's float32 order, the weight in the parameters' dtype,
    and SP-aware: under SP its weight is marked ``sequence_parallel``, its gradient summed over TP;
    megatron's local torch norm refuses SP).
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if config.sequence_parallel and not fused:
        raise ValueError("sequence_parallel=True needs the fused spec (fused=True): megatron's local norm refuses SP")
    spec = gpt_layer_spec(
        num_experts=config.num_moe_experts,
        fused=fused,
        compiled_sublayers=compiled_sublayers,
        grouped_experts=grouped_experts,
    )
    if not fused:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=FusedRMSNorm)


def init_model_parallel(
    plan: Any = None,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    seed: int = 1234,
) -> None:
    """Initialise ``torch.distributed`` (single process if not launched by torchrun) and megatron's groups.

    The world is ``tp * cp * dp * pp`` ranks for attention and dense layers and ``etp * ep * edp * pp``
    for the experts (megatron-core's order ``tp-cp-ep-dp-pp``); ``dp`` and ``edp`` follow from the world size.
    On CPU the process group is gloo, the CUDA RNG tracker is left alone and megatron-core's CUDA-only
    allocations are redirected (:mod:`rlkit.parallel.megatron.distributed`); on CUDA it is NCCL, one GPU per
    ``LOCAL_RANK``, and the tracker is seeded.

    Args:
        plan: a :class:`rlkit.parallel.plan.ParallelPlan` (its ``tp``, ``pp``, ``cp``, ``ep``, ``expert_tp``);
            give either a plan or the sizes below.
        tensor_model_parallel_size: TP.
        pipeline_model_parallel_size: PP.
        context_parallel_size: CP.
        expert_model_parallel_size: EP.
        expert_tensor_parallel_size: expert TP (``None``: equal to TP, megatron's default).
        seed: model-parallel CUDA RNG seed.

    Raises:
        ValueError: if the sizes do not divide the world, or megatron's groups already exist with other sizes.
    """
    import torch.distributed as dist

    core = _megatron("initialising model parallelism")
    from megatron.core import parallel_state

    sizes = dict(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    if plan is not None:
        if any(v not in (1, None) for v in sizes.values()):
            raise ValueError("give either plan= or the *_parallel_size arguments, not both")
        if plan.vpp is not None:
            raise ValueError(f"plan.vpp={plan.vpp}: virtual pipeline stages are not supported by rlkit's step yet")
        sizes = dict(
            tensor_model_parallel_size=plan.tp,
            pipeline_model_parallel_size=plan.pp,
            context_parallel_size=plan.cp,
            expert_model_parallel_size=plan.ep,
            expert_tensor_parallel_size=plan.expert_tp,
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            store = os.path.join(tempfile.mkdtemp(prefix="rlkit-megatron-"), "store")
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    tp, pp = sizes["tensor_model_parallel_size"], sizes["pipeline_model_parallel_size"]
    cp, ep = sizes["context_parallel_size"], sizes["expert_model_parallel_size"]
    etp = sizes["expert_tensor_parallel_size"] or tp
    if world % (tp * cp * pp) or world % (etp * ep * pp):
        raise ValueError(
            f"world size {world} must be divisible by tp*cp*pp = {tp}*{cp}*{pp} and by etp*ep*pp = {etp}*{ep}*{pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if have != (tp, pp, cp, ep):
            raise ValueError(
                f"megatron's groups exist with (tp, pp, cp, ep) = {have}, asked for {(tp, pp, cp, ep)}; "
                "call megatron.core.parallel_state.destroy_model_parallel() first"
            )
    else:
        parallel_state.initialize_model_parallel(**sizes)
    if torch.cuda.is_available():
        core.tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from rlkit.parallel.megatron.cpu_patches import apply_cpu_patches
        from rlkit.parallel.megatron.distributed import apply_cpu_distributed_patches

        apply_cpu_patches()
        apply_cpu_distributed_patches()


def build_gpt_model(
    hf_config: Any,
    *,
    hf_state_dict: Mapping[str, Tensor] | None = None,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    sequence_parallel: bool = False,
    fused: bool = True,
    compiled_sublayers: bool = True,
    grouped_experts: bool = True,
    **config_overrides: Any,
):
    """This rank's part of a megatron-core ``GPTModel`` equivalent to an HF Qwen3 / Qwen3-MoE model.

    Call :func:`init_model_parallel` first; the TP, PP, CP, EP and expert-TP sizes and this rank's
    coordinates are read from megatron's parallel state. The model holds this rank's tensor-parallel
    shards, its pipeline stage (``pre_process`` on the first stage, ``post_process`` on the last; the
    decoder layers numbered from megatron's layer offset), and its ``num_experts / ep`` local experts.
    With tied embeddings and PP > 1, the last stage holds megatron's copy of the embedding as its output
    layer (kept equal by summing its gradient over the embedding group, see
    :func:`rlkit.parallel.megatron.distributed.finalize_grads`).

    Args:
        hf_config: HF config object or dict.
        hf_state_dict: HF tensors by name (checkpoint names, or a transformers-5 ``model.state_dict()``
            with fused experts); converted with :func:`rlkit.ckpt.convert.hf_to_megatron` under the
            matching :class:`~rlkit.ckpt.convert.Layout`, and this rank's ``(pp, tp, ep)`` shard is
            loaded strictly.
        params_dtype: parameter dtype.
        device: where the model lives.
        sequence_parallel: megatron sequence parallelism (needs TP > 1; the packed stream is padded to a
            multiple of ``cp * tp`` tokens by the step).
        fused: rlkit's fused local spec (:func:`rlkit.parallel.megatron.spec.gpt_layer_spec`); ``False``:
            megatron-core's stock local modules (no SP), the baseline of ``benchmarks/megatron_step.py``.
        compiled_sublayers: with ``fused``, each layer's sublayers run as compiled regions where they apply
            (:mod:`rlkit.parallel.megatron.fused_layer`); ``False`` runs the fused modules one by one.
        grouped_experts: MoE only: the routed experts of a layer run as two grouped GEMMs
            (:mod:`rlkit.parallel.megatron.grouped_experts`, same parameters); ``False`` keeps megatron's
            per-expert ``SequentialMLP`` loop.
        **config_overrides: passed to :func:`transformer_config_from_hf`; among them megatron's uneven
            pipeline split, ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``
            (slime's ``--decoder-first/last-pipeline-num-layers``; the other stages split the rest evenly),
            which the weights' conversion follows.

    Returns:
        The ``GPTModel``; its output layer covers this TP rank's ``V' / tp`` columns of the padded vocabulary
        ``V'`` (``make_vocab_size_divisible_by`` 128 times ``tp``). ``calculate_per_token_loss`` is on: rlkit's
        losses carry the global normalizer, so megatron's schedules must not rescale them.
    """
    from rlkit.ckpt.convert import hf_to_megatron, padded_vocab_size

    gpt = require("megatron.core.models.gpt", purpose="building a megatron-core GPTModel")
    from megatron.core import parallel_state

    from rlkit.parallel.megatron.cpu_patches import apply_cpu_patches, define_missing_te_names

    if not parallel_state.model_parallel_is_initialized():
        raise ValueError("megatron's parallel groups are not initialised: call init_model_parallel() first")
    define_missing_te_names()
    on_cpu = torch.device(device).type == "cpu" or not torch.cuda.is_available()
    if on_cpu:
        from rlkit.parallel.megatron.distributed import apply_cpu_distributed_patches

        apply_cpu_patches()
        apply_cpu_distributed_patches()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel=True needs tensor parallelism (tp > 1); init_model_parallel with tp >= 2")
    cfg = hf_config_dict(hf_config)
    is_moe = cfg.get("model_type") == "qwen3_moe"
    parallel = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sequence_parallel,
        # THD micro-batches differ in length: the pipeline schedule sends each activation's shape first.
        # megatron refuses that with the allgather MoE dispatcher, so MoE under PP pads every micro-batch of
        # the step to one length instead (the step reads config.variable_seq_lengths).
        variable_seq_lengths=pp > 1 and not is_moe,
        pipeline_dtype=params_dtype if pp > 1 else None,
        calculate_per_token_loss=True,
    )
    if pp > 1 and not is_moe:
        # Unused by a dense model, but megatron validates variable_seq_lengths against the dispatcher type.
        parallel["moe_token_dispatcher_type"] = "alltoall"
    parallel.update(config_overrides)
    config = transformer_config_from_hf(cfg, params_dtype=params_dtype, **parallel)
    if config.num_moe_experts is None and ep > 1:
        raise ValueError(f"expert_model_parallel_size={ep} needs a MoE model; {cfg['model_type']} has no experts")
    layout = megatron_layout(config)
    model = gpt.GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(
            config, fused=fused, compiled_sublayers=compiled_sublayers, grouped_experts=grouped_experts
        ),
        vocab_size=padded_vocab_size(cfg["vocab_size"], layout),
        max_sequence_length=cfg["max_position_embeddings"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        rotary_base=_rope_theta(cfg),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
    )
    _mark_tensor_parallel_weights(model)
    if hf_state_dict is not None:
        shards = hf_to_megatron(hf_state_dict, cfg, layout=layout)
        rank = (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_expert_model_parallel_rank(),
        )
        state = {k: v.to(params_dtype) for k, v in shards[rank].items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Megatron registers TE-style `_extra_state` buffers; they are not weights.
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(
                f"HF -> megatron weights of rank (pp, tp, ep) = {rank} do not match the model: missing {missing}, "
                f"unexpected {unexpected}"
            )
    model = model.to(device)
    # inv_freq is a plain attribute (not a buffer) that .to() leaves behind; place it with the weights.
    model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.to(device)
    pack_local_expert_weights(model)
    return model


def megatron_layout(config: Any):
    """The :class:`~rlkit.ckpt.convert.Layout` of megatron-core's parallel state and a model's pipeline split.

    Sizes come from megatron's parallel state (call :func:`init_model_parallel` first); the first and last
    pipeline stages' layer counts from ``config`` (the model's ``TransformerConfig``, ``model.config``),
    which megatron's parallel state does not hold; required with more than one stage.
    """
    from megatron.core import parallel_state as ps

    from rlkit.ckpt.convert import Layout

    if config is None and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError(
            "with pipeline parallelism pass the model's config (model.config): the stages' layer counts "
            "(num_layers_in_first/last_pipeline_stage) are not in megatron's parallel state"
        )
    for unsupported in ("pipeline_model_parallel_layout", "virtual_pipeline_model_parallel_size"):
        if getattr(config, unsupported, None) is not None:
            raise ValueError(f"{unsupported}={getattr(config, unsupported)!r} is not supported by rlkit's layouts")
    for unsupported in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        if getattr(config, unsupported, False):
            raise ValueError(f"{unsupported}=True is not supported by rlkit's layouts (layers only per stage)")
    return Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        decoder_first_pipeline_num_layers=getattr(config, "num_layers_in_first_pipeline_stage", None),
        decoder_last_pipeline_num_layers=getattr(config, "num_layers_in_last_pipeline_stage", None),
    )


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes on the TP-split weights.

    megatron-core sets them inside its weight initialisation, which ``perform_initialization=False`` skips;
    without them every TP rank's weight looks like a replica to ``param_is_not_tensor_parallel_duplicate``
    (the gradient norm and megatron's optimizers would count only TP rank 0's shard).
    """
    from megatron.core import tensor_parallel

    split_dims = (
        (tensor_parallel.VocabParallelEmbedding, 0),
        (tensor_parallel.ColumnParallelLinear, 0),
        (tensor_parallel.RowParallelLinear, 1),
    )
    for module in model.modules():
        for cls, dim in split_dims:
            weight = getattr(module, "weight", None)
            if isinstance(module, cls) and weight is not None and not hasattr(weight, "tensor_model_parallel"):
                tensor_parallel.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
