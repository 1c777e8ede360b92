"""Tiny local models and a character-level tokenizer, built in-process (nothing is downloaded).

They keep the seed models' structure (Qwen3: GQA, q/k RMSNorm, SwiGLU, RoPE; Qwen-style chat
template with ``<|im_start|>``/``<|im_end|>``) at a size that trains on a laptop CPU. Used by the
tests and by the embedded default of ``examples/grpo_qwen3_4b.py``.
"""

from __future__ import annotations

import string
from typing import Any

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII plus Qwen's chat tokens.

    Token ids: 0..3 are ``SPECIAL_TOKENS`` (``<|endoftext|>`` is both EOS and PAD), then one id per
    printable ASCII character and newline (100 ids in all). ``decode(encode(s)) == s`` for ASCII
    text; other characters map to ``<unk>``.

    Returns:
        transformers.PreTrainedTokenizerFast with ``chat_template`` set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_config(**overrides: Any):
    """A ``Qwen3Config`` with the real architecture at toy size (2 layers, hidden 64, GQA 4q/2kv).

    Args:
        **overrides: any ``Qwen3Config`` field, e.g. ``num_hidden_layers=4``.
    """
    from transformers import Qwen3Config

    fields: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def build_tiny_qwen3(*, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A randomly initialised ``Qwen3ForCausalLM`` from :func:`tiny_qwen3_config` (eager attention).

    Args:
        seed: RNG seed for the initialisation (the global RNG state is restored afterwards).
        dtype: parameter dtype.
        **overrides: forwarded to :func:`tiny_qwen3_config`.
    """
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(**overrides)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.to(dtype)


def build_tiny_qwen3_moe(*, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A randomly initialised ``Qwen3MoeForCausalLM`` at toy size (eager attention, every layer sparse).

    2 layers, hidden 64, GQA 4q/2kv of 16, 8 routed experts of width 32, top-2, ``norm_topk_prob=True``,
    untied embeddings, vocabulary 128.

    Args:
        seed: RNG seed for the initialisation (the global RNG state is restored afterwards).
        dtype: parameter dtype.
        **overrides: any ``Qwen3MoeConfig`` field, e.g. ``num_experts=4``.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = Qwen3MoeConfig(**fields)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
    return model.to(dtype)
