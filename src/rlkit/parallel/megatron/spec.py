"""megatron-core's local GPT layer spec, with rlkit's packed (THD) core attention.

The local spec uses no Transformer Engine and no Apex; :func:`gpt_layer_spec` swaps its core attention
for :func:`rlkit.parallel.megatron.attention.packed_core_attention_class`, which takes THD-packed input.
"""

from __future__ import annotations

from rlkit._optional import require
from rlkit.parallel.megatron.attention import packed_core_attention_class


def gpt_layer_spec(*, num_experts: int | None = None):
    """megatron-core's local GPT layer spec with :class:`PackedCoreAttention` as its core attention.

    RMSNorm, QK-norm, and ``SequentialMLP`` routed experts when ``num_experts`` is given.
    """
    specs = require("megatron.core.models.gpt.gpt_layer_specs", purpose="the megatron layer spec")
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = packed_core_attention_class()
    return spec
