"""A transformer layer's two sublayers as two compiled regions, for megatron-core's local spec (no TE).

The technique
-------------
With rlkit's fused local spec (:mod:`rlkit.parallel.megatron.spec`) a Qwen3-1.7B step at 8K tokens per
GPU is bound by the host, not the GPU: each layer's forward and backward go through ~85 kernel launches,
megatron's module and autograd plumbing (parallel linears, bias-dropout-add, viewless tensors), and a
``torch.compile`` wrapper per fused elementwise kernel (``benchmarks/RESULTS.md``). Here each sublayer
is one plain function of tensors that ``torch.compile`` turns into one graph forward and one backward:

* :func:`attention_sublayer_reference`: ``h + W_o attn(rope(qk_norm(split(W_qkv rms_norm(h)))))``;
* :func:`mlp_sublayer_reference`: ``h + W_2 swiglu(W_1 rms_norm(h))``.

Under tensor parallelism (with or without sequence parallelism) the collectives stay megatron's autograd
functions between compiled regions: ``rms_norm`` -> column-parallel input (all-gather under SP) -> the
compiled core on this rank's heads or MLP columns (:func:`attention_core_reference`,
:func:`mlp_core_reference`) -> row-parallel output (reduce-scatter under SP, else all-reduce) -> residual.

The matmuls stay cuBLAS calls and attention stays PyTorch's varlen kernel; Inductor fuses everything
between them, and one autograd node per sublayer replaces a dozen. The arithmetic is the modules'
(:mod:`rlkit.parallel.megatron.fused`'s references, megatron's QKV layout), so CPU runs the same
functions eagerly and a test compares them with the module path and HF transformers.

:class:`FusedTransformerLayer` (``fused_transformer_layer_class()``) is megatron-core's
``TransformerLayer`` that takes this path when it applies: THD-packed input (the MLP also padded), one
context-parallel rank, under SP only with full uniform recompute (the core keeps the gathered input of its first
matmul), no dropout, biases, selective recompute, offloading, forward hooks on the bypassed
modules or inference context, and the fused spec's modules (the full list: ``_static_routes``). Anything
else, and MoE MLPs, runs the parent's code. Full-layer recompute (``recompute_granularity="full"``) wraps
whole layers and works unchanged.

Shape legend: ``T`` packed tokens, ``D`` hidden size, ``G`` query groups (key/value heads), ``Hq`` query
heads, ``d`` head dim, ``F`` MLP width, ``L`` rotary table length (the longest sequence), ``N`` packed
sequences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch import Tensor

from rlkit._optional import require
from rlkit.parallel.megatron.attention import (
    _call_varlen,
    packed_causal_attention_reference,
    varlen_available,
)
from rlkit.parallel.megatron.distributed import forward_hooks_would_run
from rlkit.parallel.megatron.fused import (
    _use_compile,
    packed_positions,
    rms_norm_reference,
    rms_norm_rotary_reference,
    swiglu_reference,
)


def attention_core_reference(
    x: Tensor,
    freqs: Tensor,
    cu_seqlens: Tensor,
    qkv_weight: Tensor,
    q_norm_weight: Tensor,
    k_norm_weight: Tensor,
    proj_weight: Tensor,
    *,
    qk_eps: float,
    softmax_scale: float,
    use_varlen: bool,
) -> Tensor:
    """Causal self-attention with QK-norm and RoPE over THD-packed sequences, output projection included.

    ``[q; k; v] = x W_qkv^T`` in megatron's grouped layout (per query group ``g``: its ``Hq/G`` query
    heads, then its key head, then its value head); ``q, k = rope(rms_norm(q)), rope(rms_norm(k))`` with
    positions restarting in every sequence; ``out = attn(q, k, v) W_o^T`` (causal within each sequence,
    GQA). Norms in float32 rounded once, as :func:`rlkit.parallel.megatron.fused.rms_norm_reference`
    (HF's Qwen3 order). Under tensor parallelism the weights are this rank's heads (``W_qkv``'s rows,
    ``W_o``'s columns) and the result is this rank's partial sum of the projection.

    Args:
        x: ``[T, D]`` or ``[T, 1, D]`` normalised layer input, every token of the micro-batch (bf16/fp32).
        freqs: ``[L, 1, 1, d]`` float rotary angles of positions ``0 .. L-1`` (megatron's ``rotary_pos_emb``),
            ``L`` the longest sequence: it is also the varlen kernel's ``max_seqlen``, a tensor size rather
            than an int argument so that ``torch.compile`` keeps it symbolic instead of guarding on its value.
        cu_seqlens: ``[N + 1]`` int cumulative sequence lengths, ending at ``T``.
        qkv_weight: ``[G * (Hq/G + 2) * d, D]``.
        q_norm_weight: ``[d]``; k_norm_weight: ``[d]``.
        proj_weight: ``[D, Hq * d]``. ``G = (rows(W_qkv) - cols(W_o)) / 2d`` follows from the two shapes
            (parameters' sizes stay static under ``torch.compile``, where an int argument would not).
        qk_eps: the QK norms' epsilon.
        softmax_scale: usually ``1 / sqrt(d)``.
        use_varlen: PyTorch's varlen flash kernel (CUDA, fp16/bf16), else one SDPA call per sequence.

    Returns:
        Shape and dtype of ``x``.
    """
    tokens = x.shape[0]
    head_dim = q_norm_weight.shape[0]
    num_query_groups = (qkv_weight.shape[0] - proj_weight.shape[1]) // (2 * head_dim)
    per_group = qkv_weight.shape[0] // (num_query_groups * head_dim)
    mixed = F.linear(x, qkv_weight).view(tokens, num_query_groups, per_group * head_dim)
    query, key, value = mixed.split([(per_group - 2) * head_dim, head_dim, head_dim], dim=-1)
    query = query.reshape(tokens, -1, head_dim)
    angles = freqs[packed_positions(cu_seqlens, tokens)].view(tokens, 1, head_dim).float()
    query = rms_norm_rotary_reference(query, q_norm_weight, qk_eps, angles)
    key = rms_norm_rotary_reference(key, k_norm_weight, qk_eps, angles)
    if use_varlen:
        cu = cu_seqlens.to(torch.int32)
        out = _call_varlen(query, key, value, cu, cu, freqs.shape[0], freqs.shape[0], softmax_scale)
    else:
        out = packed_causal_attention_reference(query, key, value, cu_seqlens, softmax_scale=softmax_scale)
    return F.linear(out.reshape(*x.shape[:-1], -1), proj_weight)


def attention_sublayer_reference(
    hidden: Tensor,
    freqs: Tensor,
    cu_seqlens: Tensor,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    q_norm_weight: Tensor,
    k_norm_weight: Tensor,
    proj_weight: Tensor,
    *,
    eps: float,
    qk_eps: float,
    softmax_scale: float,
    use_varlen: bool,
) -> Tensor:
    """Pre-norm attention plus the residual (one rank): ``h + attention_core(rms_norm(h))``.

    Args:
        hidden: ``[T, D]`` or ``[T, 1, D]`` layer input.
        norm_weight: ``[D]`` input RMSNorm weight; eps: its epsilon.
        freqs, cu_seqlens, qkv_weight, q_norm_weight, k_norm_weight, proj_weight, qk_eps, softmax_scale,
            use_varlen: as for :func:`attention_core_reference`.

    Returns:
        Shape and dtype of ``hidden``.
    """
    x = rms_norm_reference(hidden, norm_weight, eps)
    core = (qkv_weight, q_norm_weight, k_norm_weight, proj_weight)
    options = dict(qk_eps=qk_eps, softmax_scale=softmax_scale, use_varlen=use_varlen)
    return hidden + attention_core_reference(x, freqs, cu_seqlens, *core, **options)


def mlp_core_reference(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor) -> Tensor:
    """SwiGLU MLP: ``swiglu(x W_1^T) W_2^T`` (under TP: this rank's ``F / tp`` columns, a partial sum).

    Args:
        x: ``[..., D]`` normalised input.
        fc1_weight: ``[2F, D]``, gate rows first (megatron's ``linear_fc1``).
        fc2_weight: ``[D, F]``.

    Returns:
        ``[..., D]``, dtype of ``x``.
    """
    return F.linear(swiglu_reference(F.linear(x, fc1_weight)), fc2_weight)


def mlp_sublayer_reference(
    hidden: Tensor, norm_weight: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, *, eps: float
) -> Tensor:
    """Pre-norm SwiGLU MLP plus the residual (one rank): ``h + mlp_core(rms_norm(h))``.

    Args:
        hidden: ``[..., D]``.
        norm_weight: ``[D]``; eps: its epsilon.
        fc1_weight, fc2_weight: as for :func:`mlp_core_reference`.

    Returns:
        ``[..., D]``, dtype of ``hidden``.
    """
    return hidden + mlp_core_reference(rms_norm_reference(hidden, norm_weight, eps), fc1_weight, fc2_weight)


def attention_sublayer(
    hidden: Tensor,
    freqs: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    q_norm_weight: Tensor,
    k_norm_weight: Tensor,
    proj_weight: Tensor,
    *,
    eps: float,
    qk_eps: float,
    softmax_scale: float,
) -> Tensor:
    """:func:`attention_sublayer_reference`, one compiled graph on CUDA in bf16/fp16 (see :func:`_attention_call`).

    ``max_seqlen``: the longest packed sequence (a host int); the other arguments as for the reference.
    """
    weights = (norm_weight, qkv_weight, q_norm_weight, k_norm_weight, proj_weight)
    options = dict(eps=eps, qk_eps=qk_eps, softmax_scale=softmax_scale)
    return _attention_call(attention_sublayer_reference, hidden, freqs, cu_seqlens, max_seqlen, weights, options)


def attention_core(
    x: Tensor,
    freqs: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    qkv_weight: Tensor,
    q_norm_weight: Tensor,
    k_norm_weight: Tensor,
    proj_weight: Tensor,
    *,
    qk_eps: float,
    softmax_scale: float,
) -> Tensor:
    """:func:`attention_core_reference`, one compiled graph on CUDA in bf16/fp16 (see :func:`_attention_call`).

    ``max_seqlen``: the longest packed sequence (a host int); the other arguments as for the reference.
    """
    weights = (qkv_weight, q_norm_weight, k_norm_weight, proj_weight)
    options = dict(qk_eps=qk_eps, softmax_scale=softmax_scale)
    return _attention_call(attention_core_reference, x, freqs, cu_seqlens, max_seqlen, weights, options)


def _attention_call(fn, hidden: Tensor, freqs: Tensor, cu_seqlens: Tensor, max_seqlen: int, weights, options):
    """Run ``fn`` (an attention reference) eagerly or compiled; ``use_varlen`` is decided here.

    ``freqs`` may cover more positions than ``max_seqlen`` (a host int, the longest packed sequence): it
    is cut to ``max_seqlen`` rows. Float32 (and anything without the varlen kernel) runs eagerly: the
    reference attention loops over sequences on the host (``cu_seqlens.tolist()``), which would break a
    compiled graph and recompile for every new set of lengths, and float32 is the exactness
    configuration, where two runs of the same batch should execute the same kernels bit for bit.
    """
    if freqs.shape[0] < max_seqlen:
        raise ValueError(f"the rotary table has {freqs.shape[0]} positions but the longest sequence has {max_seqlen}")
    if freqs.shape[0] != max_seqlen:
        freqs = freqs[:max_seqlen]
    use_varlen = varlen_available(hidden.device, hidden.dtype)
    if not (use_varlen and _use_compile(hidden, "auto")):
        return fn(hidden, freqs, cu_seqlens, *weights, use_varlen=use_varlen, **options)
    _static_features(hidden, freqs)
    with _sublayer_compile_settings():
        return _compiled_sublayer(fn)(hidden, freqs, cu_seqlens, *weights, use_varlen=use_varlen, **options)


# Graphs one sublayer function legitimately needs: grad mode on/off (training, log-prob passes,
# recompute's no-grad forward) x the input requiring grad or not x the first layer's input (a transposed
# view of the embedding output) or a later layer's. Token counts and lengths are symbolic and add none.
_SUBLAYER_GRAPHS = 16


@functools.cache
def _compiled_sublayer(fn):
    """``torch.compile(fn, dynamic=True)``: every size symbolic from the first compile.

    Parameters stay static (dynamo's ``force_parameter_static_shapes``) and :func:`_static_features` keeps
    the inputs' feature widths static, so only token counts and lengths are symbolic: a recompute pass
    that repeats an earlier micro-batch's exact sizes does not get a graph specialised to them.
    """
    return torch.compile(fn, dynamic=True)


@contextlib.contextmanager
def _sublayer_compile_settings():
    """Dynamo settings for the duration of one compiled-sublayer call (a compile happens inside it, if any).

    * ``recompile_limit`` ``_SUBLAYER_GRAPHS``: dynamo's default (8) is below the variants above, and past
      the limit dynamo silently runs the function eagerly;
    * no duck shaping: a one-sequence micro-batch has ``T == max_seqlen``, and with duck shaping the two
      sizes would share a symbol, giving a graph that the next micro-batch does not fit.

    Set and restored by plain attribute writes (~6 us; a ``config.patch`` costs ~25 us per call).
    """
    dynamo, shapes = torch._dynamo.config, torch.fx.experimental._config
    saved = dynamo.recompile_limit, shapes.use_duck_shape
    dynamo.recompile_limit, shapes.use_duck_shape = max(saved[0], _SUBLAYER_GRAPHS), False
    try:
        yield
    finally:
        dynamo.recompile_limit, shapes.use_duck_shape = saved


def _static_features(*tensors: Tensor) -> None:
    """Mark every dim but the first static (the feature widths: one specialised kernel per width)."""
    for t in tensors:
        for dim in range(1, t.dim()):
            torch._dynamo.mark_static(t, dim)


def mlp_sublayer(hidden: Tensor, norm_weight: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, *, eps: float) -> Tensor:
    """:func:`mlp_sublayer_reference`, one compiled graph on CUDA in bf16/fp16."""
    return _token_call(mlp_sublayer_reference, hidden, (norm_weight, fc1_weight, fc2_weight), dict(eps=eps))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rlkit.parallel.megatron.fused.rms_norm_reference` compiled as the sublayers are (before a TP mapping).

    :func:`rlkit.parallel.megatron.fused.rms_norm` compiles the same formula with first-call size marks,
    which suit the module path; here it follows the sublayers' policy (symbolic sizes, scoped settings).
    """
    return _token_call(_norm_before_tensor_parallel, x, (weight,), dict(eps=eps))


def _norm_before_tensor_parallel(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # A code object of its own: dynamo keeps compiled graphs per code object, and fused.rms_norm compiles
    # rms_norm_reference itself with other settings (the final norm, the module path).
    return rms_norm_reference(x, weight, eps)


def mlp_core(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor) -> Tensor:
    """:func:`mlp_core_reference`, one compiled graph on CUDA in bf16/fp16."""
    return _token_call(mlp_core_reference, x, (fc1_weight, fc2_weight), {})


def _token_call(fn, hidden: Tensor, weights, options) -> Tensor:
    """Run ``fn(hidden, *weights, **options)`` (no attention) eagerly, or compiled on CUDA in bf16/fp16."""
    if not (hidden.dtype in (torch.bfloat16, torch.float16) and _use_compile(hidden, "auto")):
        return fn(hidden, *weights, **options)
    _static_features(hidden)
    with _sublayer_compile_settings():
        return _compiled_sublayer(fn)(hidden, *weights, **options)


@functools.cache
def fused_transformer_layer_class():
    """megatron-core's ``TransformerLayer`` running each sublayer as one compiled region (lazy: needs megatron)."""
    transformer_layer = require("megatron.core.transformer.transformer_layer", purpose="the fused transformer layer")
    from megatron.core.transformer.identity_op import IdentityOp

    from rlkit.parallel.megatron.attention import packed_core_attention_class
    from rlkit.parallel.megatron.spec import FusedRMSNorm, fused_mlp_class, plain_rope, rotary_self_attention_class

    class FusedTransformerLayer(transformer_layer.TransformerLayer):
        """``TransformerLayer`` running :func:`attention_sublayer` and :func:`mlp_sublayer` where they apply.

        Where they do not (module docstring), the parent's code runs.
        Same submodules, parameters and state-dict keys as the parent: only ``forward``'s route changes.
        """

        _static_routes: _Routes | None = None

        def _forward_attention(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):
            """As ``TransformerLayer._forward_attention``: ``(hidden_states, context)``."""
            routes = self._routes()
            if not (
                routes.attention
                and attention_mask is None
                and _attention_call_fusable(hidden_states, kwargs, routes.head_dim)
                and not forward_hooks_would_run(routes.attention_modules)
            ):
                return super()._forward_attention(hidden_states, attention_mask, **kwargs)
            attention, packed = self.self_attention, kwargs["packed_seq_params"]
            weights = (
                attention.linear_qkv.weight,
                attention.q_layernorm.weight,
                attention.k_layernorm.weight,
                attention.linear_proj.weight,
            )
            where = (kwargs["rotary_pos_emb"], packed.cu_seqlens_q, packed.max_seqlen_q)
            options = dict(qk_eps=attention.q_layernorm.eps, softmax_scale=attention.core_attention.softmax_scale)
            norm, tp_group = self.input_layernorm, self.pg_collection.tp
            if tp_group.size() == 1:
                out = attention_sublayer(hidden_states, *where, norm.weight, *weights, eps=norm.eps, **options)
            else:
                x = _into_tensor_parallel(
                    rms_norm(hidden_states, norm.weight, norm.eps), self.config.sequence_parallel, tp_group
                )
                partial = attention_core(x, *where, *weights, **options)
                out = hidden_states + _out_of_tensor_parallel(partial, self.config.sequence_parallel, tp_group)
            return out, kwargs.get("context")

        def _forward_mlp(self, hidden_states: Tensor, inference_context=None, padding_mask: Tensor | None = None):
            """As ``TransformerLayer._forward_mlp``: ``[S, B, D] -> [S, B, D]``."""
            routes = self._routes()
            if not (routes.mlp and inference_context is None and not forward_hooks_would_run(routes.mlp_modules)):
                return super()._forward_mlp(hidden_states, inference_context, padding_mask=padding_mask)
            weights = (self.mlp.linear_fc1.weight, self.mlp.linear_fc2.weight)
            norm, tp_group = self.pre_mlp_layernorm, self.pg_collection.tp
            if tp_group.size() == 1:
                return mlp_sublayer(hidden_states, norm.weight, *weights, eps=norm.eps)
            x = _into_tensor_parallel(
                rms_norm(hidden_states, norm.weight, norm.eps), self.config.sequence_parallel, tp_group
            )
            partial = mlp_core(x, *weights)
            return hidden_states + _out_of_tensor_parallel(partial, self.config.sequence_parallel, tp_group)

        def _routes(self) -> _Routes:
            """Whether the module structure and config allow the fused attention / MLP sublayer (cached)."""
            if self._static_routes is None:
                self._static_routes = _static_routes(self, FusedRMSNorm, rotary_self_attention_class(),
                                                     packed_core_attention_class(), fused_mlp_class())  # fmt: skip
            return self._static_routes

    def _static_routes(layer, norm_cls, attention_cls, core_cls, mlp_cls) -> _Routes:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        config, attention, mlp = layer.config, layer.self_attention, layer.mlp
        attention_modules = (layer.input_layernorm, attention, attention.linear_qkv, attention.q_layernorm,
                             attention.k_layernorm, attention.core_attention, attention.linear_proj)  # fmt: skip
        common = (
            layer.pg_collection.cp.size() == 1
            # Under SP the compiled core keeps the all-gathered [T, D] input of W_qkv / W_1 for the weight
            # gradient, where megatron's linear keeps this rank's [T/tp, D] and gathers again in the backward:
            # only layers recomputed whole hold it for no longer than their own backward.
            and (
                not config.sequence_parallel
                or (config.recompute_granularity == "full" and config.recompute_method == "uniform")
            )
            and layer.hidden_dropout == 0.0
            and not (config.fp8 or getattr(config, "fp4", None))
            and not getattr(config, "inference_fuse_tp_communication", False)
            # megatron writes weight gradients into main_grad inside its linears; the route leaves them in .grad
            and not config.gradient_accumulation_fusion
            and getattr(config, "cuda_graph_impl", "none") == "none"
        )
        attention_ok = common and (
            type(attention) is attention_cls
            and type(layer.input_layernorm) is norm_cls
            and type(attention.q_layernorm) is norm_cls
            and type(attention.k_layernorm) is norm_cls
            and type(attention.core_attention) is core_cls
            and type(attention.linear_qkv) is ColumnParallelLinear
            and type(attention.linear_proj) is RowParallelLinear
            and attention.core_attention.cp_group is None
            # Fewer query groups than TP ranks: megatron all-gathers QKV and slices it; not this route.
            and attention.num_query_groups_per_partition * layer.pg_collection.tp.size() == config.num_query_groups
            and isinstance(layer.cross_attention, IdentityOp)
            and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)
            and _no_bias(attention.linear_qkv, attention.linear_proj)
            and not getattr(config, "attention_output_gate", False)
            and getattr(config, "softmax_type", "vanilla") == "vanilla"
            and getattr(config, "window_size", None) is None
            and not getattr(attention, "checkpoint_core_attention", False)  # selective recompute of attention
            and not layer.recompute_input_layernorm
            and not getattr(layer, "offload_attn_norm", False)
            and plain_rope(config, layer.layer_number)
        )
        mlp_ok = common and (
            type(mlp) is mlp_cls
            and type(layer.pre_mlp_layernorm) is norm_cls
            and type(mlp.linear_fc1) is ColumnParallelLinear
            and type(mlp.linear_fc2) is RowParallelLinear
            and config.gated_linear_unit
            and mlp.activation_func is torch.nn.functional.silu
            and not config.use_te_activation_func
            and config.activation_func_clamp_value is None
            and config.glu_linear_offset == 0
            and _no_bias(mlp.linear_fc1, mlp.linear_fc2)
            and not layer.recompute_mlp
            and not layer.recompute_pre_mlp_layernorm
            and not getattr(layer, "offload_mlp_norm", False)
        )
        return _Routes(
            attention=bool(attention_ok),
            mlp=bool(mlp_ok),
            head_dim=attention.hidden_size_per_attention_head if attention_ok else 0,
            attention_modules=attention_modules,
            mlp_modules=(layer.pre_mlp_layernorm, mlp, *(getattr(mlp, n, None) for n in ("linear_fc1", "linear_fc2"))),
        )

    return FusedTransformerLayer


@dataclasses.dataclass(frozen=True)
class _Routes:
    """A layer's static route decision, and the submodules whose forward the route does not call."""

    attention: bool
    mlp: bool
    head_dim: int
    attention_modules: tuple
    mlp_modules: tuple


def _no_bias(*modules) -> bool:
    return all(getattr(module, "bias", None) is None for module in modules)


def _into_tensor_parallel(x: Tensor, sequence_parallel: bool, group) -> Tensor:
    """A column-parallel input, as megatron's ``ColumnParallelLinear`` forms it.

    Sequence parallel: all-gather the tokens (backward: reduce-scatter the gradient). Otherwise:
    identity (backward: all-reduce the gradient, each rank having used ``x`` for its own columns).
    """
    from megatron.core.tensor_parallel import mappings

    if sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    return mappings.copy_to_tensor_model_parallel_region(x, group=group)


def _out_of_tensor_parallel(partial: Tensor, sequence_parallel: bool, group) -> Tensor:
    """Sum a row-parallel output's partial sums, as megatron's ``RowParallelLinear`` does.

    Sequence parallel: reduce-scatter over the tokens (backward: all-gather). Otherwise: all-reduce
    (backward: identity).
    """
    from megatron.core.tensor_parallel import mappings

    if sequence_parallel:
        return mappings.reduce_scatter_to_sequence_parallel_region(partial, group=group)
    return mappings.reduce_from_tensor_model_parallel_region(partial, group=group)


def _attention_call_fusable(hidden_states: Tensor, kwargs: dict, head_dim: int) -> bool:
    """The per-call half of the attention route: THD input, a full-width rotary table, nothing else passed."""
    packed = kwargs.get("packed_seq_params")
    freqs = kwargs.get("rotary_pos_emb")
    if packed is None or packed.qkv_format != "thd" or packed.cu_seqlens_q_padded is not None:
        return False
    if packed.local_cp_size is not None or packed.cu_seqlens_kv is not packed.cu_seqlens_q:
        return False
    # rotary_percent < 1 rotates part of each head: not this route's RoPE.
    if not isinstance(freqs, Tensor) or freqs.dim() != 4 or freqs.shape[1:] != (1, 1, head_dim):
        return False
    if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
        return False
    unused = (
        "context",
        "context_mask",
        "rotary_pos_cos",
        "rotary_pos_sin",
        "rotary_pos_cos_sin",
        "attention_bias",
        "inference_context",
        "inference_params",
        "sequence_len_offset",
    )
    return all(kwargs.get(name) is None for name in unused) and isinstance(packed.max_seqlen_q, int)
