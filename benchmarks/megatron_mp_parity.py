"""2-GPU acceptance check: one GRPO step under TP2, TP2+SP, PP2, DP2, CP2 (dense) and EP2 (MoE) vs one GPU.

Rank 0 first runs the single-GPU step in a subprocess (the reference: megatron-core on one GPU, no model
parallelism), then both ranks run the same step - same random-init weights, same global batch - under each
layout, and rank 0 prints a table of loss, gradient norm and their relative differences to the reference.
No optimizer step (the gradients are what the step would apply), except in the ``+distopt`` layouts (CUDA):
the same step through megatron's DDP + ``DistributedOptimizer`` (and ``--optimizer-cpu-offload``), whose
own grad norm is compared and whose AdamW update is checked (size ~lr, DP replicas identical).

Tolerance (bf16): a layout passes when ``|loss - ref| / |ref| <= 5e-3`` and the grad-norm difference
``<= 2e-2``. Sharding changes only the order of bf16 sums (TP partial products reduced across ranks,
other micro-batch splits under DP/CP, other token blocks under EP), and bf16 keeps 8 significant bits
(2^-8 = 3.9e-3 per rounding). Next to the table the script measures that noise floor in the same run: the
single-GPU step with half the token budget (another micro-batch split, same math); on one H100 the THD vs
padded paths differed by 9.5e-4 (loss) and 6.6e-4 (grad norm), THD vs HF bf16 by 4.1e-4 / 8.1e-3
(RESULTS.md). In float32 (``--device cpu``) the bound is 1e-5.

Commands::

    python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/megatron_mp_parity.py --out $OUT/mp_parity.json
    # CPU smoke (gloo, tiny shapes, float32):
    PYTHONPATH=src python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/megatron_mp_parity.py --device cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from rlkit.algos.losses import PolicyLossConfig
from rlkit.parallel.megatron.step import RLBatch, train_step
from rlkit.parallel.packing import DataPacker

# Small Qwen3 shapes with the real vocabulary (the vocab-parallel head and its padding are part of the test).
SHAPES = {
    "dense": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "moe": dict(
        model_type="qwen3_moe", hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
        num_experts_per_tok=4, vocab_size=151936, tie_word_embeddings=False,
    ),
    "dense-tiny": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=True,
    ),
    "moe-tiny": dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=176, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, vocab_size=1000, tie_word_embeddings=False,
    ),
}  # fmt: skip
# layout -> (model, init_model_parallel sizes, sequence_parallel)
LAYOUTS = {
    "tp2": ("dense", dict(tensor_model_parallel_size=2), False),
    "tp2_sp": ("dense", dict(tensor_model_parallel_size=2), True),
    "pp2": ("dense", dict(pipeline_model_parallel_size=2), False),
    "dp2": ("dense", dict(), False),
    "cp2": ("dense", dict(context_parallel_size=2), False),
    "ep2": ("moe", dict(expert_model_parallel_size=2), False),
}
# The same step through megatron's DDP + DistributedOptimizer (AdamW, one update), CUDA only:
# layout -> (base layout, optimizer_cpu_offload)
DISTOPT_LAYOUTS = {
    "dp2+distopt": ("dp2", False),
    "tp2+distopt": ("tp2", False),
    "pp2+distopt": ("pp2", False),
    "ep2+distopt": ("ep2", False),
    "dp2+distopt+offload": ("dp2", True),
}
DISTOPT_LR = 1e-2  # large enough that one update is resolved by bf16 weights (~0.02, ulp ~1e-4)
TOLERANCE = {"bf16": (5e-3, 2e-2), "fp32": (1e-5, 1e-5)}  # (loss, grad norm) relative


@functools.cache
def hf_weights(kind: str, tiny: bool, dtype: torch.dtype):
    """``(config, state dict in dtype)`` of :func:`hf_model`, built once per process."""
    hf = hf_model(kind, tiny)
    return hf.config, {k: v.to(dtype) for k, v in hf.state_dict().items()}


def hf_model(kind: str, tiny: bool):
    """A random-init HF model (std 0.02, seed 0), built on the CPU so every process gets the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[f"{kind}-tiny" if tiny else kind])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(
        model_type, **fields, rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1_000_000.0
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def rl_batch(num_samples: int, *, vocab: int, tiny: bool) -> RLBatch:
    """Fixed synthetic GRPO batch: prompt 64-256 / response 128-2048 tokens (tiny: 4-16 / 2-40)."""
    g = torch.Generator().manual_seed(0)
    (p_lo, p_hi), (r_lo, r_hi) = ((4, 16), (2, 40)) if tiny else ((64, 256), (128, 2048))
    prompts = torch.randint(p_lo, p_hi + 1, (num_samples,), generator=g).tolist()
    responses = torch.randint(r_lo, r_hi + 1, (num_samples,), generator=g).tolist()
    tokens = [torch.randint(1, vocab, (p + r,), generator=g) for p, r in zip(prompts, responses, strict=True)]
    adv = [torch.full((r,), float(torch.randn(1, generator=g))) for r in responses]
    log_v = float(torch.log(torch.tensor(float(vocab))))
    old = [-log_v + 0.3 * torch.randn(r, generator=g) for r in responses]
    return RLBatch(tokens=tokens, response_lengths=responses, advantages=adv, old_log_probs=old)


def run_step(
    kind: str,
    args,
    *,
    sizes: dict,
    sequence_parallel: bool,
    budget: int,
    distopt: bool = False,
    offload: bool = False,
) -> dict:
    """Build this rank's model under ``sizes`` and run the step; the same numbers on every rank.

    With ``distopt`` the step runs through megatron's DDP + DistributedOptimizer (AdamW, lr 1e-2, one update)
    and also reports ``update_over_lr`` (mean |weight change| / lr over weights with a gradient: 1 up to bf16
    rounding, since Adam's first update is ``lr * g / (|g| + eps)``) and ``replica_max_abs_diff`` (the
    largest weight difference between the two ranks after the update: 0 when DP replicas stayed in sync).
    """
    from megatron.core import parallel_state

    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel

    tiny = args.device == "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    init_model_parallel(**sizes)
    config, state = hf_weights(kind, tiny, dtype)
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    model = build_gpt_model(
        config, hf_state_dict=state, params_dtype=dtype, device=device, sequence_parallel=sequence_parallel
    )
    cp = parallel_state.get_context_parallel_world_size()
    packer = DataPacker(
        dp_size=parallel_state.get_data_parallel_world_size(), cp_size=cp, max_tokens_per_gpu=budget // cp
    )
    vocab = config.vocab_size
    batch = rl_batch(args.num_samples, vocab=vocab, tiny=tiny)
    optimizer, extra = None, {}
    if distopt:
        from rlkit.parallel.megatron.distributed import build_distributed_optimizer

        model, optimizer = build_distributed_optimizer(
            model, lr=DISTOPT_LR, clip_grad=None, optimizer_cpu_offload=offload
        )
        before = [p.detach().float().clone() for p in model.parameters()]
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = train_step(
        model, optimizer, batch, packer=packer, loss_config=PolicyLossConfig(), forward=megatron_forward(model),
        vocab_size=vocab, max_grad_norm=None,
    )  # fmt: skip
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if distopt:
        extra = update_checks(model, before)
    del model, optimizer
    parallel_state.destroy_model_parallel()
    return dict(
        loss=out.loss, grad_norm=out.grad_norm, micro_batches_per_rank=out.num_micro_batches,
        tokens_per_rank=out.num_tokens, seconds=round(seconds, 3), **extra,
    )  # fmt: skip


def update_checks(model, before: list[torch.Tensor]) -> dict:
    """Mean |weight change| / lr where the gradient is nonzero, and the largest difference between the ranks."""
    import torch.distributed as dist

    after = [p.detach().float() for p in model.parameters()]
    moved, count = 0.0, 0
    for p, a, b in zip(model.parameters(), after, before, strict=True):
        trained = p.main_grad != 0  # DDP's gradient buffer (reduced on this rank's shard, local elsewhere)
        moved += float((a - b).abs()[trained].sum())
        count += int(trained.sum())
    # Ranks that hold other shards (TP/PP/EP) differ by design: the comparison is meaningful for DP replicas.
    flat = torch.cat([a.flatten() for a in after])
    sizes = [torch.zeros((), dtype=torch.long, device=flat.device) for _ in range(2)]
    dist.all_gather(sizes, torch.tensor(flat.numel(), device=flat.device))
    diff = float("nan")
    if int(sizes[0]) == int(sizes[1]):
        other = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(other, flat)
        diff = float((other[0] - other[1]).abs().max())
    return dict(update_over_lr=moved / max(count, 1) / DISTOPT_LR, replica_max_abs_diff=diff)


def reference_main(args) -> None:
    """Single process, one device: the reference step of each model, and the same with half the budget."""
    from rlkit.parallel.megatron.model import init_model_parallel

    init_model_parallel()
    out = {}
    for kind in sorted({kind for kind, _, _ in LAYOUTS.values()}):
        out[kind] = run_step(kind, args, sizes={}, sequence_parallel=False, budget=args.max_tokens_per_gpu)
        out[f"{kind}_half_budget"] = run_step(
            kind, args, sizes={}, sequence_parallel=False, budget=args.max_tokens_per_gpu // 2
        )
    with open(args.reference_json, "w") as f:
        json.dump(out, f)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument(
        "--no-distopt", dest="distopt", action="store_false",
        help="skip the DDP + DistributedOptimizer layouts (CUDA only; never run on cpu)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON results (default: $OUT/megatron_mp_parity.json if set)")
    parser.add_argument("--reference-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cpu":
        args.num_samples, args.max_tokens_per_gpu = min(args.num_samples, 12), min(args.max_tokens_per_gpu, 96)
    warnings.filterwarnings("ignore")
    if args.reference_json:
        reference_main(args)
        return
    rank = int(os.environ.get("RANK", 0))
    if os.environ.get("WORLD_SIZE") != "2":
        sys.exit("run with: python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/megatron_mp_parity.py")
    out_path = args.out or (os.path.join(os.environ["OUT"], "megatron_mp_parity.json") if "OUT" in os.environ else None)
    reference_json = f"/tmp/megatron_mp_parity_reference_{os.getpid()}.json"
    if rank == 0:
        # The reference runs alone on GPU 0 before the 2-rank group exists; rank 1 waits at the rendezvous.
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
        }
        cmd = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--num-samples",
               str(args.num_samples), "--max-tokens-per-gpu", str(args.max_tokens_per_gpu),
               "--reference-json", reference_json]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        with open(reference_json) as f:
            reference = json.load(f)
    from rlkit.parallel.megatron.model import init_model_parallel

    init_model_parallel()  # the 2-rank process group; each layout re-creates megatron's groups
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    rows = {}
    names = args.layouts.split(",") + (list(DISTOPT_LAYOUTS) if args.device == "cuda" and args.distopt else [])
    for name in names:
        base, offload = DISTOPT_LAYOUTS.get(name, (name, False))
        kind, sizes, sequence_parallel = LAYOUTS[base]
        try:
            rows[name] = dict(model=kind, **run_step(kind, args, sizes=sizes, sequence_parallel=sequence_parallel,
                                                     budget=args.max_tokens_per_gpu, distopt=name in DISTOPT_LAYOUTS,
                                                     offload=offload))  # fmt: skip
            if rank == 0:
                print(f"done {name}: {rows[name]}", file=sys.stderr, flush=True)
        except Exception as error:  # noqa: BLE001 - report the layout that failed, keep measuring the others
            rows[name] = dict(model=kind, error=f"{type(error).__name__}: {error}"[:500])
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
    if rank != 0:
        return
    loss_tol, norm_tol = TOLERANCE[args.dtype]
    noise = {
        kind: dict(
            loss_rel=rel(reference[f"{kind}_half_budget"]["loss"], reference[kind]["loss"]),
            grad_norm_rel=rel(reference[f"{kind}_half_budget"]["grad_norm"], reference[kind]["grad_norm"]),
        )
        for kind in ("dense", "moe")
    }
    print(f"{'layout':20} {'model':6} {'loss':>12} {'ref loss':>12} {'rel':>9} {'grad norm':>11} {'ref':>11} "
          f"{'rel':>9} {'pass':>5}")  # fmt: skip
    for name, row in rows.items():
        ref = reference[row["model"]]
        if "error" in row:
            print(f"{name:20} {row['model']:6} ERROR {row['error']}")
            continue
        row.update(
            ref_loss=ref["loss"], ref_grad_norm=ref["grad_norm"], loss_rel=rel(row["loss"], ref["loss"]),
            grad_norm_rel=rel(row["grad_norm"], ref["grad_norm"]),
        )  # fmt: skip
        row["passed"] = row["loss_rel"] <= loss_tol and row["grad_norm_rel"] <= norm_tol
        if "update_over_lr" in row:
            # Adam's first update moves every weight with a non-negligible gradient by ~lr.
            row["passed"] = row["passed"] and 0.9 < row["update_over_lr"] < 1.1
            if name.startswith("dp2"):
                row["passed"] = row["passed"] and row["replica_max_abs_diff"] == 0.0
        print(f"{name:20} {row['model']:6} {row['loss']:12.6f} {ref['loss']:12.6f} {row['loss_rel']:9.2e} "
              f"{row['grad_norm']:11.5f} {ref['grad_norm']:11.5f} {row['grad_norm_rel']:9.2e} "
              f"{str(row['passed']):>5}"
              + (f"  update/lr {row['update_over_lr']:.3f} replica diff {row['replica_max_abs_diff']:.1e}"
                 if "update_over_lr" in row else ""))  # fmt: skip
    for kind, values in noise.items():
        print(f"noise floor ({kind}, single device, half the token budget): loss {values['loss_rel']:.2e}, "
              f"grad norm {values['grad_norm_rel']:.2e}")  # fmt: skip
    result = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        dtype=args.dtype, num_samples=args.num_samples, max_tokens_per_gpu=args.max_tokens_per_gpu,
        tolerance=dict(loss_rel=loss_tol, grad_norm_rel=norm_tol), reference=reference, noise_floor=noise,
        layouts=rows, all_passed=all(row.get("passed", False) for row in rows.values()),
    )  # fmt: skip
    print(json.dumps(dict(all_passed=result["all_passed"])))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
