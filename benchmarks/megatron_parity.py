"""GPU acceptance check: one GRPO step on a Qwen3-0.6B-shaped model (random init), THD vs padded vs HF.

Runs the same global batch through (a) megatron-core GPTModel with THD packing (varlen attention),
(b) the same model with padded micro-batches, (c) HF transformers (sdpa, padded), all bf16, and
(d) HF transformers in float32 as the reference, and prints the loss, the gradient norm and their
relative differences. No optimizer step (the gradients are what the step would apply).

Command (one GPU): ``PYTHONPATH=src python benchmarks/megatron_parity.py``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from megatron_common import random_hf_model, rl_batch

from rlkit.algos.losses import PolicyLossConfig
from rlkit.parallel.megatron.forward import hf_forward, megatron_forward
from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel
from rlkit.parallel.megatron.step import train_step
from rlkit.parallel.packing import DataPacker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--device", default="cuda", help="cpu for a smoke run with --shape tiny")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    init_model_parallel()
    batch = rl_batch(args.num_samples, vocab=151936, seed=0)
    kwargs = dict(
        packer=DataPacker(max_tokens_per_gpu=args.max_tokens_per_gpu),
        loss_config=PolicyLossConfig(),
        vocab_size=151936,
        max_grad_norm=None,
    )
    results = {}
    reference = random_hf_model(args.shape, dtype=torch.float32, seed=0, device=args.device)
    state = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    t0 = time.perf_counter()
    out = train_step(reference, None, batch, forward=hf_forward(reference), layout="bshd", **kwargs)
    results["hf_fp32"] = (out, time.perf_counter() - t0)
    del reference
    hf = random_hf_model(args.shape, dtype=torch.bfloat16, seed=0, device=args.device)
    hf.load_state_dict(state)
    t0 = time.perf_counter()
    results["hf_bf16_padded"] = (
        train_step(hf, None, batch, forward=hf_forward(hf), layout="bshd", **kwargs),
        time.perf_counter() - t0,
    )
    for layout in ("thd", "bshd"):
        model = build_gpt_model(hf.config, hf_state_dict=state, params_dtype=torch.bfloat16, device=args.device)
        t0 = time.perf_counter()
        out = train_step(model, None, batch, forward=megatron_forward(model), layout=layout, **kwargs)
        results[f"megatron_bf16_{layout}"] = (out, time.perf_counter() - t0)
        del model
    ref = results["hf_fp32"][0]
    rows = {}
    for name, (res, seconds) in results.items():
        rows[name] = dict(
            loss=res.loss,
            grad_norm=res.grad_norm,
            loss_rel_diff_vs_fp32=abs(res.loss - ref.loss) / abs(ref.loss),
            grad_norm_rel_diff_vs_fp32=abs(res.grad_norm - ref.grad_norm) / ref.grad_norm,
            micro_batches=res.num_micro_batches,
            tokens_fed=res.num_tokens,
            seconds_first_step=round(seconds, 2),
        )
    thd, pad = results["megatron_bf16_thd"][0], results["megatron_bf16_bshd"][0]
    hfb = results["hf_bf16_padded"][0]
    summary = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        shape=args.shape,
        real_tokens=sum(len(t) for t in batch.tokens),
        thd_vs_padded_loss_rel=abs(thd.loss - pad.loss) / abs(pad.loss),
        thd_vs_padded_grad_norm_rel=abs(thd.grad_norm - pad.grad_norm) / pad.grad_norm,
        thd_vs_hf_bf16_loss_rel=abs(thd.loss - hfb.loss) / abs(hfb.loss),
        thd_vs_hf_bf16_grad_norm_rel=abs(thd.grad_norm - hfb.grad_norm) / hfb.grad_norm,
    )
    print(json.dumps({"paths": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
