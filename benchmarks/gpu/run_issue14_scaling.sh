#!/usr/bin/env bash
# Issue 14, two GPUs of one host: one GPU at 64 concurrent requests against both at 128, for
# today's configuration (3 instances per GPU, 100 us queue delay) and run 5's tuned pick (2
# instances per GPU, pipeline depth 2, 3000 us), full-length requests and the log-normal mix.
# From the repository root on a 2-GPU machine, wheels in .whl/ (see benchmarks/RESULTS.md):
#   benchmarks/gpu/run_issue14_scaling.sh OUT_DIR TAG      (ONLY=tuned: the tuned pick alone)
# Since run 16, served.py writes a pipelined model's blocking waits as the generator does (the
# runs before it spun unless a variant said "blocking_sync": true); add
# "engine_options":{"blocking_sync":false} to a variant to repeat an earlier run exactly.
set -euo pipefail
OUT=${1:?output folder}; TAG=${2:-run}
ENGINE='{"dtype":"bf16","gelu":"tanh_fused"}'
SC='"slo_ms":30,"scaling_fixed_levels":[64],"scaling_mix_levels":[64]'
[ "${ONLY:-}" = tuned ] || benchmarks/gpu/run_gpu.sh --parts scaling --train-steps 0 --engine "$ENGINE" --budget-s 150 \
  --server-config "{$SC,\"scaling_instances\":[3]}" --out "$OUT/gpu_issue14_${TAG}_scaling_before.json" \
  2>&1 | tee "$OUT/gpu_issue14_${TAG}_scaling_before.log" | grep -E "req/s|two_over|error" | tail -8
benchmarks/gpu/run_gpu.sh --parts scaling --train-steps 0 --engine "$ENGINE" --budget-s 150 \
  --server-config "{$SC,\"scaling_instances\":[2],\"pipeline_depth\":2,\"max_queue_delay_us\":3000}" \
  --out "$OUT/gpu_issue14_${TAG}_scaling_tuned.json" \
  2>&1 | tee "$OUT/gpu_issue14_${TAG}_scaling_tuned.log" | grep -E "req/s|two_over|error" | tail -8
