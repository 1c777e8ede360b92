"""GRPO on math prompts, assembled from rlkit components: the Qwen3-4B seed recipe as one readable file.

Algorithm (GRPO, Shao et al. 2024, with DAPO's clip-higher, Yu et al. 2025), per rollout ``k``:
  1. take ``--rollout-batch-size`` prompts, sample ``--n-samples-per-prompt`` responses each with the
     rollout engine at ``--rollout-temperature``; grade them (``--rm-type``); optionally keep only groups
     whose rewards differ (``--dynamic-sampling-filter-path``, over-sampling, partial-rollout buffer);
  2. advantages ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)`` broadcast to every response token;
  3. log-probs of the old policy (and of the reference when ``--use-kl-loss`` with a nonzero coefficient)
     in no-grad passes, then ``--num-steps-per-rollout`` optimizer steps over ``--global-batch-size``
     samples each, micro-batched by token budget (``--use-dynamic-batch-size --max-tokens-per-gpu``):
     ``L = -min(rho A, clip(rho, 1-eps_clip, 1+eps_clip_high) A) + beta KL(pi || pi_ref) - c H(pi)``,
     averaged over the whole global batch per sample (slime's default) or per token with
     ``--calculate-per-token-loss``, exact under any micro-batching;
  4. push the new weights to the engine; evaluate every ``--eval-interval``; save every ``--save-interval``.

How it departs from slime's train.py: the trainer is the HF transformers backend on one process and one
device (default), or with ``--backend megatron`` megatron-core on 1 or N torchrun processes (TP / SP / CP / EP
and data parallelism; that half of the loop is examples/grpo_megatron.py, see docs/recipe-megatron.md); the
rollout engine is rlkit's embedded PyTorch engine (in this process with ``--colocate``, in its own process
otherwise) or an SGLang server reached over HTTP (``--rollout-backend sglang --sglang-router-url URL``).
``--async`` overlaps generation of rollout k+1 with training on rollout k (one step off-policy; ``--use-tis``
corrects with truncated importance sampling), like slime's train_async.py. Flags the chosen backend cannot honour
are rejected with a message naming them, never silently ignored.

Commands:
  CPU, embedded default (a tiny Qwen3-architecture model and a bundled arithmetic set; ~2.5 min on 2 cores):
      python3 examples/grpo_qwen3_4b.py
  GPU, a real checkpoint and data set (slime flag names):
      python3 examples/grpo_qwen3_4b.py --hf-checkpoint /root/Qwen3-4B --prompt-data dapo-math-17k.jsonl \\
          --input-key prompt --label-key label --apply-chat-template --rm-type deepscaler \\
          --rollout-batch-size 32 --n-samples-per-prompt 8 --rollout-max-response-len 8192 \\
          --use-dynamic-batch-size --max-tokens-per-gpu 9216 --eps-clip-high 0.28 --lr 1e-6 --colocate
  megatron-core backend, 1 process, or 2 (gloo on CPU, NCCL on 2 GPUs; add --tensor-model-parallel-size 2 for TP):
      python3 examples/grpo_qwen3_4b.py --backend megatron
      python3 -m torch.distributed.run --nproc-per-node 2 examples/grpo_qwen3_4b.py --backend megatron --colocate
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from rlkit.algos.advantages import get_advantage_estimator
from rlkit.algos.losses import PolicyLossConfig
from rlkit.ckpt.training_state import capture_rng_state, load_training_state, restore_rng_state, save_training_state
from rlkit.lr_schedule import warmup_decay_schedule
from rlkit.metrics import format_metrics_line, plot_history, summarize_history
from rlkit.models.tiny import build_char_tokenizer, build_tiny_qwen3
from rlkit.parallel.hf import accumulate_policy_gradients, store_response_logprobs
from rlkit.parallel.hf_sft import answer_sft_loss
from rlkit.parallel.packing import DataPacker
from rlkit.rollout.buffer import PartialRolloutBuffer, get_buffer_filter
from rlkit.rollout.data import PromptDataset
from rlkit.rollout.engines.base import SamplingParams
from rlkit.rollout.engines.embedded import EmbeddedEngine
from rlkit.rollout.engines.process import ProcessEngine
from rlkit.rollout.engines.sglang import SGLangClientConfig, SGLangEngine
from rlkit.rollout.filters import get_dynamic_filter
from rlkit.rollout.manager import EvalDataset, RolloutConfig, eval_step, rollout_step
from rlkit.rollout.prefetch import RolloutPrefetcher
from rlkit.rollout.rewards import get_reward_fn
from rlkit.rollout.rewards.scoring import count_reward_errors, make_batch_reward_fn
from rlkit.rollout.sample import Sample, flatten_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is no package: the flag checks are a sibling
from recipe_checks import backend_problems, resolve_batch_sizes  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# 1. Flags (slime's names). Values the chosen backend cannot honour (recipe_checks.py) are rejected together.
# ----------------------------------------------------------------------------------------------------

RECIPE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument_group("CKPT").add_argument
    a("--hf-checkpoint", help="HF model dir (weights, config, tokenizer). Omit for the embedded default.")
    a("--ref-load", help="(megatron backend) torch_dist reference checkpoint; the HF backend uses --hf-checkpoint")
    a("--load", help="resume from this training checkpoint dir (rlkit format, see rlkit.ckpt.training_state)")
    a("--save", help="write training checkpoints (and an HF export) here")
    a("--save-interval", type=int, default=None, help="save every N rollouts")
    a("--save-hf", action="store_true", help="also export the policy as an HF checkpoint at every save")
    a = p.add_argument_group("ROLLOUT").add_argument
    a("--prompt-data", help="jsonl prompt file (default: the bundled arithmetic set)")
    a("--input-key", default="prompt")
    a("--label-key", default="label")
    a("--metadata-key", default=None)
    a("--apply-chat-template", action="store_true")
    a("--rollout-shuffle", action="store_true")
    a("--rollout-seed", type=int, default=42)
    a("--rm-type", default=None, help="reward by name (default: deepscaler; math for the embedded default)")
    a("--custom-rm-path", default=None, help="module:function reward, overrides --rm-type")
    a("--reward-timeout", type=float, default=10.0, help="seconds per sample before a reward counts as failed")
    a("--num-rollout", type=int, default=None)
    a("--rollout-batch-size", type=int, default=None, help="prompts per rollout")
    a("--n-samples-per-prompt", type=int, default=None)
    a("--rollout-max-prompt-len", type=int, default=None)
    a("--rollout-max-response-len", type=int, default=None)
    a("--rollout-temperature", type=float, default=1.0)
    a("--rollout-top-p", type=float, default=1.0)
    a("--rollout-top-k", type=int, default=-1)
    a("--num-steps-per-rollout", type=int, default=None)
    a("--global-batch-size", type=int, default=None, help="samples per optimizer step")
    a("--balance-data", action="store_true", help="balance tokens over DP ranks (DataPacker)")
    a("--over-sampling-batch-size", type=int, default=None)
    a("--dynamic-sampling-filter-path", default=None)
    a("--partial-rollout", action="store_true")
    a("--buffer-filter-path", default=None)
    a = p.add_argument_group("EVAL").add_argument
    a("--eval-interval", type=int, default=None)
    a("--eval-prompt-data", nargs="+", default=None, help="PATH, or NAME PATH [NAME PATH ...]")
    a("--n-samples-per-eval-prompt", type=int, default=None)
    a("--eval-max-response-len", type=int, default=None)
    a("--eval-top-p", type=float, default=None)
    a("--eval-temperature", type=float, default=None)
    a = p.add_argument_group("PERF (megatron names; the HF backend runs TP=PP=CP=EP=1)").add_argument
    for flag in ("tensor-model", "pipeline-model", "context", "expert-model", "expert-tensor"):
        a(f"--{flag}-parallel-size", type=int, default=1)
    a("--sequence-parallel", action="store_true")
    a("--decoder-first-pipeline-num-layers", type=int, default=None, help="layers of the first pipeline stage")
    a("--decoder-last-pipeline-num-layers", type=int, default=None, help="layers of the last pipeline stage")
    a("--recompute-granularity", choices=["full", "selective"], default=None)
    a("--recompute-method", choices=["uniform", "block"], default=None)
    a("--recompute-num-layers", type=int, default=None)
    a("--micro-batch-size", type=int, default=None)
    a("--use-dynamic-batch-size", action="store_true")
    a("--max-tokens-per-gpu", type=int, default=None)
    a = p.add_argument_group("GRPO").add_argument
    a("--advantage-estimator", default="grpo")
    a("--disable-grpo-std-normalization", action="store_true")
    a("--use-kl-loss", action="store_true")
    a("--kl-loss-coef", type=float, default=0.0)
    a("--kl-loss-type", default="low_var_kl")
    a("--entropy-coef", type=float, default=0.0)
    a("--eps-clip", type=float, default=0.2)
    a("--eps-clip-high", type=float, default=None)
    a("--eps-clip-c", type=float, default=None)
    a("--use-tis", action="store_true")
    a("--tis-clip", type=float, default=2.0)
    a("--tis-clip-low", type=float, default=0.0)
    a("--calculate-per-token-loss", action="store_true", help="token_mean over the global batch (else sample_mean)")
    a("--loss-aggregation", choices=["token_mean", "sample_mean", "seq_mean_token_sum_norm"], default=None)
    a = p.add_argument_group("OPTIMIZER").add_argument
    a("--optimizer", choices=["adam"], default="adam")
    a("--lr", type=float, default=None)
    a("--lr-decay-style", choices=["constant", "cosine", "linear"], default="constant")
    a("--lr-warmup-iters", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--adam-beta1", type=float, default=0.9)
    a("--adam-beta2", type=float, default=0.999)
    a("--clip-grad", type=float, default=1.0)
    a("--use-distributed-optimizer", action="store_true", help="(megatron backend) shard optimizer state over DP")
    a("--optimizer-cpu-offload", action="store_true", help="(megatron backend) optimizer state and step on the CPU")
    a = p.add_argument_group("RESOURCES / SGLANG").add_argument
    a("--colocate", action="store_true", help="engine in this process (else its own process)")
    a("--async", dest="async_mode", action="store_true", help="generate rollout k+1 while training on k")
    a("--actor-num-nodes", type=int, default=1)
    a("--actor-num-gpus-per-node", type=int, default=1)
    a("--rollout-num-gpus", type=int, default=None)
    a("--rollout-num-gpus-per-engine", type=int, default=1)
    a("--rollout-backend", choices=["embedded", "sglang"], default="embedded")
    a("--sglang-router-url", default=None, help="http://host:port of an SGLang server or router")
    a("--sglang-server-concurrency", type=int, default=512)
    a("--sglang-mem-fraction-static", type=float, default=None)
    a("--sglang-cuda-graph-bs", type=int, nargs="+", default=None)
    a = p.add_argument_group("RLKIT").add_argument
    a(
        "--backend",
        choices=["hf", "megatron"],
        default="hf",
        help="trainer: HF transformers on one device, or megatron-core over torchrun processes (grpo_megatron.py)",
    )
    a("--output-dir", default="outputs/grpo_qwen3_4b")
    a("--device", default=None, help="cpu / cuda (default: cuda if available)")
    a("--seed", type=int, default=1234)
    a("--sft-warmup-steps", type=int, default=None, help="SFT steps before RL when the model earns no reward")
    a("--no-plot", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse slime-style flags, fill the embedded default, and reject what this backend cannot do."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = backend_problems(args)
    if problems:
        parser.error("these settings are not supported:\n  - " + "\n  - ".join(problems))
    args.embedded_default = args.hf_checkpoint is None
    if args.embedded_default:  # a tiny model on the bundled arithmetic set; every value stays overridable
        data = resources.files("rlkit.data")
        # fmt: off
        defaults = dict(
            prompt_data=str(data / "arith_train.jsonl"), eval_prompt_data=["arith", str(data / "arith_eval.jsonl")],
            apply_chat_template=True, rollout_shuffle=True, num_rollout=200, rollout_batch_size=16,
            n_samples_per_prompt=8, rollout_max_response_len=12, eval_interval=20, n_samples_per_eval_prompt=8,
            rm_type="math",  # the same grader as deepscaler, without requiring a </think> block
            lr=1e-3, sft_warmup_steps=120, use_dynamic_batch_size=True, max_tokens_per_gpu=2048,
        )
        # fmt: on
        for key, value in defaults.items():
            if getattr(args, key) is None or getattr(args, key) is False:  # an explicit 0 stays 0
                setattr(args, key, value)
    fallbacks = dict(num_rollout=1, rollout_batch_size=32, n_samples_per_prompt=8, rollout_max_response_len=1024,
                     lr=1e-6, rm_type="deepscaler", sft_warmup_steps=0)  # fmt: skip
    for key, fallback in fallbacks.items():
        if getattr(args, key) is None:
            setattr(args, key, fallback)
    problem = resolve_batch_sizes(args)  # --global-batch-size, --num-steps-per-rollout, --micro-batch-size
    if problem:
        parser.error(problem)
    # slime's default is the per-sample mean; --calculate-per-token-loss switches to the per-token mean
    args.loss_aggregation = args.loss_aggregation or ("token_mean" if args.calculate_per_token_loss else "sample_mean")
    if args.advantage_estimator not in RECIPE_ESTIMATORS:
        parser.error(
            f"--advantage-estimator {args.advantage_estimator}: this recipe supports {RECIPE_ESTIMATORS} "
            "(outcome rewards per sample); token-level estimators need a critic or token rewards"
        )
    return args


# ----------------------------------------------------------------------------------------------------
# 2. Setup: tokenizer and policy, data, reward, packer, loss, lr schedule, engine, eval sets, SFT warm start.
# ----------------------------------------------------------------------------------------------------

TINY_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)  # fmt: skip


def build_tokenizer_and_policy(args, device):
    """The tokenizer and the trainable policy (fp32 on CPU, bf16 weights on GPU)."""
    if args.embedded_default:
        tokenizer = build_char_tokenizer()
        policy = build_tiny_qwen3(seed=args.seed, **TINY_MODEL)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        policy = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=dtype)
    if args.recompute_granularity == "full":
        policy.gradient_checkpointing_enable()
    return tokenizer, policy.to(device).train()


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id))


def build_dataset(args, tokenizer) -> PromptDataset:
    """The ``--prompt-data`` prompts in a seeded order (``--rollout-shuffle``), resumable (``state_dict``)."""
    return PromptDataset(args.prompt_data, tokenizer=tokenizer, input_key=args.input_key, label_key=args.label_key,
                         metadata_key=args.metadata_key, apply_chat_template=args.apply_chat_template,
                         max_prompt_len=args.rollout_max_prompt_len, shuffle=args.rollout_shuffle,
                         seed=args.rollout_seed)  # fmt: skip


def build_scorer(args):
    """``samples -> rewards``: ``--custom-rm-path`` or ``--rm-type``, each sample cut at ``--reward-timeout``."""
    reward_fn = get_reward_fn(rm_type=None if args.custom_rm_path else args.rm_type, custom_rm_path=args.custom_rm_path)
    return make_batch_reward_fn(reward_fn, timeout_s=args.reward_timeout)


def build_packer(args, *, dp_size: int = 1, cp_size: int = 1) -> DataPacker:
    """Micro-batches by token budget (``--use-dynamic-batch-size``) or by ``--micro-batch-size``."""
    if args.use_dynamic_batch_size:
        return DataPacker(dp_size=dp_size, cp_size=cp_size, max_tokens_per_gpu=args.max_tokens_per_gpu,
                          balance_data=args.balance_data)  # fmt: skip
    return DataPacker(dp_size=dp_size, cp_size=cp_size, micro_batch_size=args.micro_batch_size)


def build_loss_config(args) -> PolicyLossConfig:
    return PolicyLossConfig(
        eps_clip=args.eps_clip,
        eps_clip_high=args.eps_clip_high,
        eps_clip_c=args.eps_clip_c,
        use_kl_loss=args.use_kl_loss and args.kl_loss_coef != 0,
        kl_loss_coef=args.kl_loss_coef,
        kl_loss_type=args.kl_loss_type,
        entropy_coef=args.entropy_coef,
        use_tis=args.use_tis,
        tis_clip=args.tis_clip,
        tis_clip_low=args.tis_clip_low,
        aggregation=args.loss_aggregation,
    )


def lr_schedule(args):
    """Multiplier of ``--lr`` per optimizer step: ``--lr-warmup-iters`` linear warmup, then ``--lr-decay-style``."""
    return warmup_decay_schedule(num_steps=args.num_rollout * args.num_steps_per_rollout,
                                 warmup_steps=args.lr_warmup_iters, decay_style=args.lr_decay_style)  # fmt: skip


def build_engine(args, policy, tokenizer, output_dir: Path, *, engine_device: torch.device | None = None):
    """The rollout engine: in this process (--colocate), in its own process (on ``engine_device``, default the
    policy's), or an SGLang server."""
    if args.rollout_backend == "sglang":  # weights reach the server through files it reloads
        config = SGLangClientConfig(urls=(args.sglang_router_url,), server_concurrency=args.sglang_server_concurrency)
        weights_dir = output_dir / "sglang_weights"  # a loadable HF directory: config, tokenizer, weights
        policy.config.save_pretrained(weights_dir)
        tokenizer.save_pretrained(weights_dir)
        return SGLangEngine(config, tokenizer=tokenizer, weights_dir=str(weights_dir))
    if args.colocate:
        engine_model = copy.deepcopy(policy).eval()  # generation never sees half-updated training weights
        return EmbeddedEngine(engine_model, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0)
    engine_device = engine_device or next(policy.parameters()).device
    if engine_device.type == "cpu":  # split the cores between trainer and engine
        threads = max(1, torch.get_num_threads() // 2)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the spawned engine process at start
    export = output_dir / "engine_init"  # the child process loads the same weights from an HF export
    policy.save_pretrained(export, safe_serialization=True)
    tokenizer.save_pretrained(export)
    return ProcessEngine(
        "rlkit.rollout.engines.embedded:from_pretrained",
        {"path": str(export), "device": str(engine_device)},
    )


def build_eval_sets(args, tokenizer, stops) -> list[EvalDataset]:
    """``--eval-prompt-data PATH`` or ``NAME PATH [NAME PATH ...]`` -> named eval sets (all prompts each)."""
    spec = args.eval_prompt_data or []
    if len(spec) == 1:
        spec = [Path(spec[0]).stem, spec[0]]
    if len(spec) % 2:
        raise SystemExit(f"--eval-prompt-data takes PATH or NAME PATH pairs, got {spec}")
    sets = []
    for name, path in zip(spec[::2], spec[1::2], strict=True):
        data = PromptDataset(path, tokenizer=tokenizer, input_key=args.input_key, label_key=args.label_key,
                             apply_chat_template=args.apply_chat_template)  # fmt: skip
        sets.append(EvalDataset(name=name, prompts=data.next_batch(len(data)),
                                n_samples_per_prompt=args.n_samples_per_eval_prompt or 1,
                                sampling=sampling_params(args, stops, seed=args.seed, eval_set=True)))  # fmt: skip
    return sets


def warm_start_if_needed(args, policy, dataset, tokenizer, score, stops) -> None:
    """SFT on ``\\boxed{label}`` answers when the untrained policy earns no reward on a probe batch (a random model)."""
    if not args.sft_warmup_steps:
        return
    probe = dataset.next_batch(args.rollout_batch_size)  # does the untrained policy earn any reward?
    probe_engine = EmbeddedEngine(policy.eval(), pad_token_id=tokenizer.pad_token_id or 0, tokenizer=tokenizer)
    probe_engine.generate(probe, sampling_params(args, stops, seed=args.seed))
    policy.train()
    if max(score(probe)) > 0:
        return
    print(
        f"[rlkit] the untrained policy earned no reward on {len(probe)} prompts: SFT warm-start for "
        f"{args.sft_warmup_steps} steps on the training labels (\\boxed{{label}})",
        flush=True,
    )
    sft_optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(args.sft_warmup_steps):
        prompts = dataset.next_batch(32)
        answers = [tokenizer.encode(f"\\boxed{{{s.label}}}") + [stops[-1]] for s in prompts]
        loss = answer_sft_loss(policy, [s.tokens for s in prompts], answers, pad_id=tokenizer.pad_token_id or 0)
        loss.backward()
        sft_optimizer.step()
        sft_optimizer.zero_grad(set_to_none=True)
    print(f"[rlkit] SFT warm-start done, final loss {float(loss.detach()):.3f}", flush=True)


# ----------------------------------------------------------------------------------------------------
# 3. Rollout: sampling, one rollout step (over-sampling, filter, partial rollouts), graded samples, advantages.
# ----------------------------------------------------------------------------------------------------


def sampling_params(args, stops, *, seed, eval_set: bool = False) -> SamplingParams:
    """The ``--rollout-*`` sampling; for an eval set, ``--eval-temperature / -top-p / -max-response-len`` if set."""
    temperature, top_p, max_new_tokens = args.rollout_temperature, args.rollout_top_p, args.rollout_max_response_len
    if eval_set:
        temperature = args.eval_temperature if args.eval_temperature is not None else temperature
        top_p = args.eval_top_p if args.eval_top_p is not None else top_p
        max_new_tokens = args.eval_max_response_len or max_new_tokens
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=args.rollout_top_k,
                          max_new_tokens=max_new_tokens, stop_token_ids=stops, seed=seed)  # fmt: skip


def make_rollout_fn(args, engine, dataset, score, stops, buffer):
    """``rollout_id -> (groups, metrics)``: one rollout step (over-sampling, filter, partial rollouts)."""
    config = RolloutConfig(
        rollout_batch_size=args.rollout_batch_size,
        n_samples_per_prompt=args.n_samples_per_prompt,
        over_sampling_batch_size=args.over_sampling_batch_size,
        partial_rollout=args.partial_rollout,
    )
    dynamic_filter = get_dynamic_filter(args.dynamic_sampling_filter_path)

    def do_rollout(rollout_id):
        return rollout_step(
            engine=engine,
            prompt_source=dataset.next_batch,
            reward_fn=score,
            sampling=sampling_params(args, stops, seed=args.seed * 100_003 + rollout_id),
            config=config,
            rollout_id=rollout_id,
            dynamic_filter=dynamic_filter,
            buffer=buffer if args.partial_rollout else None,
            show_progress=sys.stderr.isatty(),  # a bar per rollout on a terminal, none in logs
        )

    return do_rollout


def graded_samples(args, groups, rollout_id) -> tuple[list[Sample], torch.Tensor, dict[str, int]]:
    """Flatten a rollout, report reward failures, and put the advantages on every sample (metadata)."""
    samples = flatten_groups(groups)
    reward_errors = count_reward_errors(samples)
    if any(reward_errors.values()):  # graded as failures, never a crash; say so and why
        first = next(s.metadata["reward_error"] for s in samples if s.metadata.get("reward_error"))
        print(f"[rlkit] rollout {rollout_id}: reward failures {reward_errors} (scored 0), e.g. {first}", flush=True)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    for s, adv in zip(samples, estimate_advantages(args, rewards).tolist(), strict=True):
        s.metadata["advantages"] = [adv] * s.response_length
        s.metadata["rollout_log_probs"] = s.rollout_log_probs
    return samples, rewards, reward_errors


def estimate_advantages(args, rewards: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages ``[B]`` from rewards ``[B]`` (groups of ``n_samples_per_prompt``)."""
    estimator = get_advantage_estimator(args.advantage_estimator)
    kwargs = {"normalize_std": not args.disable_grpo_std_normalization} if args.advantage_estimator == "grpo" else {}
    return estimator(rewards, n_samples_per_prompt=args.n_samples_per_prompt, **kwargs)


# ----------------------------------------------------------------------------------------------------
# 4. Training on one global batch: packed micro-batches, exact global normalizer.
# ----------------------------------------------------------------------------------------------------


def train_step(model, optimizer, samples, packer, loss_config, args, *, pad_id) -> dict[str, float]:
    """One optimizer step over one global batch (exact under any packing, see rlkit.parallel.hf)."""
    metrics = accumulate_policy_gradients(model, samples, packer, loss_config, pad_id=pad_id,
                                          temperature=args.rollout_temperature,
                                          max_response_len=args.rollout_max_response_len)  # fmt: skip
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics | {"grad_norm": float(grad_norm)}


# ----------------------------------------------------------------------------------------------------
# 5. Eval, the per-rollout record, checkpoints.
# ----------------------------------------------------------------------------------------------------


def evaluate(engine, eval_sets, score, *, rollout_id) -> dict[str, float]:
    metrics, _ = eval_step(engine=engine, datasets=eval_sets, reward_fn=score)
    return {"rollout_id": rollout_id, **metrics} if rollout_id == 0 else metrics


def rollout_record(rollout_id, groups, samples, rewards, reward_errors, rollout_metrics, step_metrics, *, elapsed, lr):
    """The flat per-rollout record of ``metrics.jsonl`` (and of the console line)."""
    record = {
        "rollout_id": rollout_id,
        "reward": float(rewards.mean()),
        "time_s": elapsed,
        "tokens_per_s": sum(len(s.tokens) for s in samples) / elapsed,
        "lr": lr,
        "prompts": [g[0].prompt for g in groups],
    }
    record |= {k: v for k, v in rollout_metrics.items() if k.startswith("rollout/num_groups")} | step_metrics
    return record | {f"reward/{kind}s": float(n) for kind, n in reward_errors.items()}


def save(args, policy, optimizer, scheduler, dataset, buffer, history, tokenizer, next_rollout_id, in_flight):
    """rlkit's training state (weights, AdamW, loop and RNG state; ``in_flight``: the rollout made ahead)."""
    loop_state = dict(next_rollout_id=next_rollout_id, scheduler=scheduler.state_dict(), dataset=dataset.state_dict(),
                      history=history, buffer=buffer.state_dict(), **in_flight)  # fmt: skip
    path = save_training_state(
        args.save,
        step=next_rollout_id,
        model_state=policy.state_dict(),
        optimizer_state=optimizer.state_dict(),
        loop_state=loop_state,
        rng_state=capture_rng_state(),
        keep_last=2,
    )
    if args.save_hf:
        policy.save_pretrained(path / "hf", safe_serialization=True)
        tokenizer.save_pretrained(path / "hf")


# ----------------------------------------------------------------------------------------------------
# 6. The loop.
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.backend == "megatron":  # the megatron-core half of this loop, a sibling file
        import grpo_megatron

        return grpo_megatron.main(args)
    if args.embedded_default:
        print(
            "[rlkit] no --hf-checkpoint: running the EMBEDDED DEFAULT (a tiny Qwen3-architecture model, a char "
            "tokenizer and the bundled single-digit addition set, all built locally)",
            flush=True,
        )
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, policy = build_tokenizer_and_policy(args, device)
    pad_id, stops = tokenizer.pad_token_id or 0, stop_token_ids(tokenizer)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(args))
    dataset, score = build_dataset(args, tokenizer), build_scorer(args)
    eval_sets = build_eval_sets(args, tokenizer, stops)
    packer = build_packer(args)
    buffer = PartialRolloutBuffer(get_buffer_filter(args.buffer_filter_path))
    start_rollout, history, prefetched = 0, [], None
    if args.load:
        state = load_training_state(args.load)
        policy.load_state_dict(state.model_state)
        optimizer.load_state_dict(state.optimizer_state)
        scheduler.load_state_dict(state.loop_state["scheduler"])
        dataset.load_state_dict(state.loop_state["dataset"])
        buffer.load_state_dict(state.loop_state["buffer"])
        start_rollout, history = state.loop_state["next_rollout_id"], state.loop_state["history"]
        prefetched = RolloutPrefetcher.resumed_rollout(state.loop_state)
        restore_rng_state(state.rng_state)
        print(f"[rlkit] resumed from {state.path} at rollout {start_rollout}", flush=True)
    else:
        warm_start_if_needed(args, policy, dataset, tokenizer, score, stops)
    loss_config = build_loss_config(args)
    # Only for a non-zero coefficient; slime builds it (and logs kl_loss) whenever --use-kl-loss is set.
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if loss_config.use_kl_loss else None
    engine = build_engine(args, policy, tokenizer, output_dir)
    where = f"its own process (pid {engine.process.pid})" if isinstance(engine, ProcessEngine) else "this process"
    print(f"[rlkit] rollout engine: {type(engine).__name__} in {where}", flush=True)
    engine.update_weights(policy.state_dict())
    metrics_file = open(output_dir / "metrics.jsonl", "a")
    if start_rollout == 0 and eval_sets:
        history.append(evaluate(engine, eval_sets, score, rollout_id=0))
        print(format_metrics_line(history[-1]), flush=True)
    # --async: a thread generates rollout k+1 (with the weights before step k's update) while this one trains on k
    do_rollout = make_rollout_fn(args, engine, dataset, score, stops, buffer)
    rollouts = RolloutPrefetcher(do_rollout, num_rollout=args.num_rollout, async_mode=args.async_mode,
                                 resumed=prefetched)  # fmt: skip
    for rollout_id in range(start_rollout, args.num_rollout):
        t0 = time.perf_counter()
        groups, metrics = rollouts.get(rollout_id)
        samples, rewards, reward_errors = graded_samples(args, groups, rollout_id)
        if args.num_steps_per_rollout > 1 or args.async_mode or args.use_tis:
            # the policy that generated is not the one being trained: recompute its log-probs once
            store_response_logprobs(
                policy, samples, packer, "old_log_probs", pad_id=pad_id, temperature=args.rollout_temperature
            )
        if reference is not None:
            store_response_logprobs(
                reference, samples, packer, "ref_log_probs", pad_id=pad_id, temperature=args.rollout_temperature
            )
        step_metrics: dict[str, float] = {}
        for k in range(args.num_steps_per_rollout):
            batch = samples[k * args.global_batch_size : (k + 1) * args.global_batch_size]
            for name, value in train_step(policy, optimizer, batch, packer, loss_config, args, pad_id=pad_id).items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value / args.num_steps_per_rollout
            scheduler.step()
        # weight sync; with --async the engine's lock makes this wait for the in-flight generation
        engine.update_weights(policy.state_dict())
        elapsed, lr = time.perf_counter() - t0, scheduler.get_last_lr()[0]
        record = rollout_record(rollout_id, groups, samples, rewards, reward_errors, metrics, step_metrics,
                                elapsed=elapsed, lr=lr)  # fmt: skip
        if eval_sets and args.eval_interval and (rollout_id + 1) % args.eval_interval == 0:
            record |= evaluate(engine, eval_sets, score, rollout_id=rollout_id + 1)
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        print(format_metrics_line(record), flush=True)
        if args.save and args.save_interval and (rollout_id + 1) % args.save_interval == 0:
            # the rollout in flight has taken its prompts from the dataset: it is saved with the state
            save(args, policy, optimizer, scheduler, dataset, buffer, history, tokenizer, rollout_id + 1,
                 rollouts.in_flight_state())  # fmt: skip
    rollouts.close()
    if hasattr(engine, "close"):
        engine.close()
    summary = summarize_history(history)
    print("[rlkit] " + json.dumps(summary), flush=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_plot:
        wrote = plot_history(history, output_dir / "progress.png")
        print(f"[rlkit] wrote {output_dir / 'progress.png'}" if wrote else '[rlkit] no plot: pip install "rlkit[plot]"')


if __name__ == "__main__":
    main(sys.argv[1:])
