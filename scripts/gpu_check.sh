#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU, torch and Triton but no vLLM:
# the torch-only runtime tests on CUDA (sync-free steps under torch's sync debug
# mode, a captured PP step replayed against eager, the kept-head attention kernel
# compiled, a history checkpoint copied on a side stream), then the per-step and
# kept-head attention benchmarks. Everything it writes goes to $OUT (default
# benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_check_device.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider --device cuda \
  tests/test_capturable.py tests/test_packed_execution.py tests/test_paged_attention.py \
  tests/test_history_checkpoints.py::test_a_round_is_copied_without_waiting_for_the_device \
  2>&1 | tee "$OUT/gpu_check_tests.txt" | tail -5
python3 benchmarks/gpu_step.py --out "$OUT/gpu_step_cuda_7b.json" 2> "$OUT/gpu_step_cuda_7b.log" | tail -1
python3 benchmarks/kept_head_attention.py --out "$OUT/kept_head_attention_cuda.json" \
  2> "$OUT/kept_head_attention_cuda.log" | tail -1
