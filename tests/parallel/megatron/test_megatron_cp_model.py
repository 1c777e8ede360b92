"""A megatron-core GPTModel with context parallelism 2 (gloo, 2 processes) == the same model without CP.

Each rank runs the cp_shard of one THD micro-batch with the FULL cu_seqlens (the contract of the step);
its logits must equal the CP=1 model's logits at the same tokens, and the summed per-token loss gradient,
summed over the CP group, the CP=1 gradient. This also proves that megatron-core's own RoPE gives each
local token the rotation of its original position (a wrong rotation changes every logit), which the RoPE
test checks directly against a float64 formula.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")

from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.parallel.context import cp_split_padded, cp_token_indices  # noqa: E402
from rlkit.parallel.layouts import pack_thd  # noqa: E402
from rlkit.parallel.megatron.attention import packed_causal_attention_reference  # noqa: E402

WORLD = 2
VOCAB = 128
# A Qwen3 config as a plain dict (no transformers import in the workers): GQA 4 query / 2 kv heads.
CONFIG = dict(
    model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip


def _micro_batch():
    """Three samples (9, 21, 4 tokens) padded to multiples of 2 cp = 4: 12 + 24 + 4 = 40 tokens."""
    gen = torch.Generator().manual_seed(11)
    samples = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (9, 21, 4)]
    return pack_thd(samples, [3, 10, 2], seq_multiple=2 * WORLD, total_multiple=2 * WORLD)


def _build_model(**overrides):
    """The GPTModel with seeded weights: the same values in every process whatever the CP size."""
    from rlkit.parallel.megatron.model import build_gpt_model

    model = build_gpt_model(CONFIG, **overrides)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def _loss(logits, target_ids, loss_mask):
    """Summed masked next-token cross-entropy over the real vocabulary: a sum over tokens splits over ranks."""
    per_token = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), target_ids.reshape(-1), reduction="none")
    return (per_token * loss_mask.reshape(-1)).sum()


def _packed_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu.to(torch.int32)
    longest = int(cu.diff().max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def _float64_rope(x, positions, theta):
    """HF/megatron non-interleaved RoPE: rotate (x_j, x_{j+D/2}) by positions * theta**(-2j/D)."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    return x.double() * cos + rotated.double() * sin


def _worker(rank, results):
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from rlkit.parallel.context import cp_shard
    from rlkit.parallel.megatron.cpu_patches import apply_cpu_patches

    try:
        parallel_state.initialize_model_parallel(context_parallel_size=WORLD)
        apply_cpu_patches()
        model = _build_model(context_parallel_size=WORLD)
        micro = _micro_batch()
        shard = cp_shard(micro, cp_size=WORLD, cp_rank=rank)
        params = _packed_params(micro.cu_seqlens)
        logits = model(shard.input_ids[None], shard.position_ids[None], attention_mask=None, packed_seq_params=params)
        loss = _loss(logits, shard.target_ids, shard.loss_mask)
        loss.backward()
        grads = {}
        for name, param in model.named_parameters():
            dist.all_reduce(param.grad, group=parallel_state.get_context_parallel_group())
            grads[name] = param.grad.clone()

        # megatron-core's THD RoPE under CP, on this rank's tokens, against the original positions.
        rope = model.rotary_pos_emb(params.max_seqlen_q, packed_seq=True)
        x = torch.randn(shard.input_ids.shape[0], 3, 16, generator=torch.Generator().manual_seed(rank))
        rotated = apply_rotary_pos_emb(
            x, rope, model.config, cu_seqlens=params.cu_seqlens_q, cp_group=parallel_state.get_context_parallel_group()
        )
        starts = micro.cu_seqlens[:-1].long()
        seq_of = torch.searchsorted(micro.cu_seqlens.long(), shard.indices, right=True) - 1
        positions = shard.indices - starts[seq_of]  # position within its (padded) sequence

        # Padded [S, B] rows under CP: each row is one sequence split like a packed one.
        core = model.decoder.layers[0].self_attention.core_attention
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(8, 2, h, 16, generator=gen) for h in (4, 2, 2))
        local = [cp_split_padded(t, cp_size=WORLD, cp_rank=rank, dim=0) for t in (q, k, v)]
        padded_out = core(*local, attention_mask=None)

        results[rank] = dict(
            logits=logits.detach()[0],
            loss=loss.detach(),
            grads=grads,
            rope=(rotated, _float64_rope(x, positions, CONFIG["rope_theta"])),
            padded=(padded_out.detach(), (q, k, v)),
        )
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def cp_results():
    return run_on_gloo_ranks(_worker, WORLD)


@pytest.mark.usefixtures("megatron_world")
def test_cp2_logits_and_gradients_equal_cp1(cp_results):
    model = _build_model()
    micro = _micro_batch()
    params = _packed_params(micro.cu_seqlens)
    logits = model(micro.input_ids[None], micro.position_ids[None], attention_mask=None, packed_seq_params=params)[0]
    loss = _loss(logits, micro.target_ids, micro.loss_mask)
    loss.backward()
    # fp32, 2 layers of width 64: the CP side sums the same terms in another order (gathered prefixes,
    # an explicit bottom-right mask, a gradient all-reduce), so a few fp32 ulps of O(1) values.
    for rank in range(WORLD):
        index = cp_token_indices(micro.cu_seqlens, cp_size=WORLD, cp_rank=rank)
        torch.testing.assert_close(cp_results[rank]["logits"], logits.detach()[index], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(sum(cp_results[r]["loss"] for r in range(WORLD)), loss.detach(), rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        for rank in range(WORLD):
            torch.testing.assert_close(cp_results[rank]["grads"][name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_megatron_thd_rope_under_cp_uses_original_positions(cp_results):
    for rank in range(WORLD):
        got, want = cp_results[rank]["rope"]
        # fp32 cos/sin of angles up to ~24 rad against float64: ~1e-6.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_padded_rows_under_cp_equal_reference(cp_results):
    q, k, v = cp_results[0]["padded"][1]
    seq, batch = q.shape[:2]
    cu = torch.arange(batch + 1, dtype=torch.int32) * seq
    flat = [t.transpose(0, 1).reshape(batch * seq, t.shape[2], 16) for t in (q, k, v)]
    ref = packed_causal_attention_reference(*flat, cu).reshape(batch, seq, -1).transpose(0, 1)  # [S, B, Hq * D]
    for rank in range(WORLD):
        want = cp_split_padded(ref, cp_size=WORLD, cp_rank=rank, dim=0)
        torch.testing.assert_close(cp_results[rank]["padded"][0], want, rtol=1e-5, atol=1e-6)
