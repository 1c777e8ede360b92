"""An uneven pipeline split (2 gloo ranks; 1 layer on the first stage, 2 on the last) == one HF process.

slime's large recipes set ``--decoder-first/last-pipeline-num-layers``; megatron-core takes them as
``num_layers_in_first/last_pipeline_stage``. Each stage must build its own layers, load their weights
(the HF -> megatron conversion must split the same way), train to the single-process gradients, and give
the weight sync every stage's tensors back under their HF names.
Reference: HF transformers' unsharded 3-layer model, the same step on one process (float32).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")


from rl_batches import synthetic_rl_batch  # noqa: E402

from gloo_ranks import run_on_gloo_ranks  # noqa: E402
from rlkit.algos.losses import PolicyLossConfig  # noqa: E402
from rlkit.ckpt.convert import Layout, megatron_to_hf  # noqa: E402
from rlkit.parallel.megatron.forward import hf_forward  # noqa: E402
from rlkit.parallel.megatron.step import RLBatch, train_step  # noqa: E402
from rlkit.parallel.packing import DataPacker  # noqa: E402

WORLD = 2
VOCAB = 200
LENGTHS = [9, 17, 5, 23, 12]
RESPONSES = [4, 10, 2, 15, 6]
LOSS = PolicyLossConfig(aggregation="token_mean")
SPLIT = dict(num_layers_in_first_pipeline_stage=1)  # 3 layers: stage 0 holds layer 0, stage 1 layers 1-2


def _hf_model():
    from rlkit.models.tiny import build_tiny_qwen3

    return build_tiny_qwen3(seed=3, vocab_size=VOCAB, num_hidden_layers=3).train()


def _batch() -> RLBatch:
    return synthetic_rl_batch(LENGTHS, RESPONSES, vocab=VOCAB)


def _worker(rank: int, results) -> None:
    from megatron.core import parallel_state as ps

    from rlkit.parallel.megatron import weight_sync
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel

    init_model_parallel(pipeline_model_parallel_size=2)
    hf = _hf_model()
    model = build_gpt_model(hf.config, hf_state_dict=hf.state_dict(), **SPLIT)
    layout, groups = weight_sync.megatron_layout_and_groups(model.config)
    synced = {
        name: t.clone() for name, t in weight_sync.iter_hf_tensors(model, hf.config, layout=layout, groups=groups)
    }
    step = train_step(
        model, None, _batch(), packer=DataPacker(max_tokens_per_gpu=40), loss_config=LOSS,
        forward=megatron_forward(model), vocab_size=VOCAB, max_grad_norm=None,
    )  # fmt: skip
    results[rank] = dict(
        layers=len(model.decoder.layers),
        stage=ps.get_pipeline_model_parallel_rank(),
        loss=step.loss,
        grad_norm=step.grad_norm,
        grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        synced=synced,
    )
    ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def parallel_results():
    return run_on_gloo_ranks(_worker, WORLD)


def test_uneven_stages_build_their_layers_and_sync_every_weight(parallel_results):
    assert [parallel_results[r]["layers"] for r in range(WORLD)] == [1, 2]
    want = _hf_model().state_dict()
    for rank in range(WORLD):  # every rank receives the whole model under HF names, bit for bit
        synced = parallel_results[rank]["synced"]
        assert set(synced) == {k for k in want if k != "lm_head.weight"}  # tied head: the embedding only
        for name, tensor in synced.items():
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)


def test_uneven_pipeline_step_reproduces_single_process(parallel_results):
    hf = _hf_model()
    model = copy.deepcopy(hf)
    want = train_step(
        model, None, _batch(), packer=DataPacker(max_tokens_per_gpu=1000), loss_config=LOSS,
        forward=hf_forward(model), vocab_size=VOCAB, layout="bshd", max_grad_norm=None,
    )  # fmt: skip
    want_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    shards = {(parallel_results[r]["stage"], 0, 0): parallel_results[r]["grads"] for r in range(WORLD)}
    grads = megatron_to_hf(shards, hf.config.to_dict(), layout=Layout(pp=2, decoder_first_pipeline_num_layers=1))
    assert {k for k in want_grads if "layers.2." in k} <= set(grads)  # the last stage's second layer is there
    for key, want_grad in want_grads.items():
        scale = float(want_grad.abs().max())
        # float32, the same sums in another order: ~1e-6 relative
        torch.testing.assert_close(grads[key], want_grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=key)
    for rank in range(WORLD):
        assert parallel_results[rank]["loss"] == pytest.approx(want.loss, rel=1e-5, abs=1e-7)
        assert parallel_results[rank]["grad_norm"] == pytest.approx(want.grad_norm, rel=1e-5)


def test_stage_layers_agree_with_megatrons_offsets():
    """rlkit.ckpt's stage split == megatron-core's layer offset and count per stage, uneven ends included."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from rlkit.ckpt.convert import stage_layers

    checked = 0
    for num_layers in range(2, 13):
        for pp in (2, 3, 4):
            for first in (None, 1, 2, 3):
                for last in (None, 1, 2, 3):
                    layout = Layout(
                        pp=pp, decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last
                    )
                    fields = dict(
                        num_layers=num_layers, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=pp,
                        pipeline_dtype=torch.float32, num_layers_in_first_pipeline_stage=first,
                        num_layers_in_last_pipeline_stage=last,
                    )  # fmt: skip
                    try:
                        ours = stage_layers(num_layers, layout)
                    except ValueError:  # not splittable (megatron-core accepts some of these, e.g. last > layers)
                        continue
                    config = TransformerConfig(**fields)
                    theirs = [
                        range(get_transformer_layer_offset(config, pp_rank=rank),
                              get_transformer_layer_offset(config, pp_rank=rank)
                              + get_num_layers_to_build(config, pp_rank=rank))
                        for rank in range(pp)
                    ]  # fmt: skip
                    assert ours == theirs, (num_layers, pp, first, last)
                    checked += 1
    assert checked > 100


def test_megatron_layout_names_what_it_cannot_express(megatron_world):
    """The weights' layout comes from the model's config: splits rlkit's conversion does not know are refused."""
    import types

    from rlkit.parallel.megatron.model import megatron_layout

    assert megatron_layout(None) == Layout()  # one stage: nothing to read from the config
    split = types.SimpleNamespace(num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=None)
    assert megatron_layout(split).decoder_first_pipeline_num_layers == 1
    for field, value in (
        ("virtual_pipeline_model_parallel_size", 2),
        ("pipeline_model_parallel_layout", "Et|tL"),
        ("account_for_embedding_in_pipeline_split", True),
        ("account_for_loss_in_pipeline_split", True),
    ):
        with pytest.raises(ValueError, match=field):
            megatron_layout(types.SimpleNamespace(**{field: value}))
