"""Routed experts, forward + backward: megatron's per-expert loop vs two grouped GEMMs (rlkit.parallel.megatron).

One rank's experts of a MoE layer at the seeds' widths (default: Qwen3-30B-A3B at EP8, 16 local experts of
hidden 2048 / width 768), bf16, tokens routed to the local experts with a skewed (Zipf-like) split, as a
router produces. ``loop`` is ``swiglu_experts_reference``: per expert F.linear, SwiGLU, scale, F.linear on its
slice (megatron-core's ``SequentialMLP`` does the same, after reading the counts back to the host, which the
loop here also needs: its counts are a host list); ``grouped`` is ``grouped_swiglu_experts`` on stacked ``[E, N, K]``
weights; the two ``per-expert weights`` rows give it one tensor per expert, as megatron's ``local_experts`` are,
with the stack kept for the backward or stacked again there (``save_stacked_copy``). All get the same
inputs and upstream gradient; the table prints the median time of ``--steps`` after warm-ups, the achieved
TFLOP/s (3 GEMMs forward, 6 backward: ``6 * 2 * T * H * 3F`` FLOPs), and the largest difference of the outputs.

Command (one H100): ``PYTHONPATH=src python3 benchmarks/grouped_experts.py --out $OUT/grouped_experts.json``.
CPU smoke run: ``PYTHONPATH=src python3 benchmarks/grouped_experts.py --device cpu --tokens 256 --hidden 64
--width 32 --experts 4 --steps 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rlkit.parallel.megatron.grouped_experts import grouped_swiglu_experts, swiglu_experts_reference


def _counts(tokens: int, experts: int, seed: int) -> list[int]:
    """A skewed split of ``tokens`` over ``experts`` (weights 1/(rank+1)), shuffled; sums to ``tokens``."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / (torch.randperm(experts, generator=g).float() + 1)
    counts = (weights / weights.sum() * tokens).floor().long()
    counts[0] += tokens - int(counts.sum())
    return counts.tolist()


def _time(fn, steps: int, device: str) -> float:
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # 8192 tokens per GPU x top-8 routing / EP 8: ~8192 token copies reach one rank's experts
    parser.add_argument("--tokens", type=int, default=8192, help="routed token copies on this rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16
    counts = _counts(args.tokens, args.experts, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    probs = torch.rand(args.tokens, generator=g).to(device).requires_grad_()
    fc1 = (torch.randn(args.experts, 2 * args.width, args.hidden, generator=g) * 0.02).to(device, dtype)
    fc2 = (torch.randn(args.experts, args.hidden, args.width, generator=g) * 0.02).to(device, dtype)
    fc1.requires_grad_()
    fc2.requires_grad_()
    upstream = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    counts_device = torch.tensor(counts, device=device)
    # megatron's experts are separate parameters: the grouped path stacks them (kept for backward, or re-stacked)
    fc1_list = [w.detach().clone().requires_grad_() for w in fc1.unbind(0)]
    fc2_list = [w.detach().clone().requires_grad_() for w in fc2.unbind(0)]
    paths = {
        "loop": (lambda: swiglu_experts_reference(x, counts, probs, fc1, fc2), (fc1, fc2)),
        "grouped": (lambda: grouped_swiglu_experts(x, counts_device, probs, fc1, fc2), (fc1, fc2)),
        "grouped, per-expert weights, stack kept": (
            lambda: grouped_swiglu_experts(x, counts_device, probs, fc1_list, fc2_list, save_stacked_copy=True),
            (*fc1_list, *fc2_list),
        ),
        "grouped, per-expert weights, re-stacked": (
            lambda: grouped_swiglu_experts(x, counts_device, probs, fc1_list, fc2_list),
            (*fc1_list, *fc2_list),
        ),
    }
    flops = 6 * 2 * args.tokens * args.hidden * 3 * args.width
    outputs, rows = {}, []
    for name, (forward, weights) in paths.items():
        outputs[name] = forward().detach()

        def step(forward=forward, weights=weights):
            torch.autograd.grad(forward(), (x, probs, *weights), upstream)

        seconds = _time(step, args.steps, device)
        rows.append(dict(path=name, ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 1)))
    difference = float((outputs["grouped"].float() - outputs["loop"].float()).abs().max())
    header = f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} torch={torch.__version__}"
    print(header, f"tokens={args.tokens} hidden={args.hidden} width={args.width} experts={args.experts}")
    print(f"counts per expert: {counts}")
    for row in rows:
        print(f"{row['path']:>40}  {row['ms']:9.3f} ms  {row['tflops']:7.1f} TFLOP/s")
    print(f"loop / grouped time: {rows[0]['ms'] / rows[1]['ms']:.2f}x; max |grouped - loop| = {difference:.3e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header=header, counts=counts, rows=rows, max_difference=difference), f, indent=1)


if __name__ == "__main__":
    main()
