"""Weight sync megatron-core GPTModel -> colocated EmbeddedEngine: time next to the device copy floor, FP8, memory.

Builds a random-init (std 0.02) megatron-core ``GPTModel`` and an HF ``Qwen3ForCausalLM`` engine of the same
shape on one device, in bf16, and times ``rlkit.parallel.megatron.weight_sync.sync_colocated`` (gather ->
HF names/unfuse -> buckets -> in-place ``copy_`` into the engine) against, in the same run:

* ``floor``: one device-to-device ``copy_`` of a flat buffer of the same number of bytes (the bandwidth floor);
* ``per-tensor copy``: the engine's ``load_weight_buckets`` fed HF tensors prepared beforehand (launch cost of
  the ~400 copies without any conversion).

and the FP8 variants: ``roundtrip`` (quantize 128x128 blockwise e4m3 + dequantize into the bf16 engine, eager and
``torch.compile``) and ``quantize`` (FP8 weights + scale_inv produced bucket by bucket, as sent to an FP8
engine; consumed by a sink here). Peak extra memory is ``max_memory_allocated`` during the sync minus the
memory allocated before it. Target (issue 10): sync <= 3x the floor.

GPU:  ``python3 benchmarks/weight_sync.py --shape qwen3-4b --out results.json``
CPU smoke:  ``python3 benchmarks/weight_sync.py --shape tiny --device cpu --repeats 1``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from megatron_common import SHAPES as MEGATRON_SHAPES

# Qwen/Qwen3-4B's shape (weights random) from megatron_common; "tiny36" has 4B's layer count at toy width
# (host-overhead probe).
SHAPES = {
    "qwen3-4b": MEGATRON_SHAPES["qwen3-4b"],
    "tiny36": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=36, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=1000, tie_word_embeddings=True,
    ),
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak extra bytes) over ``repeats`` runs after one warm-up run."""
    fn()
    times, peak = [], 0
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile FP8 rows")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one sync")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlkit.parallel.megatron.model import build_gpt_model, init_model_parallel
    from rlkit.parallel.megatron.weight_sync import WeightSyncConfig, sync_colocated
    from rlkit.rollout.engines.embedded import EmbeddedEngine

    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_model_parallel()
    config = Qwen3Config(**SHAPES[args.shape], rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1e6)
    torch.manual_seed(0)
    model = build_gpt_model(config, params_dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    with torch.device(device):
        engine = EmbeddedEngine(Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16))
    bucket_bytes = args.bucket_mb << 20
    rows = []

    def report(name: str, seconds: float, peak: int, num_bytes: int, **extra) -> None:
        row = dict(name=name, ms=round(seconds * 1e3, 3), peak_extra_mib=round(peak / 2**20, 1), **extra)
        row["gb_per_s"] = round(num_bytes / seconds / 1e9, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every row, so a run cut short keeps what it measured
            info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
            info.update(torch=torch.__version__, shape=args.shape, num_bytes=num_bytes, bucket_mb=args.bucket_mb)
            with open(args.out, "w") as f:
                json.dump(dict(info, num_tensors=stats.num_tensors, rows=rows), f, indent=1)

    def run_sync(**cfg):
        return sync_colocated(model, engine, config, config=WeightSyncConfig(bucket_bytes=bucket_bytes, **cfg))

    stats = run_sync()
    num_bytes = stats.num_bytes
    print(f"# {args.shape}: {stats.num_tensors} HF tensors, {num_bytes / 1e9:.3f} GB, {stats.num_buckets} buckets")
    # Correctness spot check: the synced engine holds the megatron weights (unpadded embedding, final norm).
    vocab = config.vocab_size
    assert torch.equal(engine.model.model.embed_tokens.weight, model.embedding.word_embeddings.weight[:vocab])
    final_norm = model.decoder.final_layernorm.weight.to(engine.model.model.norm.weight.dtype)
    assert torch.equal(engine.model.model.norm.weight, final_norm)

    buffers = {"src": torch.empty(num_bytes, dtype=torch.uint8, device=device)}
    buffers["dst"] = torch.empty_like(buffers["src"])
    seconds, peak = _timed(lambda: buffers["dst"].copy_(buffers["src"]), device, args.repeats)
    floor = seconds
    report("floor: one flat device copy of the same bytes", seconds, peak, num_bytes, x_floor=1.0)
    buffers.clear()

    state = engine.model.state_dict()
    buffers["hf"] = {k: v.detach().clone() for k, v in state.items() if k != "lm_head.weight" or len(state) == 1}
    seconds, peak = _timed(lambda: engine.load_weight_buckets([buffers["hf"]]), device, args.repeats)
    report("per-tensor copy of prepared HF tensors", seconds, peak, num_bytes, x_floor=round(seconds / floor, 2))
    buffers.clear()

    def convert_only():
        sync_colocated(model, None, config, config=WeightSyncConfig(bucket_bytes=bucket_bytes))

    seconds, peak = _timed(convert_only, device, args.repeats)
    report("convert only: buckets made, no engine copy", seconds, peak, num_bytes, x_floor=round(seconds / floor, 2))

    variants = [("sync", {}), ("sync fp8 roundtrip (eager)", dict(fp8="roundtrip"))]
    if device.type == "cuda" and not args.no_compile:
        variants.append(("sync fp8 roundtrip (compiled)", dict(fp8="roundtrip", fp8_compile=True)))
    for name, cfg in variants:
        seconds, peak = _timed(lambda cfg=cfg: run_sync(**cfg), device, args.repeats)
        report(name, seconds, peak, num_bytes, x_floor=round(seconds / floor, 2))

    quant_variants = [("fp8 quantize to buckets, no engine (eager)", dict(fp8="quantize"))]
    if device.type == "cuda" and not args.no_compile:
        quant_variants.append(("fp8 quantize to buckets, no engine (compiled)", dict(fp8="quantize", fp8_compile=True)))
    for name, cfg in quant_variants:
        cfg = WeightSyncConfig(bucket_bytes=bucket_bytes, **cfg)
        out = {}

        def quantize_sink(cfg=cfg, out=out):
            out["stats"] = sync_colocated(model, None, config, config=cfg)

        seconds, peak = _timed(quantize_sink, device, args.repeats)
        report(name, seconds, peak, num_bytes, x_floor=round(seconds / floor, 2), bytes_out=out["stats"].num_bytes)

    if args.profile:
        _profile(lambda: run_sync(), device)


def _profile(fn, device: torch.device) -> None:
    """Print where one sync spends host and device time (torch.profiler, top ops)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    for key in ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else []):
        print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)


if __name__ == "__main__":
    main()
