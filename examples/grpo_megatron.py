"""The GRPO recipe on the megatron-core backend: ``examples/grpo_qwen3_4b.py --backend megatron``, 1 or N processes.

The algorithm, the flags (slime's names), the data, the rewards, the rollout engines and the metrics are those of
``examples/grpo_qwen3_4b.py``; this file replaces its trainer. The policy is a megatron-core ``GPTModel`` built from
the HF checkpoint (or the embedded default's tiny Qwen3) through ``rlkit.parallel.megatron.model``, trained on
THD-packed micro-batches (``rlkit.parallel.megatron.step``) with rlkit's losses.

How the work is spread over the processes that ``torch.distributed.run`` launches (NCCL on CUDA, else gloo):
  * rank 0 owns the rollout engine (embedded in its process with ``--colocate``, in its own process otherwise, or an
    SGLang server) and generates the whole rollout; the graded samples (token ids, rewards, advantages) are
    broadcast to every rank. Generating on one rank keeps the prompt order, the sampling seeds, the partial-rollout
    buffer and the checkpointed data position exactly those of the one-process run; the samples are a few
    kilobytes next to the weights;
  * each data-parallel rank takes its share of one ``DataPacker`` plan of the global batch (``--balance-data``
    balances tokens over ranks), computes the old-policy log-probs of its share without gradients
    (``compute_log_probs``), then the loss of its micro-batches with the plan's global normalizer, so the per-rank
    gradients SUM to the gradient of the whole batch's loss; they are all-reduced with a sum (megatron's DDP would
    average: see docs/packing.md), clipped by the global norm, and AdamW steps on every rank alike;
  * after the optimizer steps of a rollout, rank 0 converts its weights to HF names
    (``rlkit.ckpt.convert.megatron_to_hf``) and pushes them with ``engine.update_weights``.

Today rlkit's megatron backend trains with TP = PP = CP = EP = 1 (data parallelism only); larger sizes are refused by
name (``megatron_problems``) until ``rlkit.parallel.megatron`` runs them. Checkpoints: ``--save`` writes rlkit's
atomic training state (megatron weights, AdamW state, data position, RNG) from rank 0, and ``--save-hf`` an HF
export; megatron-core's native ``torch_dist`` (``rlkit.ckpt.torch_dist.save_megatron_dist``) is not used: 0.16.1
needs CUDA for it.

Commands (the embedded default: a tiny Qwen3 and the bundled addition set):
  1 process (CPU or one GPU):
      python3 examples/grpo_qwen3_4b.py --backend megatron
  2 processes, data parallel (gloo on CPU, NCCL on 2 GPUs):
      python3 -m torch.distributed.run --nproc-per-node 2 examples/grpo_qwen3_4b.py --backend megatron
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is no package: the HF recipe is a sibling
import grpo_qwen3_4b as recipe  # noqa: E402

from rlkit.ckpt.convert import megatron_to_hf  # noqa: E402
from rlkit.ckpt.hf import SafetensorsWriter  # noqa: E402
from rlkit.ckpt.training_state import (  # noqa: E402
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from rlkit.metrics import CONSOLE_KEYS, format_metrics_line, plot_history, summarize_history  # noqa: E402
from rlkit.rollout.buffer import PartialRolloutBuffer, get_buffer_filter  # noqa: E402
from rlkit.rollout.engines.embedded import EmbeddedEngine  # noqa: E402
from rlkit.rollout.engines.process import ProcessEngine  # noqa: E402

# What this file can run today: rlkit.parallel.megatron trains with TP = PP = CP = EP = 1 and data parallelism over
# every launched process. A size above its entry here is refused by name.
MEGATRON_MAX_SIZES = dict(tensor_model=1, pipeline_model=1, context=1, expert_model=1, expert_tensor=1)

# console line: step, reward, loss, grad norm, tokens/s, then the recipe's other keys
STEP_KEYS = (("reward", "reward"), ("loss", "loss"), *CONSOLE_KEYS[1:])


def megatron_problems(args: argparse.Namespace, *, world_size: int) -> list[str]:
    """Trainer settings this backend cannot honour, each with the reason and the fix (the recipe rejects them)."""
    problems = []
    for name, most in MEGATRON_MAX_SIZES.items():
        size = getattr(args, f"{name}_parallel_size")
        if size > most:
            problems.append(
                f"--{name.replace('_', '-')}-parallel-size {size}: not supported by the megatron backend yet "
                f"(rlkit.parallel.megatron trains with at most {most}; data parallelism spans the torchrun processes)"
            )
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world_size % model_parallel:
        problems.append(
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size = "
            f"{model_parallel} does not divide the {world_size} launched processes; launch "
            f"'python3 -m torch.distributed.run --nproc-per-node {model_parallel} ...'"
        )
    trainer_gpus = args.actor_num_nodes * args.actor_num_gpus_per_node
    if (args.actor_num_nodes, args.actor_num_gpus_per_node) != (1, 1) and trainer_gpus != world_size:
        problems.append(
            f"--actor-num-nodes {args.actor_num_nodes} --actor-num-gpus-per-node {args.actor_num_gpus_per_node}: "
            f"{trainer_gpus} trainer GPUs, but {world_size} processes were launched; torchrun sets the world "
            "(--nnodes, --nproc-per-node): make them agree or drop the flags"
        )
    if args.recompute_granularity and not torch.cuda.is_available():
        problems.append(
            f"--recompute-granularity {args.recompute_granularity}: megatron-core's recompute needs CUDA (it saves "
            "the CUDA RNG state); drop the --recompute-* flags on CPU"
        )
    if args.use_distributed_optimizer:
        problems.append(
            "--use-distributed-optimizer: not supported by the megatron backend yet (it steps torch.optim.AdamW, "
            "replicated on every data-parallel rank); drop the flag"
        )
    if args.optimizer_cpu_offload:
        problems.append(
            "--optimizer-cpu-offload: not supported by the megatron backend (megatron-core 0.16.1 offloads only "
            "inside its DistributedOptimizer, with Transformer Engine's or Apex's fused Adam, absent here); drop it"
        )
    if args.use_kl_loss and args.kl_loss_coef != 0:
        problems.append(
            f"--use-kl-loss --kl-loss-coef {args.kl_loss_coef}: not supported by the megatron backend yet (its "
            "train step takes no reference log-probs); use --backend hf or --kl-loss-coef 0"
        )
    if args.use_tis:
        problems.append("--use-tis: not supported by the megatron backend yet (its train step takes no rollout "
                        "log-probs); use --backend hf")  # fmt: skip
    if args.loss_aggregation == "seq_mean_token_sum_norm":
        problems.append("--loss-aggregation seq_mean_token_sum_norm: not supported by the megatron backend yet; "
                        "use token_mean or sample_mean")  # fmt: skip
    if args.async_mode:
        problems.append("--async: not supported by the megatron backend yet; drop it (or use --backend hf)")
    return problems


# ----------------------------------------------------------------------------------------------------
# Setup: the process world, the policy as a megatron-core model.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class World:
    """This process's place: global rank, data-parallel rank and group, and its device."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    dp_group: object
    device: torch.device


def init_world(args) -> World:
    """``torch.distributed`` (NCCL on CUDA, else gloo; one process without torchrun) and megatron's groups."""
    from megatron.core import parallel_state

    from rlkit.parallel.megatron.model import init_model_parallel

    init_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return World(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_group=parallel_state.get_data_parallel_group(),
        device=device,
    )


def megatron_policy(args, world: World, hf_policy):
    """The megatron ``GPTModel`` with the HF policy's weights, rank 0's (after its SFT warm-start), on every rank."""
    from rlkit.parallel.megatron.model import build_gpt_model

    if world.world_size > 1:
        with torch.no_grad():
            for tensor in hf_policy.state_dict().values():
                dist.broadcast(tensor, src=0)
    dtype = next(hf_policy.parameters()).dtype
    recompute = {
        key: value
        for key, value in dict(
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
        ).items()
        if value is not None
    }
    model = build_gpt_model(
        hf_policy.config, hf_state_dict=hf_policy.state_dict(), params_dtype=dtype, device=world.device, **recompute
    )
    return model.train()


def build_engine(args, hf_policy, tokenizer, output_dir: Path):
    """Rank 0's rollout engine: the HF policy itself with --colocate (no second copy), else the recipe's choice."""
    if args.colocate and args.rollout_backend == "embedded":
        return EmbeddedEngine(hf_policy.eval(), tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0)
    return recipe.build_engine(args, hf_policy, tokenizer, output_dir)


# ----------------------------------------------------------------------------------------------------
# Weight sync and the train step.
# ----------------------------------------------------------------------------------------------------


def hf_weights(model, hf_config: dict, *, fused_experts: bool) -> dict[str, torch.Tensor]:
    """The megatron model's weights under HF names (TP = PP = EP = 1: this rank holds the whole model)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    return megatron_to_hf({(0, 0, 0): params}, hf_config, fused_experts=fused_experts)


def old_log_probs(model, samples, plan, world: World, packer, *, vocab_size: int, temperature: float) -> None:
    """No-grad log-probs of this rank's share of ``plan`` under the current policy -> ``metadata["old_log_probs"]``."""
    from rlkit.parallel.megatron.step import compute_log_probs, megatron_forward

    mine = [samples[i] for micro in plan.micro_batches[world.dp_rank] for i in micro]
    values = compute_log_probs(
        megatron_forward(model),
        [torch.tensor(s.tokens) for s in mine],
        [s.response_length for s in mine],
        packer=packer,
        vocab_size=vocab_size,
        temperature=temperature,
    )
    for sample, value in zip(mine, values, strict=True):
        sample.metadata["old_log_probs"] = value


def train_on_batch(model, optimizer, samples, plan, world: World, loss_config, *, vocab_size, temperature, clip_grad):
    """One optimizer step on a global batch; this rank computes ``plan.micro_batches[world.dp_rank]``.

    Every rank divides by the plan's global normalizer, so the per-rank gradients sum (all-reduce SUM over the
    data-parallel group) to the gradient of the global batch's loss, and the summed metrics are global values.

    Returns:
        Global-batch metrics of ``rl_loss`` (``loss``, ``pg_loss``, ``entropy``, ...), ``grad_norm`` (before
        clipping) and ``micro_batches`` (per rank).
    """
    from rlkit.parallel.megatron.step import RLBatch, build_micro_batch, megatron_forward, micro_batch_loss

    mine = [i for micro in plan.micro_batches[world.dp_rank] for i in micro]
    local = {index: position for position, index in enumerate(mine)}
    batch = RLBatch(
        tokens=[torch.tensor(samples[i].tokens) for i in mine],
        response_lengths=[samples[i].response_length for i in mine],
        advantages=[torch.tensor(samples[i].metadata["advantages"]) for i in mine],
        old_log_probs=[samples[i].metadata["old_log_probs"] for i in mine],
        loss_masks=[torch.tensor(samples[i].effective_loss_mask(), dtype=torch.float32) for i in mine],
    )
    loss_tokens = torch.tensor(batch.loss_token_counts(), dtype=torch.float32)
    normalizer = plan.normalizer(loss_config.aggregation)
    forward, params = megatron_forward(model), [p for p in model.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    for micro_indices in plan.micro_batches[world.dp_rank]:
        if not micro_indices:  # this rank has fewer samples than the common micro-batch count
            continue
        indices = [local[i] for i in micro_indices]
        micro = build_micro_batch(batch, indices, layout="thd")
        loss, metrics = micro_batch_loss(
            forward(micro),
            micro,
            indices,
            loss_config=loss_config,
            normalizer=normalizer,
            sample_loss_token_counts=loss_tokens,
            vocab_size=vocab_size,
            temperature=temperature,
        )
        loss.backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    if world.dp_size > 1:
        for p in params:  # one all-reduce per tensor; megatron's DDP buckets and overlaps them
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=world.dp_group)
        names = sorted(totals)
        summed = torch.tensor([totals[n] for n in names], dtype=torch.float64, device=world.device)
        dist.all_reduce(summed, group=world.dp_group)
        totals = dict(zip(names, summed.tolist(), strict=True))
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals | {"grad_norm": float(grad_norm), "micro_batches": float(plan.num_micro_batches)}


# ----------------------------------------------------------------------------------------------------
# Checkpoints (rank 0 writes; every data-parallel replica holds the same weights and optimizer state).
# ----------------------------------------------------------------------------------------------------


def save(args, model, optimizer, scheduler, dataset, buffer, history, tokenizer, hf_config, next_rollout_id):
    loop_state = {
        "next_rollout_id": next_rollout_id,
        "scheduler": scheduler.state_dict(),
        "dataset": dataset.state_dict(),
        "history": history,
        "buffer": buffer.state_dict(),
        "prefetched": None,
        "prefetched_metrics": None,
    }
    path = save_training_state(
        args.save,
        step=next_rollout_id,
        model_state={name: p.detach() for name, p in model.named_parameters()},
        optimizer_state=optimizer.state_dict(),
        loop_state=loop_state,
        rng_state=capture_rng_state(),
        keep_last=2,
    )
    if args.save_hf:  # loadable by transformers' from_pretrained: config, tokenizer, safetensors shards
        writer = SafetensorsWriter(path / "hf")
        for name, tensor in hf_weights(model, hf_config.to_dict(), fused_experts=False).items():
            writer.add(name, tensor.cpu())
        writer.close()
        hf_config.save_pretrained(path / "hf")
        tokenizer.save_pretrained(path / "hf")


def load(args, model, optimizer):
    """Every rank loads the weights and optimizer state; rank 0 also the loop state."""
    state = load_training_state(args.load)
    missing, unexpected = model.load_state_dict(state.model_state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # megatron's TE-style buffers, no weights
    if missing or unexpected:
        raise SystemExit(f"--load {args.load}: the checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written by the HF backend?)")  # fmt: skip
    optimizer.load_state_dict(state.optimizer_state)
    return state


# ----------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    """Run the recipe on the megatron-core backend; ``args`` come from ``grpo_qwen3_4b.parse_args``."""
    torch.manual_seed(args.seed)
    world = init_world(args)
    is_main = world.rank == 0

    def say(message: str) -> None:
        if is_main:
            print(message, flush=True)

    if args.embedded_default:
        say("[rlkit] no --hf-checkpoint: running the EMBEDDED DEFAULT (a tiny Qwen3-architecture model, a char "
            "tokenizer and the bundled single-digit addition set, all built locally)")  # fmt: skip
    say(f"[rlkit] megatron backend: {world.world_size} process(es), DP{world.dp_size} x TP1 x PP1 x CP1 x EP1, "
        f"{dist.get_backend()} on {world.device.type}")  # fmt: skip
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        say("[rlkit] --sequence-parallel has no effect at TP=1 (megatron-core disables it there too)")
    if args.ref_load:
        say("[rlkit] --ref-load is not read: the KL term is off (--kl-loss-coef 0), so no reference model is needed")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, hf_policy = recipe.build_tokenizer_and_policy(args, world.device)
    stops = recipe.stop_token_ids(tokenizer)
    dataset = score = None  # rank 0 reads the prompts, generates and grades
    if is_main:
        dataset, score = recipe.build_dataset(args, tokenizer), recipe.build_scorer(args)
        if not args.load:
            recipe.warm_start_if_needed(args, hf_policy, dataset, tokenizer, score, stops)
    model = megatron_policy(args, world, hf_policy)
    hf_config, vocab_size = hf_policy.config, hf_policy.config.vocab_size
    fused_experts = args.rollout_backend == "embedded"  # a live transformers-5 MoE holds its experts fused
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_schedule(args))
    packer, local_packer = recipe.build_packer(args, dp_size=world.dp_size), recipe.build_packer(args)
    loss_config = recipe.build_loss_config(args)
    buffer = PartialRolloutBuffer(get_buffer_filter(args.buffer_filter_path))
    start_rollout, history = 0, []
    if args.load:
        state = load(args, model, optimizer)
        scheduler.load_state_dict(state.loop_state["scheduler"])
        start_rollout, history = state.loop_state["next_rollout_id"], state.loop_state["history"]
        if is_main:
            dataset.load_state_dict(state.loop_state["dataset"])
            buffer.load_state_dict(state.loop_state["buffer"])
            restore_rng_state(state.rng_state)
        say(f"[rlkit] resumed from {state.path} at rollout {start_rollout}")
    engine = eval_sets = do_rollout = metrics_file = None
    if is_main:
        engine = build_engine(args, hf_policy, tokenizer, output_dir)
        where = f"its own process (pid {engine.process.pid})" if isinstance(engine, ProcessEngine) else "this process"
        say(f"[rlkit] rollout engine: {type(engine).__name__} in {where}")
        engine.update_weights(hf_weights(model, hf_config.to_dict(), fused_experts=fused_experts))  # --load
        eval_sets = recipe.build_eval_sets(args, tokenizer, stops)
        do_rollout = recipe.make_rollout_fn(args, engine, dataset, score, stops, buffer)
        metrics_file = open(output_dir / "metrics.jsonl", "a")
        if start_rollout == 0 and eval_sets:
            history.append(recipe.evaluate(engine, eval_sets, score, rollout_id=0))
            say(format_metrics_line(history[-1]))
    del hf_policy  # from here on only a colocated engine holds it (as its model)
    for rollout_id in range(start_rollout, args.num_rollout):
        t0 = time.perf_counter()
        payload = [None]
        if is_main:
            groups, rollout_metrics = do_rollout(rollout_id)
            samples, rewards, reward_errors = recipe.graded_samples(args, groups, rollout_id)
            payload = [samples]
        if world.world_size > 1:
            dist.broadcast_object_list(payload, src=0)  # token ids, rewards, advantages: small next to weights
        samples = payload[0]
        batches = [
            samples[k * args.global_batch_size : (k + 1) * args.global_batch_size]
            for k in range(args.num_steps_per_rollout)
        ]
        plans = [packer.pack_samples(batch) for batch in batches]
        model.eval()
        for batch, plan in zip(batches, plans, strict=True):  # every step's ratio is against the rollout policy
            old_log_probs(model, batch, plan, world, local_packer, vocab_size=vocab_size,
                          temperature=args.rollout_temperature)  # fmt: skip
        model.train()
        step_metrics: dict[str, float] = {}
        for batch, plan in zip(batches, plans, strict=True):
            metrics = train_on_batch(model, optimizer, batch, plan, world, loss_config, vocab_size=vocab_size,
                                     temperature=args.rollout_temperature, clip_grad=args.clip_grad)  # fmt: skip
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value / args.num_steps_per_rollout
            scheduler.step()
        if not is_main:
            continue
        engine.update_weights(hf_weights(model, hf_config.to_dict(), fused_experts=fused_experts))
        elapsed = time.perf_counter() - t0
        record = recipe.rollout_record(
            rollout_id, groups, samples, rewards, reward_errors, rollout_metrics, step_metrics,
            elapsed=elapsed, lr=scheduler.get_last_lr()[0],
        )  # fmt: skip
        if eval_sets and args.eval_interval and (rollout_id + 1) % args.eval_interval == 0:
            record |= recipe.evaluate(engine, eval_sets, score, rollout_id=rollout_id + 1)
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        say(format_metrics_line(record, keys=STEP_KEYS))
        if args.save and args.save_interval and (rollout_id + 1) % args.save_interval == 0:
            save(args, model, optimizer, scheduler, dataset, buffer, history, tokenizer, hf_config, rollout_id + 1)
    if is_main:
        if hasattr(engine, "close"):
            engine.close()
        summary = summarize_history(history)
        say("[rlkit] " + json.dumps(summary))
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if not args.no_plot:
            wrote = plot_history(history, output_dir / "progress.png")
            say(
                f"[rlkit] wrote {output_dir / 'progress.png'}"
                if wrote
                else '[rlkit] no plot: pip install "rlkit[plot]"'
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    recipe.main(["--backend", "megatron", *sys.argv[1:]])
