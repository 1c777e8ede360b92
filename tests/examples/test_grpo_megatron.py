"""The recipe's megatron-core backend (examples/grpo_megatron.py) against its HF transformers backend.

Reference: the same recipe with ``--backend hf`` (HF transformers' forward on padded rows, one process) on the same
weights, prompts and sampling seeds. Both backends start from the same tiny Qwen3 and generate with the same embedded
engine, so the first rollout's samples are identical and the first step's loss, gradient norm and entropy must agree
to float32 round-off (different kernels and summation orders: ~1e-7 relative; bound 1e-5). The second rollout is
generated after the weight sync, so its identical rewards and matching step check that the engine received the
trained weights (bound 1e-4: one AdamW step at lr 1e-3 separates the runs' weights by round-off amplified where
|g| ~ sqrt(v)).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'rlkit[megatron]')")

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "grpo_qwen3_4b.py"
SEED_ARGS = [
    tok
    for line in (pathlib.Path(__file__).parent / "seed_002_args.txt").read_text().splitlines()
    if line and not line.startswith("#")
    for tok in shlex.split(line)
]
# A random tiny model earns no math reward (zero advantages); a user reward preferring short answers gives
# non-zero advantages at once. Two optimizer steps per rollout: the first runs at ratio 1, where GRPO's loss is
# ~0 (advantages sum to zero per group), the second at the ratio to the old policy's log-probs (a recomputed
# no-grad pass on both backends), so the rollout's loss, the mean of the two, is a number that can disagree.
RUN = ["--sft-warmup-steps", "0", "--custom-rm-path", "short_reward:shorter_is_better", "--rollout-batch-size", "4",
       "--n-samples-per-prompt", "4", "--num-steps-per-rollout", "2", "--rollout-max-response-len", "8",
       "--use-dynamic-batch-size", "--max-tokens-per-gpu", "64", "--calculate-per-token-loss", "--num-rollout", "2",
       "--eval-interval", "1000", "--n-samples-per-eval-prompt", "1", "--output-dir"]  # fmt: skip
COMPARED = ("loss", "grad_norm", "entropy", "pg_clipfrac")


def _load_recipe():
    spec = importlib.util.spec_from_file_location("grpo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp: pathlib.Path, args: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    (tmp / "short_reward.py").write_text(
        "def shorter_is_better(response, label, *, sample=None):\n    return -float(len(response))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")])
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*launch, str(RECIPE), "--no-plot", *RUN, str(tmp / "out"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _records(tmp: pathlib.Path) -> dict[int, dict]:
    lines = (tmp / "out" / "metrics.jsonl").read_text().splitlines()
    return {r["rollout_id"]: r for r in map(json.loads, lines) if "reward" in r}


def _assert_same_steps(got: dict[int, dict], want: dict[int, dict], *, num_rollout: int = 2) -> None:
    assert sorted(got) == sorted(want) == list(range(num_rollout))
    for rollout_id in range(num_rollout):
        rel = 1e-5 if rollout_id == 0 else 1e-4
        a, b = got[rollout_id], want[rollout_id]
        assert a["prompts"] == b["prompts"] and a["reward"] == b["reward"], rollout_id  # the same samples
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), (rollout_id, key, a[key], b[key])
    assert abs(want[0]["loss"]) > 1e-3 and want[0]["grad_norm"] > 1e-3  # a step that can disagree


@pytest.fixture(scope="module")
def hf_backend(tmp_path_factory) -> tuple[dict[int, dict], pathlib.Path]:
    """The HF backend's records and its HF export after two steps."""
    tmp = tmp_path_factory.mktemp("hf")
    _run(tmp, ["--colocate", "--save", str(tmp / "ckpt"), "--save-interval", "2", "--save-hf"])
    return _records(tmp), tmp / "ckpt" / "step_00000002" / "hf"


def test_one_process_equals_the_hf_backend(tmp_path, hf_backend):
    # decoupled: the engine in its own process, the weights broadcast into it over gloo after each step
    proc = _run(tmp_path, ["--backend", "megatron"])
    assert "megatron backend: 1 process(es), DP1 x TP1 x CP1" in proc.stdout
    assert "rollout engine: ProcessEngine in its own process" in proc.stdout
    assert "reference model" not in proc.stdout  # no KL term: no reference model's memory
    step_line = next(line for line in proc.stdout.splitlines() if line.startswith("rollout    0 | reward"))
    assert all(f"| {key} " in step_line for key in ("loss", "|g|", "tok/s"))
    _assert_same_steps(_records(tmp_path), hf_backend[0])


@pytest.mark.parametrize(
    ("flags", "grid", "engine"),
    [
        # data parallel: each rank its share of the plan, gradients summed over the ranks
        (["--colocate"], "DP2 x TP1 x CP1", "EmbeddedEngine"),
        # tensor + sequence parallel: vocab-parallel log-probs, the weights gathered over TP into rank 0's engine
        (["--colocate", "--tensor-model-parallel-size", "2", "--sequence-parallel"], "DP1 x TP2", "EmbeddedEngine"),
        # pipeline parallel: 1F1B over the two stages; every stage's weights broadcast into rank 0's engine
        (["--colocate", "--pipeline-model-parallel-size", "2"], "DP1 x TP1 x CP1 x PP2", "EmbeddedEngine"),
    ],
    ids=["dp2", "tp2-sp", "pp2"],
)
def test_two_processes_equal_the_hf_backend(tmp_path, hf_backend, flags, grid, engine):
    proc = _run(tmp_path, ["--backend", "megatron", *flags], nproc=2)
    assert f"megatron backend: 2 process(es), {grid}" in proc.stdout and "gloo on cpu" in proc.stdout
    assert f"rollout engine: {engine}" in proc.stdout
    records = _records(tmp_path)
    assert all(r["micro_batches"] >= 1 for r in records.values())
    _assert_same_steps(records, hf_backend[0])


# slime's seed loss terms with a non-zero coefficient: the KL to the reference (low_var_kl), TIS against the engine's
# log-probs, and Dr.GRPO's constant normalizer. The first of the two steps per rollout runs at the reference
# (KL = 0), the second one step away from it, so the rollout's kl_loss is a number that can disagree. --async
# (with the engine in its own process) generates rollout 1 with the weights before rollout 0's update: its TIS
# weights are not all 1, so feeding the old log-probs in place of the engine's would show.
LOSS_TERMS = ["--use-kl-loss", "--kl-loss-coef", "0.5", "--kl-loss-type", "low_var_kl", "--use-tis",
              "--loss-aggregation", "seq_mean_token_sum_norm"]  # fmt: skip
KL_TIS = [*LOSS_TERMS, "--async"]


@pytest.fixture(scope="module")
def hf_backend_kl_tis(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("hf_kl_tis")
    _run(tmp, KL_TIS)
    return _records(tmp)


def _assert_kl_tis_steps(got: dict[int, dict], want: dict[int, dict]) -> None:
    _assert_same_steps(got, want)
    for rollout_id in want:
        rel = 1e-5 if rollout_id == 0 else 1e-4
        for key in ("kl_loss", "tis", "tis_abs", "tis_clipfrac"):
            a, b = got[rollout_id][key], want[rollout_id][key]
            # On-policy (rollout 0) tis_abs = |w - 1| is float32 round-off of two log-prob passes, ~1e-7.
            assert a == pytest.approx(b, rel=rel, abs=1e-6 if key == "tis_abs" else 1e-8), (rollout_id, key, a, b)
    assert want[0]["kl_loss"] > 1e-5 and want[0]["tis"] > 0  # the terms are on, and the KL is not 0
    assert want[1]["tis_abs"] > 1e-3  # one step off-policy: the engine's log-probs differ from the trainer's


def test_kl_tis_seq_norm_one_process_equals_the_hf_backend(tmp_path, hf_backend_kl_tis):
    proc = _run(tmp_path, ["--backend", "megatron", *KL_TIS])
    assert "reference model for the KL loss: the initial weights" in proc.stdout
    _assert_kl_tis_steps(_records(tmp_path), hf_backend_kl_tis)


@pytest.mark.slow
def test_kl_tis_seq_norm_tensor_parallel_equals_the_hf_backend(tmp_path, hf_backend_kl_tis):
    # the reference model is sharded like the policy: its log-probs are vocab-parallel over TP
    flags = ["--backend", "megatron", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    proc = _run(tmp_path, [*flags, *KL_TIS], nproc=2)
    assert "DP1 x TP2" in proc.stdout
    _assert_kl_tis_steps(_records(tmp_path), hf_backend_kl_tis)


def _tiny_qwen3_checkpoint(path: pathlib.Path, *, seed: int) -> pathlib.Path:
    from rlkit.models.tiny import build_char_tokenizer, build_tiny_qwen3

    tokenizer = build_char_tokenizer()
    build_tiny_qwen3(seed=seed, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_kl_reference_from_ref_load(tmp_path):
    # --ref-load of rlkit's DCP export: the export of the policy's own weights is the default reference (the same
    # run to round-off), another model's export is another reference (another KL from the first step on)
    from transformers import AutoModelForCausalLM

    from rlkit.ckpt.torch_dist import hf_to_torch_dist

    def export(model_dir: pathlib.Path, dcp: pathlib.Path) -> str:
        hf = AutoModelForCausalLM.from_pretrained(model_dir)
        hf_to_torch_dist(hf.state_dict(), hf.config.to_dict(), dcp)
        return str(dcp)

    policy = _tiny_qwen3_checkpoint(tmp_path / "policy", seed=0)
    other = _tiny_qwen3_checkpoint(tmp_path / "other", seed=1)
    data = ROOT / "src" / "rlkit" / "data" / "arith_train.jsonl"
    user = ["--hf-checkpoint", str(policy), "--prompt-data", str(data), "--apply-chat-template", "--lr", "1e-3",
            "--backend", "megatron", "--colocate", "--num-rollout", "1", *LOSS_TERMS]  # fmt: skip
    records = {}
    for name, ref_load in [("initial", []), ("same", ["--ref-load", export(policy, tmp_path / "same_dcp")]),
                           ("other", ["--ref-load", export(other, tmp_path / "other_dcp")])]:  # fmt: skip
        run = tmp_path / f"run_{name}"
        run.mkdir()
        proc = _run(run, [*user, *ref_load])
        assert f"reference model for the KL loss: {ref_load[-1] if ref_load else 'the initial weights'}" in proc.stdout
        records[name] = _records(run)[0]
    for key in (*COMPARED, "kl_loss"):
        assert records["same"][key] == pytest.approx(records["initial"][key], rel=1e-6, abs=1e-9), key
    assert records["same"]["reward"] == records["other"]["reward"]  # the same samples, another reference
    assert records["other"]["kl_loss"] > 10 * records["initial"]["kl_loss"] > 0


def test_flags_accepted_and_rejected_per_backend(capsys):
    recipe = _load_recipe()
    hf_args = recipe.build_parser().parse_args(SEED_ARGS)
    megatron_args = recipe.build_parser().parse_args([*SEED_ARGS, "--backend", "megatron"])

    def rejected(args, world_size):
        return sorted(p.split(":")[0].split(" ")[0] for p in recipe.backend_problems(args, world_size=world_size))

    rollout_side = ["--rollout-num-gpus", "--rollout-num-gpus-per-engine", "--sglang-cuda-graph-bs",
                    "--sglang-mem-fraction-static"]  # fmt: skip
    hf_only = ["--actor-num-nodes", "--ref-load", "--sequence-parallel", "--tensor-model-parallel-size"]
    assert rejected(hf_args, 1) == sorted(hf_only + rollout_side)
    # The seed's trainer flags are the megatron backend's: TP2, SP, --ref-load and 8 trainer GPUs (with 8
    # processes) pass; recompute needs CUDA in megatron-core.
    megatron_rejects = [] if torch.cuda.is_available() else ["--recompute-granularity"]
    assert rejected(megatron_args, 8) == sorted(megatron_rejects + rollout_side)
    assert "--actor-num-nodes" in rejected(megatron_args, 2)  # 8 trainer GPUs but 2 processes launched
    assert "--tensor-model-parallel-size" in rejected(megatron_args, 3)  # TP2 does not divide 3 processes

    # megatron-only flags are refused by the HF backend by name; and the HF backend is one process
    extra = ["--use-distributed-optimizer", "--optimizer-cpu-offload"]
    assert rejected(recipe.build_parser().parse_args(extra), 1) == sorted(extra)
    assert rejected(recipe.build_parser().parse_args([]), 2) == ["torchrun"]
    # what the megatron backend cannot run yet is refused by name, with the reason
    unsupported = ["--device", "cpu", "--decoder-first-pipeline-num-layers", "1", "--optimizer-cpu-offload"]
    got = rejected(recipe.build_parser().parse_args(["--backend", "megatron", *unsupported]), 2)
    assert got == sorted(["--device", "--decoder-first-pipeline-num-layers", "--optimizer-cpu-offload"])
    # pipeline parallelism, uneven too (the DeepSeek-R1 seed's --decoder-last-pipeline-num-layers)
    pipeline = ["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "13"]
    assert rejected(recipe.build_parser().parse_args(["--backend", "megatron", *pipeline]), 2) == []
    assert "--decoder-last-pipeline-num-layers" in rejected(recipe.build_parser().parse_args(pipeline), 1)
    # the loss terms of the HF backend are the megatron backend's too (KL to a reference, TIS, Dr.GRPO's norm)
    loss_terms = ["--use-kl-loss", "--kl-loss-coef", "0.01", "--kl-loss-type", "low_var_kl", "--use-tis",
                  "--loss-aggregation", "seq_mean_token_sum_norm"]  # fmt: skip
    assert rejected(recipe.build_parser().parse_args(["--backend", "megatron", *loss_terms]), 2) == []
    # megatron's DistributedOptimizer runs on CUDA, without the recipe's checkpoints
    distributed = recipe.build_parser().parse_args(["--backend", "megatron", "--use-distributed-optimizer"])
    assert rejected(distributed, 2) == ([] if torch.cuda.is_available() else ["--use-distributed-optimizer"])
    distributed.save = "ckpt"
    assert rejected(distributed, 2) == ["--use-distributed-optimizer"] * (1 if torch.cuda.is_available() else 2)
    assert recipe.backend_problems(recipe.build_parser().parse_args(["--backend", "megatron"]), world_size=2) == []
    with pytest.raises(SystemExit):
        recipe.parse_args(["--backend", "megatron", "--optimizer-cpu-offload"])
    assert "--optimizer-cpu-offload: not supported by the megatron backend" in capsys.readouterr().err


@pytest.mark.slow
def test_hf_export_and_resume(tmp_path, hf_backend):
    common = ["--backend", "megatron", "--colocate", "--save", str(tmp_path / "ckpt"), "--save-interval", "1"]
    _run(tmp_path, [*common, "--save-hf"])
    uninterrupted = _records(tmp_path)
    _assert_same_steps(uninterrupted, hf_backend[0])

    # the HF export after two steps is the HF backend's policy after the same two steps (logits; float32 round-off
    # amplified by two AdamW steps, as for the second rollout above)
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "step_00000002" / "hf")(ids).logits
        want = AutoModelForCausalLM.from_pretrained(hf_backend[1])(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # resume from the first checkpoint: rollout 1 again, with the same samples and the same step
    (tmp_path / "out" / "metrics.jsonl").unlink()
    proc = _run(tmp_path, [*common, "--load", str(tmp_path / "ckpt" / "step_00000001")])
    assert "resumed from" in proc.stdout
    resumed = _records(tmp_path)
    assert sorted(resumed) == [1]
    assert resumed[1]["prompts"] == uninterrupted[1]["prompts"] and resumed[1]["reward"] == uninterrupted[1]["reward"]
    for key in COMPARED:
        assert resumed[1][key] == pytest.approx(uninterrupted[1][key], rel=1e-6, abs=1e-9), key


def _tiny_qwen3_moe_checkpoint(path: pathlib.Path) -> pathlib.Path:
    from rlkit.models.tiny import build_char_tokenizer, build_tiny_qwen3_moe

    tokenizer = build_char_tokenizer()
    build_tiny_qwen3_moe(seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_context_parallel_two_processes_equal_the_hf_backend(tmp_path, hf_backend):
    proc = _run(tmp_path, ["--backend", "megatron", "--colocate", "--context-parallel-size", "2"], nproc=2)
    assert "megatron backend: 2 process(es), DP1 x TP1 x CP2" in proc.stdout
    _assert_same_steps(_records(tmp_path), hf_backend[0])


@pytest.mark.slow
def test_expert_parallel_qwen3_moe_two_processes_equal_the_hf_backend(tmp_path):
    # a user checkpoint (Qwen3-MoE, 8 experts, top-2): EP2 spreads the experts over the two data-parallel ranks;
    # the weight sync gathers them over EP and fuses them as the live transformers-5 engine model holds them
    model = _tiny_qwen3_moe_checkpoint(tmp_path / "model")
    data = ROOT / "src" / "rlkit" / "data" / "arith_train.jsonl"
    user = ["--hf-checkpoint", str(model), "--prompt-data", str(data), "--apply-chat-template", "--lr", "1e-3",
            "--colocate"]  # fmt: skip
    (tmp_path / "hf").mkdir()
    (tmp_path / "ep2").mkdir()
    _run(tmp_path / "hf", user)
    proc = _run(tmp_path / "ep2", [*user, "--backend", "megatron", "--expert-model-parallel-size", "2"], nproc=2)
    assert "megatron backend: 2 process(es), DP2 x TP1 x CP1 (EP2)" in proc.stdout
    _assert_same_steps(_records(tmp_path / "ep2"), _records(tmp_path / "hf"))


@pytest.mark.slow
def test_async_two_processes_equal_the_hf_backend_async(tmp_path):
    # --async: rank 0 generates rollout k+1 (with the weights before step k) while both ranks train on k; a
    # checkpoint after every rollout stores the rollout in flight. The HF backend's --async run is the reference.
    flags = ["--async", "--num-rollout", "3", "--lr", "1e-3"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "dp2").mkdir()
    _run(tmp_path / "hf", flags)
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "1"]
    _run(tmp_path / "dp2", [*flags, "--backend", "megatron", *save], nproc=2)
    _assert_same_steps(_records(tmp_path / "dp2"), _records(tmp_path / "hf"), num_rollout=3)
    loop_state = json.loads((tmp_path / "ckpt" / "step_00000002" / "loop_state.json").read_text())
    assert loop_state["prefetched"] is not None  # rollout 2, in flight at the save after rollout 1
    assert json.loads((tmp_path / "ckpt" / "step_00000003" / "loop_state.json").read_text())["prefetched"] is None
