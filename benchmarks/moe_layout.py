"""The Qwen3-30B-A3B seed's MoE layout at reduced size: GRPO steps, loss / grad-norm parity, tokens/s, memory.

Issue 11. The seed trains Qwen3-30B-A3B with TP4, sequence parallel, EP8, ETP1, dynamic batch and full
recompute on 8 GPUs. This script runs that layout (or its 2- and 4-GPU versions: ``--tp 2 --ep 2``) on a
Qwen3-MoE with the seed's expert count (128) and routing (top-8) and widths (hidden 2048, 32 q / 4 kv
heads of 128, expert width 768, vocabulary 151,936) but fewer layers, random init (bf16, seeded, so every
launch builds the same weights). Every rank runs ``--steps`` GRPO steps (AdamW) on the same synthetic
batch and writes loss, grad norm, tokens/s and its peak memory, next to ``ParallelPlan``'s estimate for
the layout, to ``--out``.

Run the reference (one GPU, TP1/EP1) and the layout as two launches, then compare::

    torchrun --nproc-per-node 1 benchmarks/moe_layout.py --out ref.json
    torchrun --nproc-per-node 2 benchmarks/moe_layout.py --tp 2 --sp --ep 2 --out tp2ep2.json
    python benchmarks/moe_layout.py --compare ref.json tp2ep2.json

CPU smoke run (gloo, fp32, a 2-layer 8-expert model): add ``--device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Qwen3-30B-A3B's published config.json numbers (Qwen/Qwen3-30B-A3B), layers reduced by --layers.
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936,
    norm_topk_prob=True, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512,
    norm_topk_prob=True, tie_word_embeddings=False,
)  # fmt: skip


def hf_moe_config(*, tiny: bool, layers: int):
    """A transformers ``Qwen3MoeConfig`` with every layer sparse."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **(TINY if tiny else QWEN3_30B_A3B),
        num_hidden_layers=layers,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        attention_bias=False,
    )


def plan_estimate(config, args, world: int) -> dict:
    """ParallelPlan's per-GPU memory estimate (bytes) for this layout and model."""
    from rlkit.models.presets import spec_from_hf_config
    from rlkit.parallel.memory import estimate_memory
    from rlkit.parallel.plan import ParallelPlan

    plan = ParallelPlan(
        tp=args.tp,
        sp=args.sp,
        ep=args.ep,
        etp=1,
        recompute="full" if args.recompute else "none",
        max_tokens_per_gpu=args.max_tokens_per_gpu,
        moe_token_dispatcher_type="allgather",
        use_distributed_optimizer=False,
    )
    spec = spec_from_hf_config(config.to_dict(), name="qwen3-30b-a3b-reduced")
    stage = estimate_memory(plan, spec, world, gpus_per_node=world).worst
    return {
        "weights": stage.weights,
        "grads": stage.grads,
        "optimizer_fp32_adam": stage.optimizer,
        "activations": stage.activations,
        "logits": stage.logits,
        "total": stage.total,
        "local_params": stage.dense_params + stage.expert_params,
    }


def run(args) -> dict:
    from megatron_common import rl_batch

    from rlkit.algos.losses import PolicyLossConfig
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel
    from rlkit.parallel.megatron.step import train_step
    from rlkit.parallel.packing import DataPacker

    warnings.filterwarnings("ignore")
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    init_model_parallel(tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep,
                        expert_tensor_parallel_size=1)  # fmt: skip
    from megatron.core import parallel_state as ps

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = hf_moe_config(tiny=args.tiny, layers=args.layers)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(args.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    overrides = {}
    if args.recompute:
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(config, hf_state_dict=hf.state_dict(), params_dtype=dtype, device=args.device,
                            sequence_parallel=args.sp, **overrides)  # fmt: skip
    del hf
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    vocab = config.vocab_size
    response = (32, 96) if args.tiny else (128, 2048)
    prompt = (8, 32) if args.tiny else (64, 256)
    batch = rl_batch(args.num_samples, vocab=vocab, seed=args.seed, prompt=prompt, response=response)
    packer = DataPacker(max_tokens_per_gpu=args.max_tokens_per_gpu, dp_size=ps.get_data_parallel_world_size())
    forward = megatron_forward(model)
    steps = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_step(model, optimizer, batch, packer=packer, loss_config=PolicyLossConfig(eps_clip_high=0.28),
                            forward=forward, vocab_size=vocab, layout="thd", max_grad_norm=1.0)  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(len(t) for t in batch.tokens)
        steps.append(dict(step=step, loss=result.loss, grad_norm=result.grad_norm, seconds=seconds,
                          tokens_per_s=tokens / seconds, micro_batches=result.num_micro_batches))  # fmt: skip
        if rank == 0:
            print(f"step {step}: loss {result.loss:.6f} grad_norm {result.grad_norm:.6f} {seconds:.2f} s "
                  f"{tokens / seconds:,.0f} tok/s (all GPUs)", flush=True)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() if cuda else None
    peaks = [None] * world
    torch.distributed.all_gather_object(peaks, peak)
    local_params = sum(p.numel() for p in model.parameters())
    return dict(
        layout=dict(
            tp=args.tp,
            sp=args.sp,
            ep=args.ep,
            etp=1,
            world=world,
            recompute=args.recompute,
            max_tokens_per_gpu=args.max_tokens_per_gpu,
        ),  # fmt: skip
        model=dict(layers=args.layers, tiny=args.tiny, experts=config.num_experts, top_k=config.num_experts_per_tok),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        tokens=sum(len(t) for t in batch.tokens),
        steps=steps,
        peak_bytes_per_rank=peaks,
        local_params_rank0=local_params,
        plan_estimate=plan_estimate(config, args, world),
        note="optimizer: torch AdamW on bf16 params (2 x 2 B/param local); plan's optimizer term assumes fp32 Adam",
    )


def compare(ref_path: str, paths: list[str]) -> None:
    """Print loss / grad norm of every step of each layout next to the reference's, and memory vs estimate."""
    ref = json.load(open(ref_path))
    print(f"reference: {ref['layout']} on {ref['device']}, {ref['tokens']} tokens/step")
    head = f"{'layout':<22}{'step':>5}{'loss':>14}{'rel d loss':>12}{'grad norm':>12}{'rel d gn':>10}{'tok/s':>10}"
    print(head)
    for path in [ref_path, *paths]:
        run = json.load(open(path))
        lay = run["layout"]
        name = f"tp{lay['tp']}{'+sp' if lay['sp'] else ''} ep{lay['ep']} x{lay['world']}"
        for mine, base in zip(run["steps"], ref["steps"], strict=True):
            dl = abs(mine["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
            dg = abs(mine["grad_norm"] - base["grad_norm"]) / base["grad_norm"]
            print(f"{name:<22}{mine['step']:>5}{mine['loss']:>14.6f}{dl:>12.2e}{mine['grad_norm']:>12.5f}{dg:>10.2e}"
                  f"{mine['tokens_per_s']:>10,.0f}")  # fmt: skip
        est = run["plan_estimate"]
        peaks = [p for p in run["peak_bytes_per_rank"] if p is not None]
        if peaks:
            like = est["weights"] + est["grads"] + 4 * est["local_params"] + est["activations"] + est["logits"]
            print(f"  peak/GPU {max(peaks) / 2**30:.2f} GiB; plan (weights+grads+bf16 AdamW+act+logits) "
                  f"{like / 2**30:.2f} GiB; plan with fp32 Adam {est['total'] / 2**30:.2f} GiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-recompute", dest="recompute", action="store_false")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 8-expert model for a CPU smoke run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="reference JSON, then the layouts' JSON")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare[0], args.compare[1:])
        return
    if args.tiny:
        args.layers = min(args.layers, 2)
    result = run(args)
    if torch.distributed.get_rank() == 0 and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
