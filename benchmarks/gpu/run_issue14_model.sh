#!/usr/bin/env bash
# Issue 14, runs 25-26 (SET=run25|run26): the model alone (benchmarks/gpu/model_alone.py),
# before and after in one run on one card, after the GPU tests.
#   run25: EngineConfig.decoder_tables (layer 0's first two beam steps from tables) and
#          sync_free_positions (small device inputs packed on the device, no host round trip)
#          off, then each on; sync_free_1024 also takes 1 x 1024 without the round trip.
#   run26: the same after the sync-free layout lost its spare slot (the padding positions sit
#          outside every slot: the decoder runs B users, not B + 1)
# From the repository root on the GPU machine, wheels in .whl/ (see benchmarks/RESULTS.md):
#   benchmarks/gpu/run_issue14_model.sh OUT_DIR TAG
set -euo pipefail
OUT=${1:?output folder}; TAG=${2:-run}
E='"dtype":"bf16","gelu":"tanh_fused"'
case "${SET:-run25}" in
  run25)
    V="{\"before\":{$E,\"sync_free_positions\":0,\"decoder_tables\":false}"
    V+=",\"tables\":{$E,\"sync_free_positions\":0}"
    V+=",\"tables_sync_free\":{$E}"
    V+=",\"sync_free_1024\":{$E,\"sync_free_positions\":1024}}"
    ;;
  run26)
    V="{\"before\":{$E,\"sync_free_positions\":0,\"decoder_tables\":false}"
    V+=",\"tables\":{$E,\"sync_free_positions\":0}"
    V+=",\"tables_sync_free\":{$E}}"
    ;;
  *) echo "unknown SET=$SET" >&2; exit 2 ;;
esac
if [ "${TESTS:-1}" = 1 ]; then
  PYTHONPATH=. timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider algorithm/serving/tests/test_gpu.py \
    2>&1 | tail -25 | tee "$OUT/gpu_issue14_${TAG}_tests.txt" || true
fi
GPU_SCRIPT=benchmarks/gpu/model_alone.py benchmarks/gpu/run_gpu.sh --out "$OUT/gpu_issue14_${TAG}_model.json" \
  --rounds "${ROUNDS:-5}" --breakdown --no-pieces --variants "$V" 2>&1 | tee "$OUT/gpu_issue14_${TAG}_model.log"
