"""Build a megatron-core ``GPTModel`` from an HF config and load HF weights through :mod:`rlkit.ckpt`.

The layer spec is megatron-core's *local* spec (no Transformer Engine, no Apex) with one change: its
core attention is :class:`PackedCoreAttention`, which accepts THD-packed input (``PackedSeqParams``
with ``qkv_format="thd"``) through :func:`rlkit.parallel.megatron.attention.packed_causal_attention`,
and padded ``[S, B]`` input through causal SDPA. Weights are converted in memory by
:func:`rlkit.ckpt.convert.hf_to_megatron`, so the names and fusions (QKV interleaved per query group,
``[gate; up]``) are the same table the checkpoint converter uses.

Supported: Qwen3 dense (``model_type="qwen3"``) and Qwen3-MoE with every layer sparse
(``model_type="qwen3_moe"``, ``SequentialMLP`` experts, no load-balancing loss); TP = PP = EP = 1
(single process, the model-parallel groups of size one). megatron-core is imported inside the
functions (``pip install "rlkit[megatron]"``).
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
from rlkit.parallel.megatron.spec import gpt_layer_spec

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


def init_model_parallel(*, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Initialise ``torch.distributed`` (single process if not launched by torchrun) and megatron's groups.

    On CPU the process group is gloo and the CUDA RNG tracker is left alone (see
    :mod:`rlkit.parallel.megatron.cpu_patches`); on CUDA it is NCCL and the tracker is seeded.
    """
    import torch.distributed as dist

    core = _megatron("initialising model parallelism")
    from megatron.core import parallel_state

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            store = os.path.join(tempfile.mkdtemp(prefix="rlkit-megatron-"), "store")
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
        )
    if torch.cuda.is_available():
        core.tensor_parallel.model_parallel_cuda_manual_seed(1234)
    else:
        from rlkit.parallel.megatron.cpu_patches import apply_cpu_patches

        apply_cpu_patches()


def build_gpt_model(
    hf_config: Any,
    *,
    hf_state_dict: Mapping[str, Tensor] | None = None,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
):
    """A megatron-core ``GPTModel`` (TP = PP = 1) equivalent to an HF Qwen3 / Qwen3-MoE model, optionally with weights.

    Call :func:`init_model_parallel` first.

    Args:
        hf_config: HF config object or dict.
        hf_state_dict: HF tensors by name (checkpoint names, or a transformers-5 ``model.state_dict()``
            with fused experts, which the converter accepts as they are); converted with
            :func:`rlkit.ckpt.convert.hf_to_megatron` and loaded strictly.
        params_dtype: parameter dtype.
        device: where the model lives.
        **config_overrides: passed to :func:`transformer_config_from_hf`.

    Returns:
        The ``GPTModel``; its output layer covers the padded vocabulary (``make_vocab_size_divisible_by`` 128).
    """
    from rlkit.ckpt.convert import Layout, hf_to_megatron, padded_vocab_size

    gpt = require("megatron.core.models.gpt", purpose="building a megatron-core GPTModel")
    from rlkit.parallel.megatron.cpu_patches import apply_cpu_patches, define_missing_te_names

    define_missing_te_names()
    if torch.device(device).type == "cpu" or not torch.cuda.is_available():
        apply_cpu_patches()
    cfg = hf_config_dict(hf_config)
    config = transformer_config_from_hf(cfg, params_dtype=params_dtype, **config_overrides)
    model = gpt.GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(num_experts=config.num_moe_experts),
        vocab_size=padded_vocab_size(cfg["vocab_size"], Layout()),
        max_sequence_length=cfg["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=_rope_theta(cfg),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
    )
    if hf_state_dict is not None:
        shards = hf_to_megatron(hf_state_dict, cfg)
        state = {k: v.to(params_dtype) for k, v in shards[(0, 0, 0)].items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Megatron registers TE-style `_extra_state` buffers; they are not weights.
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(
                f"HF -> megatron weights do not match the model: missing {missing}, unexpected {unexpected}"
            )
    model = model.to(device)
    # inv_freq is a plain attribute (not a buffer) that .to() leaves behind; place it with the weights.
    model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.to(device)
    return model
