#!/usr/bin/env bash
# One device call's worth of GPU checks for the megatron backend (issue 10), dense and MoE.
#
#   bash benchmarks/gpu_check.sh tests   # every GPU test (~150 s on an H100)
#   bash benchmarks/gpu_check.sh step8k  # megatron_step at 8192 tokens/GPU: compiled vs module path vs HF, with and
#                                        # without full recompute (~300 s)
#   bash benchmarks/gpu_check.sh step16k # the same at 16384 without HF (~250 s), then grouped experts (~20 s)
#   bash benchmarks/gpu_check.sh moe     # 4 Qwen3-30B-A3B layers (128 experts): grouped-GEMM experts vs megatron's
#                                        # loop vs HF, with and without full recompute, then the grouped GPU test
#   bash benchmarks/gpu_check.sh tp2     # 2 GPUs: the Qwen3-4B seed's TP2 + SP layout, compiled vs module path,
#                                        # then the 2-GPU parity script
#
# Run from the repository root with the wheels of .whl/ installed (see docs/megatron-backend.md); results go to
# $OUT (or ./gpu_check_out). Each part fits one 600 s device call; record what you quote in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
case "${1:-}" in
  tests)
    python3 -m pytest -q -m "gpu or multigpu" tests 2>&1 | tail -30
    ;;
  step8k)
    (cd benchmarks && python3 megatron_step.py --configs 8192:none 8192:full \
      --paths megatron_thd megatron_thd_modules hf_padded --steps 5 --out "$out/step8k.json" 2>&1 | grep -v Warning)
    ;;
  step16k)
    (cd benchmarks && python3 megatron_step.py --configs 16384:none 16384:full \
      --paths megatron_thd megatron_thd_modules --steps 3 --out "$out/step16k.json" 2>&1 | grep -v Warning)
    python3 benchmarks/grouped_experts.py --out "$out/grouped_experts.json"
    ;;
  moe)
    (cd benchmarks && python3 megatron_step.py --shape qwen3-30b-a3b-4l --configs 8192:none 8192:full \
      --paths megatron_thd megatron_thd_loop_experts hf_padded --steps 3 --out "$out/moe8k.json" 2>&1 | grep -v Warning)
    python3 -m pytest -q -s -m gpu tests/parallel/megatron/test_grouped_experts.py 2>&1 | tail -12
    ;;
  tp2)
    (cd benchmarks && python3 -m torch.distributed.run --standalone --nproc-per-node 2 megatron_step.py \
      --shape qwen3-4b --tp 2 --sequence-parallel --configs 9216:full --paths megatron_thd megatron_thd_modules \
      --steps 3 --out "$out/tp2_sp.json" 2>&1 | grep -v Warning)
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/megatron_mp_parity.py \
      --out "$out/mp_parity.json" 2>&1 | grep -v Warning | tail -20
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh tests|step8k|step16k|moe|tp2" >&2
    exit 2
    ;;
esac
