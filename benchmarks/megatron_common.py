"""Shared pieces of the megatron-backend GPU scripts: model shapes, a synthetic RL batch, FLOP counting.

Not a benchmark itself; imported by ``megatron_parity.py`` and ``megatron_step.py``.
"""

from __future__ import annotations

import torch

from rlkit.parallel.megatron.step import RLBatch

# Published Qwen3 shapes (config.json of Qwen/Qwen3-0.6B, -1.7B and -4B); weights are random.
SHAPES = {
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    # Qwen3-30B-A3B's layer (config.json of Qwen/Qwen3-30B-A3B: 128 experts, top-8, width 768) with 4 of its 48
    # layers, all experts on one GPU: the routed-experts benchmark of megatron_step.py.
    "qwen3-30b-a3b-4l": dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    ),
    # For a CPU smoke run of the scripts (--shape tiny --device cpu / --shape tiny-moe).
    "tiny-moe": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=151936, tie_word_embeddings=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=151936, tie_word_embeddings=True,
    ),
}  # fmt: skip


def hf_config(shape: str):
    """A transformers ``Qwen3Config`` (``Qwen3MoeConfig`` for shapes with experts) of the named shape.

    Rope theta 1e6, RMSNorm eps 1e-6, 40960 positions; MoE shapes have every layer sparse.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    fields = dict(SHAPES[shape], rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1_000_000.0)
    if "num_experts" in fields:
        return Qwen3MoeConfig(**fields, decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False)
    return Qwen3Config(**fields, attention_bias=False)


def random_hf_model(shape: str, *, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa", device: str = "cuda"):
    """A random-init HF Qwen3ForCausalLM built directly on ``device`` (std 0.02 init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(shape)
    config._attn_implementation = attn
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def rl_batch(num_samples: int, *, vocab: int, seed: int, prompt=(64, 256), response=(128, 2048)) -> RLBatch:
    """Synthetic GRPO batch: uniform prompt/response lengths, one advantage per sample, old log-probs ~ -log V."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(prompt[0], prompt[1] + 1, (num_samples,), generator=g).tolist()
    responses = torch.randint(response[0], response[1] + 1, (num_samples,), generator=g).tolist()
    tokens = [torch.randint(1, vocab, (p + r,), generator=g) for p, r in zip(prompts, responses, strict=True)]
    adv = [torch.full((r,), float(torch.randn(1, generator=g))) for r in responses]
    old = [-torch.log(torch.tensor(float(vocab))) + 0.1 * torch.randn(r, generator=g) for r in responses]
    return RLBatch(tokens=tokens, response_lengths=responses, advantages=adv, old_log_probs=old)


def train_flops(lengths: list[int], shape: str) -> float:
    """Model FLOPs of one forward + backward (3x forward) over samples of the given lengths, padding excluded.

    Per token and layer (multiply-add = 2 FLOPs): QKV ``2 h (Hq + 2 Hkv) d``, output projection
    ``2 Hq d h``, SwiGLU MLP ``2 * 3 h F``; a MoE layer instead: router ``2 h E`` and the ``k`` routed
    experts' SwiGLU ``k * 2 * 3 h F_moe`` (the active parameters); per layer and sequence of ``L`` tokens, causal
    attention ``QK^T`` and ``AV``: ``2 * 2 * Hq d * L (L + 1) / 2`` (only the lower triangle is useful work).
    LM head ``2 h V`` per token. The embedding lookup and norms are not counted (no matmul).
    """
    s = SHAPES[shape]
    h, f, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    hq, hkv, d, v = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["vocab_size"]
    if "num_experts" in s:
        mlp = 2 * h * s["num_experts"] + s["num_experts_per_tok"] * 6 * h * s["moe_intermediate_size"]
    else:
        mlp = 6 * h * f
    per_token = n * (2 * h * (hq + 2 * hkv) * d + 2 * hq * d * h + mlp) + 2 * h * v
    tokens = sum(lengths)
    attention = n * sum(2 * hq * d * length * (length + 1) for length in lengths)
    return 3.0 * (per_token * tokens + attention)


def peak_bf16_flops(device_name: str) -> float:
    """Dense BF16 tensor-core peak: H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989 (NVIDIA datasheets)."""
    name = device_name.lower()
    if "h100" in name and "pcie" in name:
        return 756e12
    if "h100" in name or "h200" in name:
        return 989e12
    raise ValueError(f"no BF16 peak recorded for {device_name!r}; add it to peak_bf16_flops")
