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
    # For a CPU smoke run of the scripts (--shape tiny --device cpu).
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=151936, tie_word_embeddings=True,
    ),
}  # fmt: skip


def hf_config(shape: str):
    """A transformers ``Qwen3Config`` of the named shape (rope theta 1e6, RMSNorm eps 1e-6, 40960 positions)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        **SHAPES[shape], rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1_000_000.0, attention_bias=False
    )


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
    ``2 Hq d h``, SwiGLU MLP ``2 * 3 h F``; per layer and sequence of ``L`` tokens, causal attention
    ``QK^T`` and ``AV``: ``2 * 2 * Hq d * L (L + 1) / 2`` (only the lower triangle is useful work).
    LM head ``2 h V`` per token. The embedding lookup and norms are not counted (no matmul).
    """
    s = SHAPES[shape]
    h, f, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    hq, hkv, d, v = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["vocab_size"]
    per_token = n * (2 * h * (hq + 2 * hkv) * d + 2 * hq * d * h + 6 * h * f) + 2 * h * v
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
