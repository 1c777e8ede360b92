"""Throughput of one GRPO optimizer step: megatron-core THD packed vs padded vs HF transformers, one GPU.

Qwen3-1.7B shape (random init, bf16 weights, fused AdamW on the bf16 parameters), a
synthetic RL batch (48 samples, prompts 64-256, responses 128-2048 tokens, uniform), dynamic micro-batches from
``DataPacker(max_tokens_per_gpu=...)``; the same micro-batches go to every path:

* ``megatron_thd``: megatron-core GPTModel, rlkit's fused local spec (``spec.gpt_layer_spec()``: each
  sublayer one compiled region, ``fused_layer.FusedTransformerLayer``), THD packing with PyTorch varlen attention;
* ``megatron_thd_modules``: the same fused modules (RMSNorm / SwiGLU / RoPE kernels) run one by one through
  megatron's ``TransformerLayer`` (``gpt_layer_spec(compiled_sublayers=False)``);
* ``megatron_thd_stock``: the same with megatron-core's stock local modules (``gpt_layer_spec(fused=False)``),
  the baseline the fusion is measured against;
* ``megatron_thd_loop_experts``: MoE shapes only, ``megatron_thd`` with megatron's per-expert ``SequentialMLP``
  loop instead of the grouped-GEMM experts (``build_gpt_model(grouped_experts=False)``);
* ``megatron_padded``: the fused model on right-padded ``[B, S]`` rows (causal SDPA);
* ``hf_padded``: HF transformers ``Qwen3ForCausalLM`` (sdpa) on the same padded rows.

tokens/s counts real tokens (padding excluded); MFU = model FLOPs (``megatron_common.train_flops``:
matmuls + causal attention, forward + backward) / step time / dense BF16 peak. One warm-up step, then
the median of ``--steps`` timed steps (each: packing, forward, log-probs, loss, backward, grad norm,
clip, AdamW; the warm-up also compiles the fused kernels, and each row reports
``graphs_compiled_while_timed``, which is 0 unless a shape forced a recompile). ``--configs`` pairs a
budget with activation recompute: ``none``; ``full`` (megatron's
full/uniform/1-layer recompute, HF's gradient checkpointing); or ``blockN`` (megatron recomputes the
first ``N`` layers of the stack, full/block/N; HF has no partial form and checkpoints every layer).
Recompute FLOPs are not counted in MFU. ``--profile PREFIX`` writes a kernel table of one step of each
megatron THD path to ``PREFIX.<path>.txt``; ``--out`` writes every row as JSON.

Command (one H100, as recorded in ``RESULTS.md``): ``cd benchmarks && PYTHONPATH=../src python megatron_step.py
--configs 8192:none 16384:none 16384:full`` (at 16384 only the fused megatron THD path fits without recompute;
the others report ``CUDA OOM`` there). CPU smoke run: ``cd benchmarks && PYTHONPATH=../src python
megatron_step.py --shape tiny --device cpu --num-samples 2 --steps 1 --configs 1024:none``

Tensor parallelism (the Qwen3-4B seed's layout, TP2 + SP): ``torchrun --nproc-per-node 2 megatron_step.py --shape
qwen3-4b --tp 2 --sequence-parallel --configs 9216:full --paths megatron_thd megatron_thd_modules``; every rank
trains the same global batch on its shards (DP 1), rank 0 prints, and MFU is per GPU (model FLOPs / step time /
(peak x GPUs)). The HF path runs only without TP.

Routed experts (4 layers of Qwen3-30B-A3B, all 128 experts on one GPU; MFU counts the active parameters):
``python megatron_step.py --shape qwen3-30b-a3b-4l --configs 8192:none 8192:full --paths megatron_thd
megatron_thd_loop_experts hf_padded``.
"""

from __future__ import annotations

import argparse
import builtins
import json
import statistics
import time
import warnings

import torch
from megatron_common import peak_bf16_flops, random_hf_model, rl_batch, train_flops

from rlkit.algos.losses import PolicyLossConfig
from rlkit.parallel.megatron.forward import hf_forward, megatron_forward
from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel
from rlkit.parallel.megatron.step import train_step
from rlkit.parallel.packing import DataPacker


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(model, forward, batch, *, layout: str, budget: int, steps: int, device: str) -> tuple[float, dict]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    kwargs = dict(
        packer=DataPacker(max_tokens_per_gpu=budget),
        loss_config=PolicyLossConfig(),
        forward=forward,
        vocab_size=151936,
        layout=layout,
    )
    info = {}
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from torch._dynamo.utils import counters

    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        res = train_step(model, optimizer, batch, **kwargs)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        else:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
        info = dict(micro_batches=res.num_micro_batches, tokens_fed=res.num_tokens, loss=res.loss)
    # torch.compile work inside the timed steps would be a recompile (a new shape the warm-up did not see).
    info["graphs_compiled_while_timed"] = counters["stats"]["unique_graphs"] - graphs_after_warmup
    if device == "cuda":
        info["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del optimizer
    return statistics.median(times), info


def _profile_one_step(model, forward, batch, *, layout: str, budget: int) -> str:
    """Kernel-time table of one step, and the share of the step's wall time the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    kwargs = dict(packer=DataPacker(max_tokens_per_gpu=budget), loss_config=PolicyLossConfig(), vocab_size=151936)
    train_step(model, optimizer, batch, forward=forward, layout=layout, **kwargs)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        train_step(model, optimizer, batch, forward=forward, layout=layout, **kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    # Host-device synchronisations stall the launch queue: count them (cudaStreamSynchronize and friends,
    # and the D2H copies behind .item() / .tolist()).
    syncs = sum(1 for e in events if "Synchronize" in e.name)
    d2h = sum(1 for e in events if e.name == "Memcpy DtoH (Device -> Pageable)" or "DtoH" in e.name)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    return (
        f"profiled step wall {wall:.3f} s (profiler on), GPU kernel time {busy:.3f} s ({busy / wall:.0%}), "
        f"{len(kernels)} kernels, {syncs} synchronize calls, {d2h} device-to-host copies\n{table}"
    )


def _recompute_overrides(recompute: str) -> dict:
    if recompute == "none":
        return {}
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute.startswith("block") and recompute[5:].isdigit():
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=int(recompute[5:]))
    raise ValueError(f"recompute={recompute!r}: use none, full or blockN (N layers recomputed)")


def _build(path: str, hf, *, recompute: str, device: str, sequence_parallel: bool = False):
    if path == "hf_padded":
        if recompute != "none":
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_disable()
        return hf, hf_forward(hf), "bshd"
    specs = {
        "megatron_thd": {},
        "megatron_padded": {},
        "megatron_thd_stock": dict(fused=False),
        "megatron_thd_modules": dict(compiled_sublayers=False),
        "megatron_thd_loop_experts": dict(grouped_experts=False),
    }
    if path not in specs:
        raise ValueError(f"unknown path {path!r}")
    model = build_gpt_model(
        hf.config,
        hf_state_dict=hf.state_dict(),
        params_dtype=torch.bfloat16,
        device=device,
        sequence_parallel=sequence_parallel,
        **specs[path],
        **_recompute_overrides(recompute),
    )
    return model, megatron_forward(model), "bshd" if path == "megatron_padded" else "thd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3-1.7b")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["8192:none", "16384:none", "16384:full"],
        help="max_tokens_per_gpu:recompute pairs; recompute is none, full (megatron full/uniform/1 layer, "
        "HF gradient checkpointing) or blockN (megatron recomputes N layers; HF checkpoints all)",
    )
    parser.add_argument("--num-samples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu for a smoke run with --shape tiny")
    parser.add_argument(
        "--paths", nargs="+", default=["megatron_thd_stock", "megatron_thd", "megatron_padded", "hf_padded"]
    )
    parser.add_argument(
        "--profile", default="", help="write a kernel table of one step of each megatron THD path to PREFIX.<path>.txt"
    )
    parser.add_argument(
        "--profile-paths", nargs="+", default=None, help="paths to profile (default: the megatron THD ones in --paths)"
    )
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch that many ranks with torchrun)")
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    init_model_parallel(tensor_model_parallel_size=args.tp)
    world = torch.distributed.get_world_size()
    if world != args.tp:
        raise SystemExit(f"--tp {args.tp} with {world} ranks: this benchmark runs one TP group (launch --tp ranks)")
    one_gpu_only = {"hf_padded", "megatron_padded", "megatron_thd_stock"}  # HF, padded rows, stock norms (no SP)
    if args.tp > 1 and one_gpu_only & set(args.paths):
        raise SystemExit(f"{sorted(one_gpu_only & set(args.paths))} run without TP here: drop them from --paths")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    # MFU per GPU: every TP rank shares the step's model FLOPs. CPU MFU is not meaningful (nominal peak).
    peak = (peak_bf16_flops(device) if args.device == "cuda" else 1e12) * world
    lead = torch.distributed.get_rank() == 0
    print = builtins.print if lead else (lambda *a, **k: None)  # noqa: A001
    batch = rl_batch(args.num_samples, vocab=151936, seed=0)
    lengths = [len(t) for t in batch.tokens]
    flops = train_flops(lengths, args.shape)
    print(
        f"device={device} torch={torch.__version__} shape={args.shape} samples={len(lengths)} "
        f"real_tokens={sum(lengths)} model_TFLOP_per_step={flops / 1e12:.1f} peak={peak / 1e12:.0f}TFLOP/s"
    )
    # Megatron paths first: they copy the HF weights, which the HF path then trains in place.
    hf = random_hf_model(args.shape, dtype=torch.bfloat16, seed=0, device=args.device)
    configs = [(int(b), r) for b, r in (c.split(":") for c in args.configs)]
    if args.profile and args.device == "cuda":
        for path in args.profile_paths or [p for p in args.paths if p.startswith("megatron_thd")]:
            try:
                model, forward, layout = _build(path, hf, recompute=configs[0][1], device=args.device)
                report = _profile_one_step(model, forward, batch, layout=layout, budget=configs[0][0])
                del model, forward
            except Exception as exc:  # the profile is a diagnostic; never lose the timings to it
                report = f"profiling failed: {exc!r}"
            with open(f"{args.profile}.{path}.txt", "w") as f:
                f.write(report)
            print(f"{path}: {report.splitlines()[0]}", flush=True)
            torch.cuda.empty_cache()
    rows = []
    for path in args.paths:
        for budget, recompute in configs:
            model = forward = None
            try:
                model, forward, layout = _build(
                    path, hf, recompute=recompute, device=args.device, sequence_parallel=args.sequence_parallel
                )
                seconds, info = _time_steps(
                    model, forward, batch, layout=layout, budget=budget, steps=args.steps, device=args.device
                )
                row = dict(
                    path=path,
                    max_tokens_per_gpu=budget,
                    recompute=recompute,
                    step_s=round(seconds, 3),
                    tokens_per_s=round(sum(lengths) / seconds),
                    mfu=round(flops / seconds / peak, 3),
                    **info,
                )
            except torch.OutOfMemoryError:
                row = dict(path=path, max_tokens_per_gpu=budget, recompute=recompute, error="CUDA OOM")
            except Exception as exc:  # one failing path must not cost the others' timings
                row = dict(path=path, max_tokens_per_gpu=budget, recompute=recompute, error=repr(exc)[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, forward
            if args.device == "cuda":
                torch.cuda.empty_cache()
    for budget, recompute in configs:
        by = {
            r["path"]: r
            for r in rows
            if r["max_tokens_per_gpu"] == budget and r["recompute"] == recompute and "tokens_per_s" in r
        }
        for path in ("megatron_thd", "megatron_thd_modules", "megatron_thd_stock", "megatron_thd_loop_experts"):
            if path in by and "hf_padded" in by:
                speedup = by[path]["tokens_per_s"] / by["hf_padded"]["tokens_per_s"]
                print(f"budget {budget} recompute {recompute}: {path} / hf_padded tokens/s = {speedup:.2f}x")
    if args.out and lead:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, shape=args.shape, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
