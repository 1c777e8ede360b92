"""megatron-core GPTModel built from an HF Qwen3 config, weights via rlkit.ckpt: logits equal HF transformers'."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")

from rlkit.models.tiny import build_tiny_qwen3  # noqa: E402
from rlkit.parallel.layouts import pack_thd  # noqa: E402
from rlkit.parallel.megatron.forward import megatron_forward  # noqa: E402
from rlkit.parallel.megatron.model import build_gpt_model, transformer_config_from_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world")

# fp32 end to end, 2 layers of width 64: both sides compute the same sums in a different order
# (fused QKV vs separate projections, SDPA kernels), so differences are a few fp32 ulps of O(1) logits.
TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_padded_logits_equal_hf(tied):
    hf = build_tiny_qwen3(seed=3, tie_word_embeddings=tied).eval()
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict()).eval()
    ids = torch.randint(1, 128, (3, 19))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = model(ids, torch.arange(19).expand(3, 19), attention_mask=None)
    torch.testing.assert_close(got, expected, **TOL)


def test_thd_packed_logits_equal_hf_per_sample():
    """Three samples of different lengths packed with cu_seqlens give each sample's unpacked HF logits."""
    hf = build_tiny_qwen3(seed=5).eval()
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict()).eval()
    samples = [torch.randint(1, 128, (n,)) for n in (7, 23, 2)]
    micro = pack_thd(samples, [1, 1, 1], total_multiple=12)  # 32 tokens -> 36  # a trailing padding sequence as well
    assert micro.cu_seqlens.numel() == 5
    with torch.no_grad():
        packed = megatron_forward(model)(micro)
        per_sample = micro.unpack_tokens(packed.T)
        for tokens, got in zip(samples, per_sample, strict=True):
            torch.testing.assert_close(got.T, hf(input_ids=tokens[None]).logits[0], **TOL)


def test_untrained_vocab_padding_and_unsupported_configs():
    hf = build_tiny_qwen3(seed=0, vocab_size=100)
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict())
    assert model.embedding.word_embeddings.weight.shape[0] == 128  # padded to a multiple of 128 (tied head)
    with torch.no_grad():
        torch.testing.assert_close(model.embedding.word_embeddings.weight[:100], hf.model.embed_tokens.weight)
    config = hf.config.to_dict() | {"model_type": "llama"}
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        transformer_config_from_hf(config)
    scaled = hf.config.to_dict() | {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}
    with pytest.raises(ValueError, match="rope scaling"):
        build_gpt_model(scaled)


def _tiny_qwen3_moe(seed: int, *, norm_topk_prob: bool):
    from rlkit.models.tiny import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(seed=seed, norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_logits_equal_hf_padded_and_packed(norm_topk_prob):
    """Top-2 of 8 experts, with and without renormalised routing weights (megatron's pre_softmax flag)."""
    hf = _tiny_qwen3_moe(seed=1, norm_topk_prob=norm_topk_prob).eval()
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict()).eval()
    assert model.decoder.layers[0].mlp.__class__.__name__ == "MoELayer"
    samples = [torch.randint(1, 128, (n,)) for n in (11, 4, 17)]
    micro = pack_thd(samples, [1, 1, 1])
    with torch.no_grad():
        per_sample = micro.unpack_tokens(megatron_forward(model)(micro).T)
        for tokens, got in zip(samples, per_sample, strict=True):
            torch.testing.assert_close(got.T, hf(input_ids=tokens[None]).logits[0], **TOL)


def test_qwen3_moe_with_dense_layers_is_refused():
    hf = _tiny_qwen3_moe(seed=0, norm_topk_prob=True)
    config = hf.config.to_dict() | {"mlp_only_layers": [0]}
    with pytest.raises(ValueError, match="only all-sparse Qwen3-MoE"):
        transformer_config_from_hf(config)


def test_model_parallel_setup_errors_are_named():
    """Layouts that cannot exist on this world, or that the groups contradict, fail before building anything."""
    from rlkit.parallel.megatron.model import init_model_parallel
    from rlkit.parallel.plan import ParallelPlan

    with pytest.raises(ValueError, match=r"world size 1 must be divisible by tp\*cp\*pp = 2\*1\*1"):
        init_model_parallel(tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="either plan= or the"):
        init_model_parallel(ParallelPlan(tp=2), tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="vpp=2"):
        init_model_parallel(ParallelPlan(pp=2, vpp=2))
    init_model_parallel(ParallelPlan())  # the existing single-rank groups match: no error
    hf = build_tiny_qwen3(seed=0)
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor parallelism"):
        build_gpt_model(hf.config, sequence_parallel=True)
