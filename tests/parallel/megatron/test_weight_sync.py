"""Weight sync megatron-core -> rollout engine: HF forward on the synced engine equals HF on the source weights.

References are independent of the code under test: the HF transformers model the megatron model was built from
(its forward and its ``state_dict``), and, for FP8, the error bound of 128x128 blockwise e4m3 computed here in
float64 from the tile amax.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")

from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.ckpt.convert import Layout, hf_to_megatron  # noqa: E402
from rlkit.ckpt.experts import split_fused_experts  # noqa: E402
from rlkit.models.tiny import build_tiny_qwen3  # noqa: E402
from rlkit.parallel.megatron.model import build_gpt_model  # noqa: E402
from rlkit.parallel.megatron.weight_sync import (  # noqa: E402
    SyncGroups,
    WeightSyncConfig,
    hf_weight_buckets,
    iter_hf_tensors,
    sync_colocated,
    sync_decoupled,
)
from rlkit.rollout.engines.base import SamplingParams  # noqa: E402
from rlkit.rollout.engines.embedded import EmbeddedEngine  # noqa: E402
from rlkit.rollout.engines.process import ProcessEngine, WeightGroupError, new_weight_group  # noqa: E402
from rlkit.rollout.sample import Sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world")


def _tiny_qwen3_moe(seed: int, **overrides):
    from rlkit.models.tiny import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(seed=seed, **({"num_experts": 4} | overrides)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_colocated_qwen3_engine_equals_hf_source(tied):
    source = build_tiny_qwen3(seed=3, tie_word_embeddings=tied, vocab_size=100).eval()
    model = build_gpt_model(source.config, hf_state_dict=source.state_dict())
    engine = EmbeddedEngine(build_tiny_qwen3(seed=11, tie_word_embeddings=tied, vocab_size=100))
    ids = torch.randint(1, 100, (2, 13))
    assert not torch.allclose(_logits(engine.model, ids), _logits(source, ids))  # the test can fail
    live_before = {k: v.data_ptr() for k, v in engine.model.state_dict().items()}
    bucket_bytes = 40_000  # forces many buckets (the embedding alone is 25.6 KB)
    stats = sync_colocated(model, engine, source.config, config=WeightSyncConfig(bucket_bytes=bucket_bytes))
    # Same parameters (in place, no re-allocation), bit-exact weights, identical logits (the tied head follows).
    assert {k: v.data_ptr() for k, v in engine.model.state_dict().items()} == live_before
    for name, tensor in source.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    assert torch.equal(_logits(engine.model, ids), _logits(source, ids))
    expected = source.state_dict()
    if tied:
        expected.pop("lm_head.weight")
    assert stats.num_tensors == len(expected) and stats.num_buckets > 3
    assert stats.num_bytes == sum(t.numel() * t.element_size() for t in expected.values())
    for bucket in hf_weight_buckets(model, source.config, config=WeightSyncConfig(bucket_bytes=bucket_bytes)):
        assert len(bucket) == 1 or sum(t.numel() * t.element_size() for t in bucket.values()) <= bucket_bytes


def test_untied_model_into_tied_engine_is_refused():
    source = build_tiny_qwen3(seed=3, tie_word_embeddings=False)
    model = build_gpt_model(source.config, hf_state_dict=source.state_dict())
    engine = EmbeddedEngine(build_tiny_qwen3(seed=11, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="lm_head.weight and model.embed_tokens.weight share storage"):
        sync_colocated(model, engine, source.config)


def test_colocated_qwen3_moe_engine_equals_hf_source_with_fused_experts():
    source = _tiny_qwen3_moe(seed=1)
    model = build_gpt_model(source.config, hf_state_dict=source.state_dict())
    engine = EmbeddedEngine(_tiny_qwen3_moe(seed=2))
    ids = torch.randint(1, 128, (2, 9))
    assert not torch.allclose(_logits(engine.model, ids), _logits(source, ids))
    config = WeightSyncConfig(bucket_bytes=60_000, fused_experts=True)
    sync_colocated(model, engine, source.config, config=config)
    for name, tensor in source.state_dict().items():  # transformers 5: mlp.experts.gate_up_proj [E, 2F, H]
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    assert torch.equal(_logits(engine.model, ids), _logits(source, ids))


def _fp8_bound(w: torch.Tensor) -> torch.Tensor:
    """Per-element bound of 128x128 blockwise e4m3 round-to-nearest, in float64 from the tile amax.

    e4m3 has 3 mantissa bits: relative error <= 2^-4 for normal values (|x / s| >= 2^-6); below, the
    absolute spacing is 2^-9 in the scaled domain, so the error is <= 2^-10 * s, with s = amax(tile) / 448.
    """
    w = w.double()
    m, n = w.shape
    scale = torch.empty_like(w)
    for i in range(0, m, 128):
        for j in range(0, n, 128):
            scale[i : i + 128, j : j + 128] = w[i : i + 128, j : j + 128].abs().max() / 448
    return 2.0**-4 * w.abs() + 2.0**-10 * scale


def test_fp8_roundtrip_within_blockwise_bound_and_quantize_names():
    # 160 x 192 weights span several 128x128 tiles, with edge tiles.
    source = build_tiny_qwen3(seed=4, hidden_size=192, intermediate_size=160, head_dim=48).eval()
    model = build_gpt_model(source.config, hf_state_dict=source.state_dict())
    engine = EmbeddedEngine(build_tiny_qwen3(seed=5, hidden_size=192, intermediate_size=160, head_dim=48))
    sync_colocated(model, engine, source.config, config=WeightSyncConfig(fp8="roundtrip"))
    num_quantized = 0
    for name, w in source.state_dict().items():
        got = engine.model.state_dict()[name]
        if name.endswith("_proj.weight"):
            err = (got.double() - w.double()).abs()
            assert (err <= _fp8_bound(w)).all(), name
            assert err.max() > 0  # it was rounded
            num_quantized += 1
        else:  # norms, embedding: untouched
            assert torch.equal(got, w), name
    assert num_quantized == 2 * 7
    named = dict(iter_hf_tensors(model, source.config))
    quantized = {
        k: v
        for b in hf_weight_buckets(model, source.config, config=WeightSyncConfig(fp8="quantize"))
        for k, v in b.items()
    }
    q_name = "model.layers.1.mlp.down_proj.weight"
    assert quantized[q_name].dtype == torch.float8_e4m3fn and quantized[q_name].shape == (192, 160)
    assert quantized[q_name + "_scale_inv"].shape == (2, 2)
    assert quantized["model.norm.weight"].dtype == torch.float32
    assert set(quantized) == set(named) | {k + "_scale_inv" for k in named if k.endswith("_proj.weight")}
    with pytest.raises(ValueError, match="fp8='roundtrip'"):
        sync_colocated(model, engine, source.config, config=WeightSyncConfig(fp8="quantize"))


def test_config_and_layout_errors():
    with pytest.raises(ValueError, match="fused_experts"):
        WeightSyncConfig(fp8="quantize", fused_experts=True)
    with pytest.raises(ValueError, match="bucket_bytes"):
        WeightSyncConfig(bucket_bytes=0)
    source = build_tiny_qwen3(seed=0)
    shards = hf_to_megatron(source.state_dict(), source.config.to_dict(), layout=Layout(tp=2))
    with pytest.raises(ValueError, match="tp group has 1 ranks but layout.tp=2"):
        list(iter_hf_tensors(shards[(0, 0, 0)], source.config, layout=Layout(tp=2)))
    with pytest.raises(ValueError, match="pp>1"):
        sync_decoupled(shards[(0, 0, 0)], None, source.config, layout=Layout(pp=2))


# --- 2 gloo processes: TP / EP / expert-TP gathers, and PP stages ---------------------------------------------


def _gather_worker(rank, results, cases):
    import torch.distributed as dist

    world = dist.group.WORLD
    out = {}
    for key, (cfg, shards, layout) in cases.items():
        groups = SyncGroups(
            tp=world if layout.tp == 2 else None,
            ep=world if layout.ep == 2 else None,
            etp=world if layout.etp == 2 else None,
            pp_rank=rank if layout.pp == 2 else 0,
        )
        # Rank r is tp rank r (tp=2), ep rank r (ep=2), stage r (pp=2) of the 2-process grid.
        local = shards[(groups.pp_rank, rank if layout.tp == 2 else 0, rank if layout.ep == 2 else 0)]
        out[key] = dict(iter_hf_tensors(local, cfg, layout=layout, groups=groups))
    out.update(_live_model_parallel_syncs(rank))
    results[rank] = out


LIVE_CASES = {  # a live model-parallel GPTModel built by build_gpt_model on the 2 ranks
    "live_tp2": dict(tensor_model_parallel_size=2),
    "live_tp2_ep2": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1),
    "live_pp2": dict(pipeline_model_parallel_size=2),
}


def _live_source(case: str):
    if case == "live_tp2_ep2":
        return _tiny_qwen3_moe(seed=9)
    return build_tiny_qwen3(seed=10, vocab_size=100, tie_word_embeddings=case == "live_pp2").eval()


def _live_model_parallel_syncs(rank: int) -> dict:
    """Sync each live case into an engine of other weights on this rank; the engine's logits and weights."""
    import warnings

    from megatron.core import parallel_state

    from rlkit.parallel.megatron.model import init_model_parallel
    from rlkit.parallel.megatron.weight_sync import megatron_layout_and_groups

    warnings.simplefilter("ignore")
    out = {}
    for case, sizes in LIVE_CASES.items():
        init_model_parallel(**sizes)
        source = _live_source(case)
        model = build_gpt_model(source.config, hf_state_dict=source.state_dict())
        layout, groups = megatron_layout_and_groups(model.config)
        if case == "live_pp2":  # with the pipeline group, every stage's tensors reach every rank
            out[case] = dict(iter_hf_tensors(model, source.config, layout=layout, groups=groups))
        else:
            moe = case.endswith("ep2")
            other = (
                _tiny_qwen3_moe(seed=1) if moe else build_tiny_qwen3(seed=1, vocab_size=100, tie_word_embeddings=False)
            )
            engine = EmbeddedEngine(other)
            config = WeightSyncConfig(bucket_bytes=50_000, fused_experts=moe)
            sync_colocated(model, engine, source.config, config=config, layout=layout, groups=groups)
            out[case] = (dict(engine.model.state_dict()), _logits(engine.model, _LIVE_IDS))
        parallel_state.destroy_model_parallel()
    return out


_LIVE_IDS = torch.arange(3, 3 + 2 * 11).reshape(2, 11) % 100


def test_tp_ep_etp_pp_gathers_on_two_processes_equal_the_hf_state_dict():
    dense = build_tiny_qwen3(seed=6, vocab_size=100, tie_word_embeddings=False)  # vocab padded to 256 under tp=2
    moe = _tiny_qwen3_moe(seed=7)
    cases, expected = {}, {}
    for key, hf, layout in (
        ("dense_tp2", dense, Layout(tp=2)),
        ("dense_pp2", build_tiny_qwen3(seed=8), Layout(pp=2)),
        ("moe_tp2_ep2", moe, Layout(tp=2, ep=2, etp=1)),
        ("moe_tp2_etp2", moe, Layout(tp=2, ep=1, etp=2)),
    ):
        cfg = hf.config.to_dict()
        cases[key] = (cfg, hf_to_megatron(hf.state_dict(), cfg, layout=layout), layout)
        expected[key] = split_fused_experts(hf.state_dict())
    expected["dense_pp2"].pop("lm_head.weight")  # tied: the embedding is the head
    results = run_on_gloo_ranks(_gather_worker, 2, cases)
    for case in ("live_tp2", "live_tp2_ep2"):  # every rank's engine holds the HF source's weights and logits
        source = _live_source(case)
        for rank in range(2):
            weights, logits = results[rank][case]
            assert weights.keys() == source.state_dict().keys()
            for name, tensor in source.state_dict().items():
                assert torch.equal(weights[name], tensor), (case, rank, name)
            torch.testing.assert_close(logits, _logits(source, _LIVE_IDS), rtol=0, atol=1e-6)
    expected["live_pp2"] = dict(_live_source("live_pp2").state_dict())
    expected["live_pp2"].pop("lm_head.weight")
    for key, want in expected.items():
        if key == "dense_pp2":  # each stage emits its own layers; together they are the model
            first, last = results[0][key], results[1][key]
            assert not set(first) & set(last)
            assert "model.embed_tokens.weight" in first and "model.norm.weight" in last
            got = first | last
        else:  # every rank of the TP/EP group gathers the whole model
            got = results[0][key]
            assert results[1][key].keys() == got.keys()
            assert all(torch.equal(results[1][key][k], v) for k, v in got.items())
        assert got.keys() == want.keys(), key
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (key, name)


# --- decoupled: broadcast into a ProcessEngine ----------------------------------------------------------------


def _greedy(engine, prompt):
    samples = [Sample(prompt=prompt, tokens=list(prompt_tokens)) for prompt_tokens in ([5, 9, 17, 3], [8, 2])]
    engine.generate(samples, SamplingParams(temperature=0, max_new_tokens=6))
    return [s.tokens for s in samples], [s.rollout_log_probs for s in samples]


def test_decoupled_broadcast_into_process_engine():
    source = build_tiny_qwen3(seed=7).eval()
    model = build_gpt_model(source.config, hf_state_dict=source.state_dict())
    reference = _greedy(EmbeddedEngine(source), "p")  # the same weights, generating in this process
    with ProcessEngine("rlkit.rollout.engines.embedded:tiny_engine", {"seed": 0}, start_timeout_s=120) as engine:
        assert _greedy(engine, "p")[1] != reference[1]  # different weights before the sync
        engine.init_weight_group(backend="gloo", device="cpu", timeout_s=60)
        stats = sync_decoupled(model, engine, source.config, config=WeightSyncConfig(bucket_bytes=30_000))
        assert stats.num_buckets > 3
        tokens, log_probs = _greedy(engine, "p")
        assert tokens == reference[0]
        for got, want in zip(log_probs, reference[1], strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)

        # Protocol errors name the tensor; the group stays usable after them.
        with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\), model expects \(64,\)"):
            engine.update_weights_by_broadcast([{"model.norm.weight": torch.zeros(3)}])
        with pytest.raises(KeyError, match="model.nope"):
            engine.update_weights_by_broadcast([{"model.nope": torch.zeros(3)}])

        def failing_stream():
            yield {"model.norm.weight": torch.zeros(64)}
            raise RuntimeError("trainer side failed")

        with pytest.raises(RuntimeError, match="trainer side failed"):
            engine.update_weights_by_broadcast(failing_stream())
        sync_decoupled(model, engine, source.config)
        assert _greedy(engine, "p")[0] == reference[0]


def test_weight_group_join_timeout_names_the_group():
    with pytest.raises(WeightGroupError, match=r"could not form within 1 s"):
        new_weight_group(host="127.0.0.1", port=_port(), rank=0, world_size=2, timeout_s=1)


def _port() -> int:
    from rlkit.rollout.engines.process import free_port

    return free_port()


# --- GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_colocated_on_cuda_bit_exact_and_compiled_fp8_within_bound():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    source = build_tiny_qwen3(seed=4, hidden_size=192, intermediate_size=160, head_dim=48).eval().cuda()
    model = build_gpt_model(source.config, hf_state_dict=source.state_dict(), device="cuda")
    engine = EmbeddedEngine(build_tiny_qwen3(seed=5, hidden_size=192, intermediate_size=160, head_dim=48).cuda())
    sync_colocated(model, engine, source.config, config=WeightSyncConfig(bucket_bytes=100_000))
    for name, tensor in source.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    sync_colocated(model, engine, source.config, config=WeightSyncConfig(fp8="roundtrip", fp8_compile=True))
    for name, w in source.state_dict().items():
        got = engine.model.state_dict()[name]
        if name.endswith("_proj.weight"):
            assert ((got.double() - w.double()).abs() <= _fp8_bound(w)).all(), name
        else:
            assert torch.equal(got, w), name
