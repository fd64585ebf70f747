#!/usr/bin/env bash
# Issue 14, host/GPU overlap: model.py's pipeline_depth (execute() returns once its batch is
# queued on the GPU; a second thread answers through Triton's response senders, sent from a pool
# of threads) against today's serving configuration, side by side in one run. First the GPU
# tests of the queued path (each batch's answers equal the blocking path's). On a host with two
# GPUs, then one GPU against two at twice the load, for today's config and the pipelined one.
# From the repository root on the GPU machine, wheels in .whl/ (see benchmarks/RESULTS.md):
#   benchmarks/gpu/run_issue14_pipeline.sh OUT_DIR TAG
# Since run 16, served.py writes a pipelined model's blocking waits as the generator does (the
# runs before it spun unless a variant said "blocking_sync": true); add
# "engine_options":{"blocking_sync":false} to a variant to repeat an earlier run exactly.
set -euo pipefail
OUT=${1:?output folder}; TAG=${2:-run}
ENGINE='{"dtype":"bf16","gelu":"tanh_fused"}'
PYTHONPATH=. python3 -m pytest -q -m gpu -p no:cacheprovider algorithm/serving/tests/test_gpu.py \
  -k "queued_back_to_back or matches_reference or runner_requests" 2>&1 | tail -5 | tee "$OUT/gpu_issue14_${TAG}_tests.txt"
COMMON='"slo_ms":30,"fixed_levels":[1,64],"mix_levels":[64],"pad_instances":[]'
V='{"name":"before_i3_qd100","instances":3}'
V+=',{"name":"pipe_i1_d2","instances":1,"pipeline_depth":2}'
V+=',{"name":"pipe_i2_d2","instances":2,"pipeline_depth":2}'
V+=',{"name":"pipe_i1_d3","instances":1,"pipeline_depth":3}'
benchmarks/gpu/run_gpu.sh --parts server --train-steps 0 --engine "$ENGINE" --budget-s ${BUDGET_S:-280} \
  --server-config "{$COMMON,\"server_variants\":[$V]}" --out "$OUT/gpu_issue14_${TAG}.json"
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  SC='"slo_ms":30,"scaling_fixed_levels":[64],"scaling_mix_levels":[64]'
  benchmarks/gpu/run_gpu.sh --parts scaling --train-steps 0 --engine "$ENGINE" --budget-s 150 \
    --server-config "{$SC,\"scaling_instances\":[3]}" --out "$OUT/gpu_issue14_${TAG}_scaling_before.json"
  benchmarks/gpu/run_gpu.sh --parts scaling --train-steps 0 --engine "$ENGINE" --budget-s 150 \
    --server-config "{$SC,\"scaling_instances\":[${PIPE_INSTANCES:-2}],\"pipeline_depth\":2}" \
    --out "$OUT/gpu_issue14_${TAG}_scaling_pipelined.json"
fi
