"""megatron-core's local GPT layer spec, with rlkit's packed (THD) core attention and fused elementwise modules.

The local spec uses no Transformer Engine and no Apex. :func:`gpt_layer_spec` swaps its core attention
for :func:`rlkit.parallel.megatron.attention.packed_core_attention_class` (THD input) and, with
``fused=True`` (the default), three of its modules for ones built on :mod:`rlkit.parallel.megatron.fused`:

* the layer norms and the per-head QK norms: :class:`FusedRMSNorm` (HF's float32 order, one kernel);
* the dense MLP: ``FusedMLP`` (``linear_fc1 -> swiglu -> linear_fc2``, SwiGLU as one kernel);
* self-attention: ``RotarySelfAttention`` applies RoPE itself, fused with the QK norm into one kernel
  per query/key, with positions computed on the GPU, instead of megatron's unfused per-sequence THD
  path (which reads ``cu_seqlens`` back to the host twice per layer).

The weights and their names are unchanged, so checkpoints and :mod:`rlkit.ckpt` mappings do not care which
spec built the model. ``fused=False`` gives megatron-core's stock local modules (the benchmark baseline).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rlkit._optional import require
from rlkit.parallel.megatron.attention import packed_core_attention_class
from rlkit.parallel.megatron.context_parallel import cp_local_positions
from rlkit.parallel.megatron.fused import apply_rotary, packed_positions, rms_norm, rms_norm_rotary, swiglu
from rlkit.parallel.megatron.fused_layer import fused_transformer_layer_class
from rlkit.parallel.megatron.grouped_experts import with_grouped_experts


def gpt_layer_spec(
    *, num_experts: int | None = None, fused: bool = True, compiled_sublayers: bool = True, grouped_experts: bool = True
):
    """megatron-core's local GPT layer spec with :class:`PackedCoreAttention` as its core attention.

    RMSNorm, QK-norm, and ``SequentialMLP`` routed experts when ``num_experts`` is given.

    Args:
        num_experts: routed experts per MoE layer, or ``None`` for a dense MLP.
        fused: use :class:`FusedRMSNorm`, ``FusedMLP`` (dense only) and ``RotarySelfAttention``
            (module docstring); ``False`` keeps megatron-core's local modules.
        compiled_sublayers: with ``fused``, the layer is
            :class:`rlkit.parallel.megatron.fused_layer.FusedTransformerLayer`, which runs each sublayer as
            one compiled region where it applies (same modules and weights); ``False`` runs the modules one by one.
        grouped_experts: with ``num_experts``, the routed experts are
            :func:`rlkit.parallel.megatron.grouped_experts.grouped_sequential_mlp_class` (``SequentialMLP``'s
            parameters, two grouped GEMMs per layer where the device has them, else its loop); ``False`` keeps
            megatron's per-expert loop.
    """
    specs = require("megatron.core.models.gpt.gpt_layer_specs", purpose="the megatron layer spec")
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = packed_core_attention_class()
    if fused:
        if compiled_sublayers:
            spec.module = fused_transformer_layer_class()
        layer = spec.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = FusedRMSNorm
        attention.submodules.q_layernorm = attention.submodules.k_layernorm = FusedRMSNorm
        attention.module = rotary_self_attention_class()
        if num_experts is None:
            # A class, not a ModuleSpec: TransformerLayer passes no extra kwargs to it (and does not warn that
            # the subclass is an "unknown MLP type"); FusedMLP builds the local spec's linear layers itself.
            layer.mlp = fused_mlp_class()
    if num_experts is not None and grouped_experts:
        with_grouped_experts(spec)
    return spec


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm for megatron's spec (``WrappedTorchNorm``'s constructor), computed by :func:`fused.rms_norm`.

    The parameter is ``weight`` ``[D]``, as in ``torch.nn.RMSNorm``, so state dicts are interchangeable.
    Under sequence parallelism each rank normalises its own tokens and the weight carries
    ``sequence_parallel = True`` (megatron's convention for norms: its gradient is summed over TP).
    As a QK norm, its ``RotarySelfAttention`` sets ``rotary_angles`` for the duration of a forward;
    the norm then also applies RoPE in the same kernel (:func:`fused.rms_norm_rotary`).
    """

    rotary_angles: Tensor | None = None

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused_norm_options):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"FusedRMSNorm needs normalization='RMSNorm', got {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError(
                "FusedRMSNorm does not support layernorm_zero_centered_gamma; build the spec with fused=False"
            )
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``."""
        if self.rotary_angles is not None:
            return rms_norm_rotary(x, self.weight, self.eps, self.rotary_angles)
        return rms_norm(x, self.weight, self.eps)


@functools.cache
def fused_mlp_class():
    """megatron-core's ``MLP`` with its gated SiLU as one :func:`fused.swiglu` kernel (lazy: needs megatron)."""
    mlp = require("megatron.core.transformer.mlp", purpose="the fused MLP")
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class FusedMLP(mlp.MLP):
        """``linear_fc1 -> swiglu -> linear_fc2``; other activations, biases or per-token scales use ``MLP``.

        Built with the local spec's ``ColumnParallelLinear`` / ``RowParallelLinear`` and megatron's default
        tensor-parallel group (``tp_group=None``), as ``MLP`` is when no process-group collection is given.
        """

        def __init__(self, config, submodules=None, **kwargs):
            if submodules is None:
                submodules = mlp.MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
            kwargs.setdefault("ffn_hidden_size", config.ffn_hidden_size)
            super().__init__(config, submodules, **kwargs)

        def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs):
            """``[S, B, H] -> ([S, B, H], bias)``, as ``MLP.forward``."""
            config = self.config
            plain_swiglu = (
                config.gated_linear_unit
                and self.activation_func is torch.nn.functional.silu
                and not config.use_te_activation_func
                and config.activation_func_clamp_value is None
                and config.glu_linear_offset == 0
                and per_token_scale is None
            )
            if not plain_swiglu:
                return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
            intermediate, bias = self.linear_fc1(hidden_states)
            if bias is not None:
                intermediate = intermediate + bias
            return self.linear_fc2(swiglu(intermediate))

    return FusedMLP


def plain_rope(config, layer_number: int) -> bool:
    """Whether layer ``layer_number`` (1-based) applies plain RoPE: non-interleaved halves, unscaled, not MLA.

    The RoPE that :func:`rlkit.parallel.megatron.fused.apply_rotary_reference` computes; the fused attention
    paths (``RotarySelfAttention``, :mod:`rlkit.parallel.megatron.fused_layer`) take over only then.
    """
    attention = require("megatron.core.transformer.attention", purpose="the rotary self-attention")
    return not (
        config.rotary_interleaved
        or config.multi_latent_attention
        or (config.no_rope_freq and config.no_rope_freq[layer_number - 1])
        or attention._yarn_get_concentration_factor_from_config(config) != 1.0
    )


@functools.cache
def rotary_self_attention_class():
    """megatron-core's ``SelfAttention`` applying RoPE with :func:`fused.apply_rotary` (lazy: needs megatron)."""
    attention = require("megatron.core.transformer.attention", purpose="the rotary self-attention")

    class RotarySelfAttention(attention.SelfAttention):
        """``SelfAttention`` whose RoPE is one kernel per query/key, positions restarting per packed sequence.

        ``forward`` turns megatron's ``rotary_pos_emb`` (``freqs [S_max, 1, 1, D]``, angle of every
        position) into per-token angles (``[T, 1, 1, D]`` gathered at :func:`fused.packed_positions` for
        THD, the first ``S`` rows for padded input) and hides ``rotary_pos_emb`` from the parent. The
        rotation then happens right after the QK norms, which is where the parent applies it: inside
        the norms' kernel when both are :class:`FusedRMSNorm`, else in ``get_query_key_value_tensors``.
        Cases it does not cover (interleaved or scaled RoPE, inference, padded ``cu_seqlens``, padded rows
        under context parallelism, layers without RoPE) run the parent's path unchanged. Under sequence
        parallelism the angles cover the whole micro-batch (the queries come after ``linear_qkv``'s
        all-gather); under context parallelism this rank's tokens
        (:func:`rlkit.parallel.megatron.context_parallel.cp_local_positions`).
        """

        _rotary_angles: Tensor | None = None

        def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs):
            """As ``SelfAttention.forward`` (keyword arguments as ``TransformerLayer`` passes them)."""
            angles = self._angles_or_none(hidden_states, kwargs)
            if angles is None:
                return super().forward(hidden_states, attention_mask, **kwargs)
            norms = (self.q_layernorm, self.k_layernorm)
            in_norms = all(isinstance(norm, FusedRMSNorm) for norm in norms)
            if in_norms:
                for norm in norms:
                    norm.rotary_angles = angles
            else:
                self._rotary_angles = angles
            try:
                return super().forward(hidden_states, attention_mask, **{**kwargs, "rotary_pos_emb": None})
            finally:
                self._rotary_angles = None
                if in_norms:
                    for norm in norms:
                        norm.rotary_angles = None

        def get_query_key_value_tensors(self, *args, **kwargs):
            """The parent's ``(query, key, value)`` ``[S, B, H, D]``, with RoPE applied to query and key."""
            out = super().get_query_key_value_tensors(*args, **kwargs)
            if self._rotary_angles is None:
                return out
            query, key, value = out
            return apply_rotary(query, self._rotary_angles), apply_rotary(key, self._rotary_angles), value

        def _angles_or_none(self, hidden_states: Tensor, kwargs: dict) -> Tensor | None:
            freqs = kwargs.get("rotary_pos_emb")
            packed = kwargs.get("packed_seq_params")
            config = self.config
            if not isinstance(freqs, Tensor) or freqs.dim() != 4 or freqs.shape[1:3] != (1, 1):
                return None
            if (
                kwargs.get("inference_context") is not None
                or kwargs.get("inference_params") is not None
                or not plain_rope(config, self.layer_number)
            ):
                return None
            # Under SP hidden_states hold this rank's 1/tp of the tokens; the queries (after linear_qkv's
            # all-gather) hold all of them.
            num_tokens = hidden_states.shape[0] * (self.pg_collection.tp.size() if config.sequence_parallel else 1)
            cp = self.pg_collection.cp
            if packed is None:
                # Padded [S, B, H]: position s of every row is s (under CP megatron's path splits the rows).
                return freqs[:num_tokens].float() if cp.size() == 1 else None
            if packed.qkv_format != "thd" or packed.cu_seqlens_q_padded is not None:
                return None
            if cp.size() == 1:
                positions = packed_positions(packed.cu_seqlens_q, num_tokens)
            else:  # this rank's chunks i and 2cp-1-i of every sequence, from the full cu_seqlens
                positions = cp_local_positions(
                    packed.cu_seqlens_q, cp_size=cp.size(), cp_rank=cp.rank(), num_local_tokens=num_tokens
                )
            return freqs[positions].float()

    return RotarySelfAttention
