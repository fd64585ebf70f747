#!/usr/bin/env bash
# Issue 14, runs 6, 7, 9, 10, 11, 13-15, 17-20, 23, 26 (SET=run6|run7|run10|run11|run12|run14|run15|run17|run18|run19|run20|run23|run26): continuous batching (model.py's continuous_batching: execute() returns at once,
# the pipeline queues on the GPU everything left with it whenever a slot frees, no queue delay)
# against today's defaults and run 5's tuned pick, side by side in one run; then the GPU tests.
# From the repository root on the GPU machine, wheels in .whl/ (see benchmarks/RESULTS.md):
#   benchmarks/gpu/run_issue14_continuous.sh OUT_DIR TAG
set -euo pipefail
OUT=${1:?output folder}; TAG=${2:-run}
ENGINE='{"dtype":"bf16","gelu":"tanh_fused"}'
COMMON='"slo_ms":30,"fixed_levels":[1,64],"mix_levels":[64],"pad_instances":[]'
V='{"name":"before_i3_qd100","instances":3}'
C='"pipeline_depth":1,"continuous_batching":true,"max_queue_delay_us":0'
# runs 6-11 ran before served.py wrote a pipelined model's blocking waits (as the generator
# does): their variants without $B spun, so they say so here
S='"engine_options":{"blocking_sync":false}'
# runs 18-19: the blocking pipe (2 instances, depth 2, 3000 us) with an engine option off, then
# on, twice in turn: ab_pairs NAME OPTION
ab_pairs() {
  local P='"instances":2,"pipeline_depth":2,"max_queue_delay_us":3000' V='' R F
  for R in 1 2; do
    for F in false true; do
      V+="${V:+,}{\"name\":\"pipe_block_$1_${F}_${R}\",$P,\"engine_options\":{\"blocking_sync\":true,\"$2\":$F}}"
    done
  done
  echo "$V"
}
if [ "${SET:-run7}" = run6 ]; then  # run 6: continuous batching, Python's GIL switch interval
  V+=',{"name":"pipe_i2_d2_qd3000","instances":2,"pipeline_depth":2,"max_queue_delay_us":3000,"engine_options":{"blocking_sync":false}}'
  V+=",{\"name\":\"cont_i1_d1\",\"instances\":1,$C,$S}"
  V+=",{\"name\":\"cont_i2_d1\",\"instances\":2,$C,$S}"
  V+=',{"name":"cont_i1_d2","instances":1,"pipeline_depth":2,"continuous_batching":true,"max_queue_delay_us":0,"engine_options":{"blocking_sync":false}}'
elif [ "${SET:-run7}" = run10 ]; then  # run 10: where the launch's time goes; blocking CUDA waits
  B='"engine_options":{"blocking_sync":true}'
  V+=',{"name":"pipe_i2_d2_qd3000","instances":2,"pipeline_depth":2,"max_queue_delay_us":3000,"engine_options":{"blocking_sync":false}}'
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
  V+=",{\"name\":\"cont_i1_d1\",\"instances\":1,$C,$S}"
  V+=",{\"name\":\"cont_i1_d1_block\",\"instances\":1,$C,$B}"
elif [ "${SET:-run7}" = run11 ]; then  # run 11: run 10's blocking waits again (a repeat)
  B='"engine_options":{"blocking_sync":true}'
  V+=',{"name":"pipe_i2_d2_qd3000","instances":2,"pipeline_depth":2,"max_queue_delay_us":3000,"engine_options":{"blocking_sync":false}}'
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
  V+=",{\"name\":\"cont_i1_d1_block\",\"instances\":1,$C,$B}"
elif [ "${SET:-run7}" = run12 ]; then  # run 12: the engine's residual_gemm (now its default)
  # against the engine before it (residual_gemm false), in run 11's configurations and two more
  B='"engine_options":{"blocking_sync":true}'
  OLD='"engine_options":{"blocking_sync":true,"residual_gemm":false}'
  V='{"name":"before_i3_qd100_old_engine","instances":3,"engine_options":{"residual_gemm":false}}'
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block_old_engine\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$OLD}"
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
  V+=",{\"name\":\"pipe_i2_d1_qd3000_block\",\"instances\":2,\"pipeline_depth\":1,\"max_queue_delay_us\":3000,$B}"
  V+=",{\"name\":\"cont_i1_d1_block\",\"instances\":1,$C,$B}"
  V+=",{\"name\":\"cont_i2_d1_block\",\"instances\":2,$C,$B}"
elif [ "${SET:-run7}" = run14 ]; then  # run 14: run 13 again (were its pipelined points the
  # machine?), and the pipeline with spinning waits beside blocking ones, all on one machine
  B='"engine_options":{"blocking_sync":true}'
  OLD='"engine_options":{"blocking_sync":true,"residual_gemm":false}'
  V='{"name":"before_i3_qd100_old_engine","instances":3,"engine_options":{"residual_gemm":false}}'
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block_old_engine\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$OLD}"
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
  V+=',{"name":"pipe_i2_d2_qd3000_spin","instances":2,"pipeline_depth":2,"max_queue_delay_us":3000,"engine_options":{"blocking_sync":false}}'
  V+=",{\"name\":\"cont_i1_d1_block\",\"instances\":1,$C,$B}"
elif [ "${SET:-run7}" = run15 ]; then  # run 15: run 14 without the spinning waits, with the
  # host's speed recorded at every point (served.py's host_check)
  B='"engine_options":{"blocking_sync":true}'
  OLD='"engine_options":{"blocking_sync":true,"residual_gemm":false}'
  V='{"name":"before_i3_qd100_old_engine","instances":3,"engine_options":{"residual_gemm":false}}'
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block_old_engine\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$OLD}"
  V+=",{\"name\":\"pipe_i2_d2_qd3000_block\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
  V+=",{\"name\":\"cont_i1_d1_block\",\"instances\":1,$C,$B}"
elif [ "${SET:-run7}" = run17 ]; then  # run 17: the mix alone (its 15 ms goal): the queue delay
  # of the blocking pipe, and 3 instances with run 5's H200 mix setting
  COMMON='"slo_ms":30,"fixed_levels":[],"mix_levels":[64],"pad_instances":[]'
  B='"engine_options":{"blocking_sync":true}'
  V='{"name":"i3_qd3000","instances":3,"max_queue_delay_us":3000}'
  for QD in 3000 2000 1000; do
    V+=",{\"name\":\"pipe_i2_d2_qd${QD}_block\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":$QD,$B}"
  done
elif [ "${SET:-run7}" = run18 ]; then  # run 18: the fused beam kernels (EngineConfig.fused_topk)
  # served, before and after, twice in turn: the blocking pipe at full length and on the mix
  COMMON='"slo_ms":30,"fixed_levels":[64],"mix_levels":[64],"pad_instances":[]'
  V=$(ab_pairs topk fused_topk)
elif [ "${SET:-run7}" = run19 ]; then  # run 19: the mix's eager batches (EngineConfig.round_up_users:
  # a batch no warmed graph of its users bucket fits takes a larger users bucket's), twice in turn
  COMMON='"slo_ms":30,"fixed_levels":[],"mix_levels":[64],"pad_instances":[]'
  V=$(ab_pairs users round_up_users)
elif [ "${SET:-run7}" = run20 ]; then  # run 20: the goals' points with runs 18-19's engine, twice;
  # and the mix's queue delay one step longer
  COMMON='"slo_ms":30,"fixed_levels":[1,64],"mix_levels":[64],"pad_instances":[]'
  B='"engine_options":{"blocking_sync":true}'
  V="{\"name\":\"pipe_block_qd3000_1\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
  V+=",{\"name\":\"pipe_block_qd4000\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":4000,$B}"
  V+=",{\"name\":\"pipe_block_qd3000_2\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$B}"
elif [ "${SET:-run7}" = run23 ]; then  # run 23: continuous batching (the lone request's goal) with
  # runs 18-21's engine, beside today's default
  COMMON='"slo_ms":30,"fixed_levels":[1,64],"mix_levels":[64],"pad_instances":[]'
  B='"engine_options":{"blocking_sync":true}'
  V+=",{\"name\":\"cont_i1_d1_block\",\"instances\":1,$C,$B}"
elif [ "${SET:-run7}" = run26 ]; then  # run 26: EngineConfig.decoder_tables (layer 0 of the
  # first two beam steps from tables), off then on, twice in turn, at the goals' three points
  COMMON='"slo_ms":30,"fixed_levels":[1,64],"mix_levels":[64],"pad_instances":[]'
  V=$(ab_pairs tables decoder_tables)
else  # run 7: the same with a 100 us GIL switch interval (run 6's launch waited for the GIL)
  G='"gil_switch_interval_us":100'
  V+=",{\"name\":\"pipe_i2_d2_qd3000_gil100\",\"instances\":2,\"pipeline_depth\":2,\"max_queue_delay_us\":3000,$G,$S}"
  V+=",{\"name\":\"cont_i1_d1\",\"instances\":1,$C,$S}"
  V+=",{\"name\":\"cont_i1_d1_gil100\",\"instances\":1,$C,$G,$S}"
  V+=",{\"name\":\"cont_i2_d1_gil100\",\"instances\":2,$C,$G,$S}"
  V+=",{\"name\":\"cont_i1_d2_gil100\",\"instances\":1,\"pipeline_depth\":2,\"continuous_batching\":true,\"max_queue_delay_us\":0,$G,$S}"
fi
benchmarks/gpu/run_gpu.sh --parts server --train-steps 0 --engine "$ENGINE" --budget-s ${BUDGET_S:-330} \
  --server-config "{$COMMON,\"server_variants\":[$V]}" --out "$OUT/gpu_issue14_${TAG}.json" \
  2>&1 | tee "$OUT/gpu_issue14_${TAG}.log"
if [ "${TESTS:-1}" = 1 ]; then
  PYTHONPATH=. timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider algorithm/serving/tests/test_gpu.py \
    2>&1 | tail -25 | tee "$OUT/gpu_issue14_${TAG}_tests.txt"
fi
