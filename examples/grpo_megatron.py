"""The GRPO recipe on the megatron-core backend: ``examples/grpo_qwen3_4b.py --backend megatron``, 1 or N processes.

The algorithm, the flags (slime's names), the data, the rewards, the rollout engines and the metrics are those of
``examples/grpo_qwen3_4b.py``; this file replaces its trainer. The policy is a megatron-core ``GPTModel`` built from
the HF checkpoint (or the embedded default's tiny Qwen3) through ``rlkit.parallel.megatron.model``, trained on
THD-packed micro-batches (``rlkit.parallel.megatron.step``) with rlkit's losses.

How the work is spread over the processes that ``torch.distributed.run`` launches (NCCL on CUDA, else gloo):
  * the processes form megatron-core's grid, ``--tensor-model-parallel-size`` x ``--context-parallel-size`` x
    ``--pipeline-model-parallel-size`` x data parallel (the rest; ``--expert-model-parallel-size`` spreads a MoE's
    experts over it);
  * rank 0 owns the rollout engine (embedded in its process with ``--colocate``, in its own process otherwise, or an
    SGLang server) and generates the whole rollout; the graded samples (token ids, rewards, advantages) are
    broadcast to every rank. Generating on one rank keeps the prompt order, the sampling seeds, the partial-rollout
    buffer and the checkpointed data position exactly those of the one-process run; the samples are kilobytes
    next to the weights;
  * every rank then runs ``rlkit.parallel.megatron.step`` on the whole global batch: one ``DataPacker`` plan gives
    each data-parallel rank its share, the old-policy log-probs come from a no-grad pass (``compute_log_probs``),
    the reference log-probs of the KL loss (``--use-kl-loss`` with a non-zero ``--kl-loss-coef``) from a no-grad
    pass of a frozen reference ``GPTModel`` in the same layout (built only then: the initial weights, or
    ``--ref-load``), TIS (``--use-tis``) reads the engine's log-probs from the samples, and ``train_step`` sums
    the ranks' gradients of the global-normalizer loss (exactly the one-process gradient), clips by the global norm
    and steps AdamW on every rank's part of the model (megatron's DistributedOptimizer over megatron's DDP with
    ``--use-distributed-optimizer``, CUDA);
  * after the optimizer steps of a rollout, the weights go to the engine under HF names in bounded buckets
    (``rlkit.parallel.megatron.weight_sync``, TP / EP shards gathered): copied in place into a colocated engine,
    broadcast (NCCL / gloo) into a decoupled one, which on CUDA takes the first GPU after the trainers', or written
    to disk for SGLang.

Pipeline parallelism (``--pipeline-model-parallel-size``, optionally uneven with ``--decoder-first/last-pipeline-
num-layers``): megatron's 1F1B schedule in the step; the weight sync broadcasts each stage's HF tensors over the
pipeline group, so rank 0's engine receives the whole model. Refused by name (``recipe_checks.megatron_problems``):
the distributed optimizer on CPU or with checkpoints, its CPU offload. ``--async`` makes rank 0 generate rollout k+1
while the ranks train on k.
Checkpoints: ``--save`` writes rlkit's atomic training state per model-parallel shard (megatron weights, AdamW
state; rank 0's also holds the data position, buffer, the rollout in flight and RNG), ``--save-hf`` an HF export
gathered from the shards; megatron-core's native ``torch_dist`` is not used (0.16.1 needs CUDA for it).

Commands (the embedded default: a tiny Qwen3 and the bundled addition set):
  1 process (CPU or one GPU):
      python3 examples/grpo_qwen3_4b.py --backend megatron
  2 processes, data parallel (gloo on CPU, NCCL on 2 GPUs), or tensor parallel:
      python3 -m torch.distributed.run --nproc-per-node 2 examples/grpo_qwen3_4b.py --backend megatron --colocate
      python3 -m torch.distributed.run --nproc-per-node 2 examples/grpo_qwen3_4b.py --backend megatron --colocate \
          --tensor-model-parallel-size 2 --sequence-parallel
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is no package: the HF recipe is a sibling
import grpo_qwen3_4b as recipe  # noqa: E402

from rlkit.ckpt.hf import SafetensorsWriter  # noqa: E402
from rlkit.ckpt.training_state import (  # noqa: E402
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from rlkit.lr_schedule import ParamGroupLR  # noqa: E402
from rlkit.metrics import CONSOLE_KEYS, format_metrics_line, plot_history, summarize_history  # noqa: E402
from rlkit.rollout.buffer import PartialRolloutBuffer, get_buffer_filter  # noqa: E402
from rlkit.rollout.engines.embedded import EmbeddedEngine  # noqa: E402
from rlkit.rollout.engines.process import ProcessEngine  # noqa: E402
from rlkit.rollout.prefetch import RolloutPrefetcher  # noqa: E402

# megatron-core announces its pure-torch fallbacks on import when Transformer Engine / Apex are absent (expected)
warnings.filterwarnings("ignore", "Transformer Engine and Apex are not installed", UserWarning)
warnings.filterwarnings("ignore", "Apex is not installed", UserWarning)

# The other ranks wait in a collective while rank 0 generates and evaluates; NCCL's default of 10 minutes would end
# a run whose rollout takes longer.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)

# console line: step, reward, loss, grad norm, tokens/s, then the recipe's other keys
STEP_KEYS = (("reward", "reward"), ("loss", "loss"), *CONSOLE_KEYS[1:])


# ----------------------------------------------------------------------------------------------------
# Setup: the process world, the policy as a megatron-core model.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class World:
    """This process's place: global rank, its megatron-core coordinates and its device."""

    rank: int
    world_size: int
    dp_size: int
    tp_size: int
    cp_size: int
    ep_size: int
    pp_size: int
    shard: tuple[int, int, int]  # (pp, tp, ep) rank: which part of the model this process holds
    device: torch.device

    def describe(self) -> str:
        pp = f" x PP{self.pp_size}" if self.pp_size > 1 else ""
        return f"DP{self.dp_size} x TP{self.tp_size} x CP{self.cp_size}{pp} (EP{self.ep_size})"


def init_world(args) -> World:
    """``torch.distributed`` (NCCL on CUDA, else gloo; one process without torchrun) and megatron's groups."""
    from megatron.core import parallel_state

    from rlkit.parallel.megatron.model import init_model_parallel

    if "RANK" in os.environ and not dist.is_initialized():  # torchrun: the world group, with a rollout-long timeout
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    init_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        seed=args.seed,
    )
    ps = parallel_state
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return World(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        shard=(
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_expert_model_parallel_rank(),
        ),
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
        hf_policy.config,
        hf_state_dict=hf_policy.state_dict(),
        params_dtype=dtype,
        device=world.device,
        sequence_parallel=args.sequence_parallel and world.tp_size > 1,
        **pipeline_split(args),
        **recompute,
    )
    return model.train()


def pipeline_split(args) -> dict:
    """megatron's uneven pipeline split from slime's ``--decoder-first/last-pipeline-num-layers`` (unset: even)."""
    split = dict(
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
    )
    return {key: value for key, value in split.items() if value is not None}


def megatron_reference(args, world: World, hf_policy):
    """The frozen reference ``GPTModel`` of the KL loss, in the policy's layout, without gradients.

    ``--ref-load``: megatron's ``torch_dist`` (slime's converted checkpoint, any layout), or rlkit's DCP export
    (``rlkit.ckpt.torch_dist.hf_to_torch_dist``, told by its ``hf_config.json``). Otherwise the policy's initial
    weights, as the HF backend's reference: ``hf_policy`` after :func:`megatron_policy`, which put rank 0's
    (warm-started) weights on every rank.
    """
    from rlkit.ckpt.torch_dist import CONFIG_NAME, load_megatron_dist, torch_dist_to_hf
    from rlkit.parallel.megatron.model import build_gpt_model

    state = hf_policy.state_dict()
    rlkit_export = bool(args.ref_load) and (Path(args.ref_load) / CONFIG_NAME).exists()
    if rlkit_export:
        state, _ = torch_dist_to_hf(args.ref_load)
    model = build_gpt_model(
        hf_policy.config,
        hf_state_dict=state,
        params_dtype=next(hf_policy.parameters()).dtype,
        device=world.device,
        sequence_parallel=args.sequence_parallel and world.tp_size > 1,
        **pipeline_split(args),
    )
    if args.ref_load and not rlkit_export:
        load_megatron_dist(model, args.ref_load)
    return model.eval().requires_grad_(False)


def build_optimizer(args, model):
    """``(module to train, optimizer, lr schedule)``: AdamW on every rank's part of the model (replicated over DP),
    or with ``--use-distributed-optimizer`` megatron's DDP and DistributedOptimizer (fp32 master weights and Adam
    state sharded over DP), CUDA only."""
    factor = recipe.lr_schedule(args)
    betas = (args.adam_beta1, args.adam_beta2)
    if not args.use_distributed_optimizer:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=betas, weight_decay=args.weight_decay)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    from rlkit.parallel.megatron.distributed import build_distributed_optimizer

    ddp_model, optimizer = build_distributed_optimizer(
        model, lr=args.lr, weight_decay=args.weight_decay, adam_betas=betas, clip_grad=args.clip_grad
    )
    return ddp_model, optimizer, ParamGroupLR(optimizer, args.lr, factor)


def build_engine(args, hf_policy, tokenizer, output_dir: Path, world: World):
    """Rank 0's rollout engine: the HF policy itself (--colocate), its own process, or an SGLang server.

    Decoupled on CUDA the engine takes its own GPU, the first after the trainers' (slime's --rollout-num-gpus);
    the weights reach it by NCCL broadcast. On CPU the broadcast runs over gloo.
    """
    if args.rollout_backend == "sglang":
        return recipe.build_engine(args, hf_policy, tokenizer, output_dir)
    if args.colocate:  # the HF policy becomes the engine's model: no second copy
        return EmbeddedEngine(hf_policy.eval(), tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0)
    engine_device = torch.device("cpu")
    if world.device.type == "cuda":
        if torch.cuda.device_count() <= world.world_size:
            raise SystemExit(
                f"a decoupled engine needs a GPU of its own: {torch.cuda.device_count()} GPU(s) for {world.world_size} "
                "trainer process(es); add --colocate to share rank 0's GPU, or launch fewer trainer processes"
            )
        engine_device = torch.device("cuda", world.world_size)
    engine = recipe.build_engine(args, hf_policy, tokenizer, output_dir, engine_device=engine_device)
    backend = "nccl" if engine_device.type == "cuda" else "gloo"
    engine.init_weight_group(backend=backend, device=world.device, engine_device=engine_device)
    return engine


# ----------------------------------------------------------------------------------------------------
# Weight sync and the train step.
# ----------------------------------------------------------------------------------------------------


def sync_weights(model, engine, hf_config, args, world: World) -> None:
    """Push the trained weights to rank 0's engine under HF names (``rlkit.parallel.megatron.weight_sync``).

    Every rank walks the model (the TP / EP gathers are collectives of its groups; ranks outside rank 0's groups
    gather copies nobody receives); rank 0 delivers the HF tensors in buckets: in place into a colocated engine,
    by broadcast into a decoupled one, or as one state dict to an SGLang server (it reloads the files it is sent).
    """
    from rlkit.parallel.megatron import weight_sync

    layout, groups = weight_sync.megatron_layout_and_groups(megatron_config(model))
    engine = engine if world.rank == 0 else None
    if args.rollout_backend == "sglang":  # checkpoint names (per-expert), written to disk for the server
        state: dict[str, torch.Tensor] = {}
        for bucket in weight_sync.hf_weight_buckets(model, hf_config, layout=layout, groups=groups):
            if engine is not None:  # the other ranks only take part in the gathers
                state.update(bucket)
        if engine is not None:
            engine.update_weights(state)
        return
    config = weight_sync.WeightSyncConfig(fused_experts=True)  # a live transformers-5 MoE holds experts fused
    deliver = weight_sync.sync_colocated if args.colocate else weight_sync.sync_decoupled
    deliver(model, engine, hf_config, config=config, layout=layout, groups=groups)


def megatron_config(model):
    """The ``TransformerConfig`` of a ``GPTModel``, wrapped in megatron's DDP or not."""
    return getattr(model, "module", model).config


def rollout_log_probs(samples) -> list[torch.Tensor]:
    """The engine's log-probs of every sample's response tokens (TIS), with the sample that lacks them named."""
    out = []
    for index, sample in enumerate(samples):
        values = sample.metadata.get("rollout_log_probs")
        if values is None or len(values) != sample.response_length:
            raise ValueError(
                f"--use-tis: sample {index} carries {0 if values is None else len(values)} rollout log-probs for "
                f"{sample.response_length} response tokens; the rollout engine must report one per token"
            )
        out.append(torch.tensor(values, dtype=torch.float32))
    return out


def train_rollout(
    model, optimizer, scheduler, samples, packer, loss_config, args, *, vocab_size, reference=None
) -> dict[str, float]:
    """``--num-steps-per-rollout`` optimizer steps over the rollout's samples (the same on every rank).

    The old-policy log-probs of every step's samples are computed first, so each step's ratio is to the policy
    that generated the rollout; so are the ``reference`` model's (the KL loss) when there is one. Returns the
    metrics averaged over the steps (``loss``, ``grad_norm``, ...).
    """
    from rlkit.parallel.megatron.forward import megatron_forward
    from rlkit.parallel.megatron.step import RLBatch, compute_log_probs, train_step

    forward = megatron_forward(model)
    passes = {"old_log_probs": (forward, model)}
    if reference is not None:
        passes["ref_log_probs"] = (megatron_forward(reference), reference)
    size = args.global_batch_size
    batches = [samples[k * size : (k + 1) * size] for k in range(args.num_steps_per_rollout)]
    model.eval()
    for batch in batches:
        for key, (pass_forward, pass_model) in passes.items():
            values = compute_log_probs(
                pass_forward,
                [torch.tensor(s.tokens) for s in batch],
                [s.response_length for s in batch],
                packer=packer,
                vocab_size=vocab_size,
                temperature=args.rollout_temperature,
                model=pass_model,
            )
            for sample, value in zip(batch, values, strict=True):
                sample.metadata[key] = value
    model.train()
    totals: dict[str, float] = {}
    for batch in batches:
        rl_batch = RLBatch(
            tokens=[torch.tensor(s.tokens) for s in batch],
            response_lengths=[s.response_length for s in batch],
            advantages=[torch.tensor(s.metadata["advantages"], dtype=torch.float32) for s in batch],
            old_log_probs=[s.metadata["old_log_probs"] for s in batch],
            loss_masks=[torch.tensor(s.effective_loss_mask(), dtype=torch.float32) for s in batch],
            ref_log_probs=[s.metadata["ref_log_probs"] for s in batch] if reference is not None else None,
            rollout_log_probs=rollout_log_probs(batch) if loss_config.use_tis else None,
        )
        result = train_step(model, optimizer, rl_batch, packer=packer, loss_config=loss_config, forward=forward,
                            vocab_size=vocab_size, max_grad_norm=args.clip_grad,
                            temperature=args.rollout_temperature,
                            max_response_len=args.rollout_max_response_len)  # fmt: skip
        scheduler.step()
        step = result.metrics | {"grad_norm": result.grad_norm, "micro_batches": float(result.num_micro_batches)}
        for name, value in step.items():
            totals[name] = totals.get(name, 0.0) + value / len(batches)
    return totals


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one rlkit training state per model-parallel shard, written by the first rank holding it.
# ----------------------------------------------------------------------------------------------------


def shard_dir(root: str, world: World, num_shards: int) -> Path:
    """``root`` when one shard holds the whole model (the HF backend's layout), else ``root/pp{p}_tp{t}_ep{e}``."""
    return Path(root) if num_shards == 1 else Path(root) / "pp{}_tp{}_ep{}".format(*world.shard)


def shard_owners(world: World) -> tuple[bool, int]:
    """Whether this rank writes its shard (the lowest rank holding it), and the number of distinct shards."""
    shards: list = [None] * world.world_size
    dist.all_gather_object(shards, world.shard)
    return shards.index(world.shard) == world.rank, len(set(shards))


def save(args, model, optimizer, scheduler, loop, hf_config, tokenizer, world: World, next_rollout_id: int) -> None:
    """Every shard's weights and AdamW state; rank 0 adds the loop state (``loop``: data, buffer, history) and RNG.

    With ``--save-hf`` every rank takes part in gathering the HF tensors and rank 0 writes them next to its shard.
    """
    from rlkit.parallel.megatron import weight_sync

    owner, num_shards = shard_owners(world)
    path = None
    if owner:
        loop_state = {"next_rollout_id": next_rollout_id, "scheduler": scheduler.state_dict()}
        path = save_training_state(
            shard_dir(args.save, world, num_shards),
            step=next_rollout_id,
            model_state={name: p.detach() for name, p in model.named_parameters()},
            optimizer_state=optimizer.state_dict(),
            loop_state=loop_state | (loop or {}),
            rng_state=capture_rng_state() if world.rank == 0 else None,
            keep_last=2,
        )
    if args.save_hf:  # loadable by transformers' from_pretrained: config, tokenizer, safetensors shards
        layout, groups = weight_sync.megatron_layout_and_groups(megatron_config(model))
        writer = SafetensorsWriter(path / "hf") if world.rank == 0 else None
        for name, tensor in weight_sync.iter_hf_tensors(model, hf_config, layout=layout, groups=groups):
            if writer is not None:
                writer.add(name, tensor.cpu())
        if writer is not None:
            writer.close()
            hf_config.save_pretrained(path / "hf")
            tokenizer.save_pretrained(path / "hf")
    dist.barrier()  # a checkpoint counts once every shard is on disk


def load(args, model, optimizer, scheduler, world: World):
    """This rank's shard: weights, AdamW state and scheduler (rank 0's state also carries the loop state)."""
    _, num_shards = shard_owners(world)
    state = load_training_state(shard_dir(args.load, world, num_shards))
    missing, unexpected = model.load_state_dict(state.model_state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # megatron's TE-style buffers, no weights
    if missing or unexpected:
        raise SystemExit(f"--load {args.load}: the checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (written by the HF backend, or another layout?)")  # fmt: skip
    optimizer.load_state_dict(state.optimizer_state)
    scheduler.load_state_dict(state.loop_state["scheduler"])
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
    say(f"[rlkit] megatron backend: {world.world_size} process(es), {world.describe()}, "
        f"{dist.get_backend()} on {world.device.type}")  # fmt: skip
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        say("[rlkit] --sequence-parallel has no effect at TP=1 (megatron-core disables it there too)")
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
    trained, optimizer, scheduler = build_optimizer(args, model)  # trained: the model, or megatron's DDP around it
    packer = recipe.build_packer(args, dp_size=world.dp_size, cp_size=world.cp_size)
    loss_config = recipe.build_loss_config(args)
    reference = None
    # Only for a non-zero coefficient (a model's memory per rank); slime builds it whenever --use-kl-loss is set.
    if loss_config.use_kl_loss:
        reference = megatron_reference(args, world, hf_policy)
        say(f"[rlkit] reference model for the KL loss: {args.ref_load or 'the initial weights'}")
    elif args.ref_load:
        say("[rlkit] --ref-load is not read: the KL term is off (--kl-loss-coef 0), so no reference model is needed")
    buffer = PartialRolloutBuffer(get_buffer_filter(args.buffer_filter_path))
    start_rollout, history, prefetched = 0, [], None
    if args.load:
        state = load(args, model, optimizer, scheduler, world)
        start_rollout = state.loop_state["next_rollout_id"]
        if is_main:
            history = state.loop_state["history"]
            dataset.load_state_dict(state.loop_state["dataset"])
            buffer.load_state_dict(state.loop_state["buffer"])
            prefetched = RolloutPrefetcher.resumed_rollout(state.loop_state)
            restore_rng_state(state.rng_state)
        say(f"[rlkit] resumed from {state.path} at rollout {start_rollout}")
    engine = eval_sets = rollouts = metrics_file = None
    if is_main:
        engine = build_engine(args, hf_policy, tokenizer, output_dir, world)
        where = f"its own process (pid {engine.process.pid})" if isinstance(engine, ProcessEngine) else "this process"
        say(f"[rlkit] rollout engine: {type(engine).__name__} in {where}")
        eval_sets = recipe.build_eval_sets(args, tokenizer, stops)
        do_rollout = recipe.make_rollout_fn(args, engine, dataset, score, stops, buffer)
        rollouts = RolloutPrefetcher(do_rollout, num_rollout=args.num_rollout, async_mode=args.async_mode,
                                     resumed=prefetched)  # fmt: skip
        metrics_file = open(output_dir / "metrics.jsonl", "a")
    sync_weights(model, engine, hf_config, args, world)  # the engine starts from the trained weights (--load)
    if is_main:
        if start_rollout == 0 and eval_sets:
            history.append(recipe.evaluate(engine, eval_sets, score, rollout_id=0))
            say(format_metrics_line(history[-1]))
    del hf_policy  # from here on only a colocated engine holds it (as its model)
    for rollout_id in range(start_rollout, args.num_rollout):
        t0 = time.perf_counter()
        payload = [None]
        if is_main:
            groups, rollout_metrics = rollouts.get(rollout_id)
            samples, rewards, reward_errors = recipe.graded_samples(args, groups, rollout_id)
            payload = [samples]
        if world.world_size > 1:
            dist.broadcast_object_list(payload, src=0)  # token ids, rewards, advantages: small next to weights
        samples = payload[0]
        step_metrics = train_rollout(trained, optimizer, scheduler, samples, packer, loss_config, args,
                                     vocab_size=vocab_size, reference=reference)  # fmt: skip
        sync_weights(model, engine, hf_config, args, world)
        if not is_main:
            if args.save and args.save_interval and (rollout_id + 1) % args.save_interval == 0:
                save(args, model, optimizer, scheduler, None, hf_config, tokenizer, world, rollout_id + 1)
            continue
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
            loop = {"dataset": dataset.state_dict(), "buffer": buffer.state_dict(), "history": history,
                    **rollouts.in_flight_state()}  # fmt: skip
            save(args, model, optimizer, scheduler, loop, hf_config, tokenizer, world, rollout_id + 1)
    if is_main:
        rollouts.close()
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
