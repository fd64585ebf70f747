#!/usr/bin/env bash
# Issue 14, run 5: the settings `tune` found on the GPU (pipeline depth 2, queue delay 3000 us;
# 2 instances for full-length requests, 3 for the mix) against today's defaults, in one run.
# From the repository root on the GPU machine, wheels in .whl/ (see benchmarks/RESULTS.md):
#   benchmarks/gpu/run_issue14_tuned.sh OUT_DIR TAG
# Since run 16, served.py writes a pipelined model's blocking waits as the generator does (the
# runs before it spun unless a variant said "blocking_sync": true); add
# "engine_options":{"blocking_sync":false} to a variant to repeat an earlier run exactly.
set -euo pipefail
OUT=${1:?output folder}; TAG=${2:-run}
V='{"name":"before_i3_qd100","instances":3}'
V+=',{"name":"pipe_i2_d2_qd3000","instances":2,"pipeline_depth":2,"max_queue_delay_us":3000}'
V+=',{"name":"pipe_i3_d2_qd3000","instances":3,"pipeline_depth":2,"max_queue_delay_us":3000}'
benchmarks/gpu/run_gpu.sh --parts server --train-steps 0 --engine '{"dtype":"bf16","gelu":"tanh_fused"}' \
  --budget-s 200 --server-config "{\"slo_ms\":30,\"fixed_levels\":[1,64],\"mix_levels\":[64],\"pad_instances\":[],\"server_variants\":[$V]}" \
  --out "$OUT/gpu_issue14_${TAG}.json"
