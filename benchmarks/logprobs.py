"""Benchmark rlkit.algos.logprobs and fused_linear_loss on a GPU: time, peak extra memory, distance to the floors.

Forward + backward of:

* from logits ``[T, V]`` bf16 (random upstream gradients for the log-probs and the entropy): the naive
  torch path (float32 log_softmax, gather, softmax * log_softmax), rlkit (Triton kernels), rlkit with
  ``inplace_backward``, rlkit log-prob only, and Liger-Kernel's cross-entropy (``reduction="none"``:
  log-prob only, no entropy) when importable;
* from hidden ``[T, H]`` and weight ``[V, H]`` bf16, with an RL loss (``rl_loss``: PPO clip, k3 KL, entropy
  bonus, ``token_mean``): naive (``h @ W.T``, the naive path, ``rl_loss``), rlkit per-token
  (``logprobs_and_entropy_from_hidden`` + ``rl_loss``), rlkit ``fused_loss_from_hidden`` (gradient formed
  in the forward; several token-chunk sizes, and float32 grad_W accumulation), a plain linear layer
  (``h @ W.T``, backward with a given logits gradient: the three products alone, at these shapes), and
  Liger's fused linear cross-entropy (a summed log-prob loss, no entropy).

Timing: CUDA events around one step, median of ``--repeats`` after two warm-ups. "queued" (the ms
column): the stream is first given ~5 ms of GPU sleep, so the CPU enqueues the step ahead of the GPU as
it does in a training step; a host sync inside the step shows up as exposed CPU time. "cold" (from
logits only): the step starts on an idle GPU, so all CPU launch work before the first kernel counts.

Floors, measured in the same run: bandwidth floor = 3 x |logits| bytes (read forward, read + write
gradient backward) / copy bandwidth (bytes read + written by a large device-to-device copy);
matmul floor = 6 T V H FLOPs (forward product + two backward products) / measured bf16 matmul rate.
Peak extra memory = ``max_memory_allocated`` during the step minus what was allocated before it,
minus the gradient buffers every method must return (|logits|, or |hidden| + |W|); in-place methods
return their gradient in the input's buffer.

    PYTHONPATH=src python benchmarks/logprobs.py --tokens 4096 16384 32768 --out $OUT/logprobs.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from rlkit.algos.fused_linear_loss import fused_loss_from_hidden, rl_loss_fn
from rlkit.algos.logprobs import _check_tokens, logprobs_and_entropy, logprobs_and_entropy_from_hidden
from rlkit.algos.losses import PolicyLossConfig, rl_loss

_SLEEP_CYCLES = 10_000_000  # ~5 ms at H100 clocks: the CPU enqueues the step while the GPU sleeps


def naive_from_logits(logits, tokens, temperature):
    log_p = (logits.float() / temperature).log_softmax(-1)
    return log_p.gather(-1, tokens[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


def time_step(step, reset, repeats, queued=True):
    """Median ms of ``step()`` (fwd+bwd) and its peak extra bytes; ``reset()`` restores inputs, untimed."""
    times = []
    peak_extra = None
    for i in range(repeats + 2):
        reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(_SLEEP_CYCLES)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # two warm-ups: compilation, autotuning, allocator growth
            times.append(start.elapsed_time(end))
            peak_extra = torch.cuda.max_memory_allocated() - base
        del out
    return statistics.median(times), peak_extra


def measure_copy_bandwidth(num_bytes=4 << 30):
    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = time_step(lambda: dst.copy_(src), lambda: None, 10)
    return 2 * num_bytes / (ms * 1e-3)


def measure_matmul_rate(m=8192, k=4096, n=16384):
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    ms, _ = time_step(lambda: a @ b, lambda: None, 10)
    return 2 * m * k * n / (ms * 1e-3)


def try_import_liger():
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception as err:  # noqa: BLE001 - any failure means "not available", reported
        print(f"liger-kernel unavailable: {err!r}")
        return None, None
    return LigerCrossEntropyFunction, LigerFusedLinearCrossEntropyFunction


def run(step, reset, repeats, queued=True):
    try:
        return time_step(step, reset, repeats, queued)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    except Exception as err:  # noqa: BLE001 - report and go on with the other methods
        print(f"FAILED: {err!r}"[:500])
        torch.cuda.empty_cache()
        return None, None


def bench_from_logits(num_tokens, vocab, temperature, repeats, liger_ce, rows):
    source = torch.randn(num_tokens, vocab, dtype=torch.bfloat16, device="cuda") * 2
    logits = source.clone().requires_grad_()
    tokens = torch.randint(0, vocab, (num_tokens,), device="cuda")
    g_lp = torch.randn(num_tokens, device="cuda")
    g_ent = torch.randn(num_tokens, device="cuda")
    logits_bytes = logits.numel() * logits.element_size()

    def restore():
        with torch.no_grad():
            logits.copy_(source)

    def grads(lp, ent):
        outs = (lp, ent) if ent is not None else (lp,)
        upstream = (g_lp, g_ent) if ent is not None else (g_lp,)
        return torch.autograd.grad(outs, logits, upstream)

    methods = {
        "naive torch": (lambda: grads(*naive_from_logits(logits, tokens, temperature)), True),
        "rlkit": (lambda: grads(*logprobs_and_entropy(logits, tokens, temperature=temperature)), True),
        # the previous behaviour: the token-id range read on the host (a sync) before the kernels
        "rlkit + host id check": (
            lambda: (_check_tokens(tokens, 0, vocab, -100), grads(*logprobs_and_entropy(logits, tokens)))[1],
            True,
        ),
        "rlkit inplace": (
            lambda: grads(*logprobs_and_entropy(logits, tokens, temperature=temperature, inplace_backward=True)),
            False,
        ),
        "rlkit logp only": (
            lambda: grads(*logprobs_and_entropy(logits, tokens, temperature=temperature, compute_entropy=False)),
            True,
        ),
    }
    if liger_ce is not None:
        # Liger computes the gradient in its forward, into the logits' buffer (in place, logp only).
        def liger():
            scaled = logits / temperature if temperature != 1.0 else logits
            loss = liger_ce.apply(scaled, tokens, None, -100, 0.0, 0.0, "none")[0]
            return torch.autograd.grad(-loss, logits, g_lp)

        methods["liger CE (logp only)"] = (liger, temperature != 1.0)
    for name, (step, returns_new_grad) in methods.items():
        ms, extra = run(step, restore, repeats)
        cold_ms, _ = run(step, restore, repeats, queued=False)
        if extra is not None and returns_new_grad:
            extra -= logits_bytes
        rows.append(dict(kind="from_logits", tokens=num_tokens, vocab=vocab, method=name, ms=ms, cold_ms=cold_ms,
                         extra_bytes=extra, logits_bytes=logits_bytes))  # fmt: skip


def bench_from_hidden(num_tokens, vocab, hidden_size, temperature, repeats, fused_chunks, liger_flce, rows):
    hidden = (torch.randn(num_tokens, hidden_size, dtype=torch.bfloat16, device="cuda")).requires_grad_()
    weight = torch.randn(vocab, hidden_size, dtype=torch.bfloat16, device="cuda") / hidden_size**0.5
    weight.requires_grad_()
    tokens = torch.randint(0, vocab, (num_tokens,), device="cuda")
    grad_bytes = (hidden.numel() + weight.numel()) * 2
    logits_bytes = num_tokens * vocab * 2
    # An RL loss on every token: PPO clip-higher, k3 KL to a reference, entropy bonus, token_mean.
    with torch.no_grad():
        lp0, _ = logprobs_and_entropy_from_hidden(hidden, weight, tokens, temperature=temperature)
    old, ref = lp0 + 0.1 * torch.randn_like(lp0), lp0 + 0.1 * torch.randn_like(lp0)
    advantages, loss_mask = torch.randn_like(lp0), torch.ones_like(lp0)
    config = PolicyLossConfig(eps_clip_high=0.28, use_kl_loss=True, kl_loss_coef=0.01, kl_loss_type="k3",
                              entropy_coef=0.001, aggregation="token_mean")  # fmt: skip
    common = dict(config=config, normalizer=float(num_tokens), ref_log_probs=ref)
    loss_fn = rl_loss_fn(old, advantages, loss_mask, **common)
    grad_logits = torch.randn(num_tokens, vocab, dtype=torch.bfloat16, device="cuda") if num_tokens <= 16384 else None

    def naive():
        logits = hidden @ weight.T
        log_p = (logits.float() / temperature).log_softmax(-1)
        lp, ent = log_p.gather(-1, tokens[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
        loss, _ = rl_loss(lp, old, advantages, loss_mask, entropy=ent, **common)
        return torch.autograd.grad(loss, (hidden, weight))

    def per_token():
        lp, ent = logprobs_and_entropy_from_hidden(hidden, weight, tokens, temperature=temperature)
        loss, _ = rl_loss(lp, old, advantages, loss_mask, entropy=ent, **common)
        return torch.autograd.grad(loss, (hidden, weight))

    def fused(chunk, fp32=False):
        def step():
            out = fused_loss_from_hidden(hidden, weight, tokens, loss_fn, temperature=temperature,
                                         chunk_size=chunk, grad_weight_fp32=fp32)  # fmt: skip
            return torch.autograd.grad(out.loss, (hidden, weight))

        return step

    def linear():
        # The three products alone at these shapes, with a given bf16 logits gradient (not counted as extra).
        return torch.autograd.grad(hidden @ weight.T, (hidden, weight), grad_logits)

    def linear_in_chunks(chunk):
        # The fused loss's three products at its chunk shapes, nothing else (diagnostic: shape efficiency).
        def step():
            grad_h, grad_w = torch.empty_like(hidden), torch.empty_like(weight)
            for start in range(0, num_tokens, chunk):
                rows = slice(start, start + chunk)
                z = hidden[rows].detach() @ weight.detach().T
                torch.mm(z, weight.detach(), out=grad_h[rows])
                if start == 0:
                    torch.mm(z.T, hidden[rows].detach(), out=grad_w)
                else:
                    grad_w.addmm_(z.T, hidden[rows].detach())
            return grad_h, grad_w

        return step

    methods = {"naive torch": naive, "rlkit per-token": per_token}
    for chunk in fused_chunks:
        methods[f"rlkit fused c={chunk}"] = fused(chunk)
    methods[f"rlkit fused c={fused_chunks[0]} fp32gW"] = fused(fused_chunks[0], fp32=True)
    if grad_logits is not None:
        methods["plain linear (3 mm)"] = linear
    for chunk in fused_chunks[:2]:
        methods[f"3 mm in chunks c={chunk}"] = linear_in_chunks(chunk)
    if liger_flce is not None:

        def liger():
            # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
            #  reduction, softcap, return_z_loss): positional, as its forward declares them.
            # Its backward scales by one scalar upstream gradient (reduction "none" with per-token gradients
            # is not supported there), so it runs as designed: a summed loss, gradient formed in forward.
            loss = liger_flce.apply(hidden, weight, tokens, None, None, -100, 0.0, 0.0, "sum", None, False)[0]
            return torch.autograd.grad(loss, (hidden, weight))

        methods["liger FLCE (sum, logp)"] = liger
    for name, step in methods.items():
        ms, extra = run(step, lambda: None, repeats)
        rows.append(dict(kind="from_hidden", tokens=num_tokens, vocab=vocab, hidden=hidden_size, method=name,
                         ms=ms, extra_bytes=None if extra is None else extra - grad_bytes,
                         logits_bytes=logits_bytes))  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2560)  # Qwen3-4B
    parser.add_argument("--fused-chunks", type=int, nargs="+", default=[2048, 1024, 4096])
    parser.add_argument("--hidden-tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="logprobs.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bw = measure_copy_bandwidth()
    mm_rate = measure_matmul_rate()
    liger_ce, liger_flce = try_import_liger()
    rows = []
    for t in args.tokens:
        bench_from_logits(t, args.vocab, args.temperature, args.repeats, liger_ce, rows)
        torch.cuda.empty_cache()
    for t in args.hidden_tokens:
        bench_from_hidden(t, args.vocab, args.hidden, args.temperature, args.repeats, args.fused_chunks, liger_flce,
                          rows)  # fmt: skip
        torch.cuda.empty_cache()
    for row in rows:
        if row["kind"] == "from_logits":
            row["floor_ms"] = 3 * row["logits_bytes"] / copy_bw * 1e3
        else:
            row["floor_ms"] = 6 * row["tokens"] * row["vocab"] * row["hidden"] / mm_rate * 1e3
    device = torch.cuda.get_device_name()
    print(
        f"\n{device}; torch {torch.__version__}; copy {copy_bw / 1e9:.0f} GB/s (read+write); bf16 matmul "
        f"{mm_rate / 1e12:.0f} TFLOP/s; V={args.vocab}, H={args.hidden}, tau={args.temperature}"
    )
    head = ("kind", "T", "method", "ms", "floor ms", "x floor", "cold ms", "x floor", "extra MiB", "% logits")
    line = "{:<12}{:>7} {:<28}{:>9}{:>10}{:>9}{:>9}{:>9}{:>11}{:>10}"
    print(line.format(*head))
    for r in rows:
        ms = "OOM" if r["ms"] is None else f"{r['ms']:.2f}"
        ratio = "" if r["ms"] is None else f"{r['ms'] / r['floor_ms']:.2f}"
        cold = r.get("cold_ms")
        cold_ms = "" if cold is None else f"{cold:.2f}"
        cold_ratio = "" if cold is None else f"{cold / r['floor_ms']:.2f}"
        extra = "" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 2**20:.0f}"
        pct = "" if r["extra_bytes"] is None else f"{100 * r['extra_bytes'] / r['logits_bytes']:.1f}"
        print(line.format(r["kind"], r["tokens"], r["method"], ms, f"{r['floor_ms']:.2f}", ratio, cold_ms,
                          cold_ratio, extra, pct))  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, copy_bytes_per_s=copy_bw, matmul_flops=mm_rate,
                       args=vars(args), rows=rows), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
