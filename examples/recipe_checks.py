"""What each backend of examples/grpo_qwen3_4b.py cannot honour: its flags checked, each refusal naming the flag.

A sibling of the recipe rather than part of it or of the library: every check reads the recipe's argparse namespace
(slime's flag names), and the list of refusals is long but no part of the algorithm's narrative. ``parse_args``
collects the problems of the chosen ``--backend`` and rejects them together; nothing is silently ignored. The
batch-size flags, which depend on one another, are derived and checked here too (``resolve_batch_sizes``).
"""

from __future__ import annotations

import argparse
import os

import torch


def backend_problems(args: argparse.Namespace, *, world_size: int | None = None) -> list[str]:
    """Settings the chosen ``--backend`` (or the rollout side) cannot honour, each with the reason and fix."""
    if world_size is None:  # torchrun sets WORLD_SIZE; a plain python3 launch is one process
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.backend == "hf":
        trainer = hf_problems(args)
    else:
        trainer = megatron_problems(args, world_size=world_size)
    if args.backend == "hf" and world_size != 1:
        trainer.append(f"torchrun with {world_size} processes: the HF backend is one process; use --backend megatron")
    return trainer + rollout_problems(args)


def hf_problems(args: argparse.Namespace) -> list[str]:
    """Trainer settings the HF transformers backend (one device) cannot honour."""
    one_device = "the HF backend trains on one device; use --backend megatron for model parallelism"
    checks = [
        (args.tensor_model_parallel_size != 1, f"--tensor-model-parallel-size {args.tensor_model_parallel_size}"),
        (args.pipeline_model_parallel_size != 1, f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}"),
        (args.context_parallel_size != 1, f"--context-parallel-size {args.context_parallel_size}"),
        (args.expert_model_parallel_size != 1, f"--expert-model-parallel-size {args.expert_model_parallel_size}"),
        (
            args.expert_tensor_parallel_size != 1,
            f"--expert-tensor-parallel-size {args.expert_tensor_parallel_size}",
        ),
        (args.sequence_parallel, "--sequence-parallel"),
        (args.decoder_first_pipeline_num_layers is not None, "--decoder-first-pipeline-num-layers"),
        (args.decoder_last_pipeline_num_layers is not None, "--decoder-last-pipeline-num-layers"),
        (
            args.actor_num_nodes != 1 or args.actor_num_gpus_per_node != 1,
            f"--actor-num-nodes {args.actor_num_nodes} --actor-num-gpus-per-node {args.actor_num_gpus_per_node}",
        ),
        (args.use_distributed_optimizer, "--use-distributed-optimizer"),
        (args.optimizer_cpu_offload, "--optimizer-cpu-offload"),
    ]
    problems = [f"{flag}: not supported by this backend ({one_device})" for bad, flag in checks if bad]
    if args.ref_load:
        problems.append(
            "--ref-load: not supported by this backend (it reads Megatron torch_dist); the HF backend uses "
            "--hf-checkpoint's weights as the reference model (or use --backend megatron)"
        )
    if (
        args.recompute_granularity == "selective"
        or (args.recompute_method or "uniform") != "uniform"
        or (args.recompute_num_layers not in (None, 1))
    ):
        problems.append(
            "--recompute-*: the HF backend supports only '--recompute-granularity full --recompute-method uniform "
            "--recompute-num-layers 1' (per-layer activation checkpointing)"
        )
    return problems


def rollout_problems(args: argparse.Namespace) -> list[str]:
    """Rollout-side settings neither backend can honour (the engines are rlkit's, or a server you launch)."""
    problems = []
    if args.rollout_num_gpus_per_engine != 1 and args.rollout_backend == "embedded":
        problems.append(
            f"--rollout-num-gpus-per-engine {args.rollout_num_gpus_per_engine}: not supported by the embedded "
            "engine (one device); use --rollout-backend sglang and size the SGLang server yourself"
        )
    if args.rollout_num_gpus not in (None, 0, 1):
        problems.append(f"--rollout-num-gpus {args.rollout_num_gpus}: not supported by this backend (one engine)")
    for flag in ("sglang_mem_fraction_static", "sglang_cuda_graph_bs"):
        if getattr(args, flag) is not None:
            problems.append(
                f"--{flag.replace('_', '-')}: not supported here: rlkit does not launch SGLang servers; pass it "
                "to the server you start and point --sglang-router-url at it"
            )
    if args.rollout_backend == "sglang" and not args.sglang_router_url:
        problems.append("--rollout-backend sglang needs --sglang-router-url http://host:port")
    if args.async_mode and args.colocate:
        problems.append("--async with --colocate: generation and training would share one device; drop one")
    return problems


def megatron_problems(args: argparse.Namespace, *, world_size: int) -> list[str]:
    """Trainer settings this backend cannot honour, each with the reason and the fix (the recipe rejects them)."""
    problems = []
    for end in ("first", "last"):
        if getattr(args, f"decoder_{end}_pipeline_num_layers") is not None and args.pipeline_model_parallel_size == 1:
            problems.append(f"--decoder-{end}-pipeline-num-layers: only with --pipeline-model-parallel-size > 1")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world_size % model_parallel:
        problems.append(
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size = "
            f"{model_parallel} does not divide the {world_size} launched processes; launch "
            f"'python3 -m torch.distributed.run --nproc-per-node {model_parallel} ...'"
        )
    expert_grid = args.expert_model_parallel_size * args.expert_tensor_parallel_size * args.pipeline_model_parallel_size
    if world_size % expert_grid:
        problems.append(
            f"--expert-model-parallel-size x --expert-tensor-parallel-size x --pipeline-model-parallel-size = "
            f"{expert_grid} does not divide the {world_size} launched processes"
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
    if args.device:
        problems.append(f"--device {args.device}: the megatron backend puts each process on its LOCAL_RANK GPU "
                        "when CUDA is available, else on the CPU; drop --device")  # fmt: skip
    if args.use_distributed_optimizer and not torch.cuda.is_available():
        problems.append(
            "--use-distributed-optimizer: megatron-core's DistributedOptimizer needs CUDA (0.16.1 checks for "
            "torch.cuda tensors); drop it on CPU, where AdamW is replicated on every rank"
        )
    if args.optimizer_cpu_offload:
        problems.append(
            "--optimizer-cpu-offload: not supported by the megatron backend (megatron-core 0.16.1's "
            "HybridDeviceOptimizer did not match the on-GPU DistributedOptimizer on an H100 in bf16 and rejects "
            "float32 weights; see rlkit.parallel.megatron.distributed); use --use-distributed-optimizer alone"
        )
    if args.use_distributed_optimizer and (args.save or args.load):
        problems.append(
            "--use-distributed-optimizer with --save / --load: this recipe does not checkpoint the sharded optimizer "
            "state yet; drop one (the weights alone: --save-hf from a run without --use-distributed-optimizer)"
        )
    return problems


def resolve_batch_sizes(args: argparse.Namespace) -> str | None:
    """Fill ``--global-batch-size`` and ``--num-steps-per-rollout`` from each other, and ``--micro-batch-size``.

    A rollout's ``rollout-batch-size x n-samples-per-prompt`` samples are trained in ``num_steps_per_rollout``
    optimizer steps of ``global_batch_size`` samples each (one step by default, as in slime). Returns the
    problem for ``parser.error``, or ``None`` once ``args`` is filled in.
    """
    rollout_samples = args.rollout_batch_size * args.n_samples_per_prompt
    if args.global_batch_size is None:
        args.num_steps_per_rollout = args.num_steps_per_rollout or 1
        if rollout_samples % args.num_steps_per_rollout:
            return (
                f"--num-steps-per-rollout {args.num_steps_per_rollout} does not divide {rollout_samples} "
                "samples per rollout (rollout-batch-size x n-samples-per-prompt)"
            )
        args.global_batch_size = rollout_samples // args.num_steps_per_rollout
    elif rollout_samples % args.global_batch_size or (
        args.num_steps_per_rollout not in (None, rollout_samples // args.global_batch_size)
    ):
        return (
            f"--global-batch-size {args.global_batch_size} must divide the {rollout_samples} samples per "
            f"rollout and agree with --num-steps-per-rollout {args.num_steps_per_rollout}"
        )
    args.num_steps_per_rollout = rollout_samples // args.global_batch_size
    if not args.use_dynamic_batch_size and args.micro_batch_size is None:
        args.micro_batch_size = 1
    if args.use_dynamic_batch_size and args.max_tokens_per_gpu is None:
        return "--use-dynamic-batch-size needs --max-tokens-per-gpu N"
    return None
