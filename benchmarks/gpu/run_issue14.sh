#!/usr/bin/env bash
# Issue 14 on one GPU: today's serving configuration against batching settings, then the same
# settings with the CUDA MPS daemon running (the python-backend instances are separate processes
# with separate CUDA contexts: without MPS they time-slice the GPU, with MPS their kernels share it).
# From the repository root on the GPU machine, wheels in .whl/ (see benchmarks/RESULTS.md):
#   benchmarks/gpu/run_issue14.sh OUT_DIR TAG
set -euo pipefail
OUT=${1:?output folder}; TAG=${2:-run}
ENGINE='{"dtype":"bf16","gelu":"tanh_fused"}'
COMMON='"slo_ms":30,"fixed_levels":[1,64],"mix_levels":[64],"pad_instances":[]'
V_PLAIN='{"name":"before_i3_qd100","instances":3},{"name":"i2_qd3000_p32","instances":2,"max_queue_delay_us":3000,"preferred":[32,48,64]}'
V_MPS='{"name":"mps_i2_qd3000_p32","instances":2,"max_queue_delay_us":3000,"preferred":[32,48,64]},{"name":"mps_i3_qd3000_p32","instances":3,"max_queue_delay_us":3000,"preferred":[32,48,64]},{"name":"mps_i4_qd3000_p32","instances":4,"max_queue_delay_us":3000,"preferred":[32,48,64]},{"name":"mps_i3_qd1000_p16","instances":3,"max_queue_delay_us":1000,"preferred":[16,32,48,64]}'
benchmarks/gpu/run_gpu.sh --parts server --train-steps 0 --engine "$ENGINE" --budget-s 200 \
  --server-config "{$COMMON,\"server_variants\":[$V_PLAIN]}" --out "$OUT/gpu_issue14_${TAG}_plain.json"
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && echo "MPS daemon started"
  trap 'echo quit | nvidia-cuda-mps-control || true' EXIT
  benchmarks/gpu/run_gpu.sh --parts server --train-steps 0 --engine "$ENGINE" --budget-s 330 \
    --server-config "{$COMMON,\"mps\":true,\"server_variants\":[$V_MPS]}" --out "$OUT/gpu_issue14_${TAG}_mps.json"
  echo "MPS servers seen after the run:"; echo get_server_list | nvidia-cuda-mps-control || true
  tail -5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null || true
else
  echo "nvidia-cuda-mps-control is not on this machine: no MPS run"
fi
