#!/usr/bin/env bash
# Checkpoint -> Triton model repository (guide 8.3): a thin wrapper over `ugt-serving deploy`,
# `validate` and, with --start-server, `serve`.
#
#   MODEL_NAME=ugt_recommend PRECISION=fp16 MAX_BATCH_SIZE=64 \
#   CHECKPOINT_PATH=./checkpoints/ugt.safetensors MODEL_REPOSITORY=./model_repository \
#   ./export.sh [--skip-trt] [--start-server] [-- extra `ugt-serving deploy` options]
#
#   --skip-trt      no TensorRT: serve through the python backend (ONNX Runtime) instead of
#                   tensorrt_plan; the bundled tritonserver runs only python models.
#   --start-server  run the real tritonserver on the repository afterwards (Ctrl-C stops it).
#
# More variables: PLATFORM (default tensorrt_plan, python with --skip-trt), PYTHON_RUNTIME
# (onnxruntime), MAX_SEQ_LENGTH (1024), HTTP_PORT/GRPC_PORT/METRICS_PORT (8000/8001/8002),
# UGT_SERVING (the CLI command; default `ugt-serving`, else `$PYTHON -m algorithm.serving.cli`).
#
# Checked before any work: the checkpoint, a writable repository folder, the optimizer of the
# platform (TensorRT unless --skip-trt) and the instance kind on this host. A re-run with the
# same checkpoint and settings publishes no new version.
set -euo pipefail

# The help is the comment block above (up to the first line that is not a comment).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

SKIP_TRT=0
START_SERVER=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --skip-trt) SKIP_TRT=1 ;;
    --start-server) START_SERVER=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "export.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

MODEL_NAME="${MODEL_NAME:-ugt_recommend}"
PRECISION="${PRECISION:-fp16}"
MAX_BATCH_SIZE="${MAX_BATCH_SIZE:-64}"
MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-1024}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-demo-output/ugt_tiny.safetensors}"
MODEL_REPOSITORY="${MODEL_REPOSITORY:-./model_repository}"
PYTHON_RUNTIME="${PYTHON_RUNTIME:-onnxruntime}"
if [[ -z "${PLATFORM:-}" ]]; then
  if [[ $SKIP_TRT -eq 1 ]]; then PLATFORM=python; else PLATFORM=tensorrt_plan; fi
elif [[ $SKIP_TRT -eq 1 && "$PLATFORM" == tensorrt_plan ]]; then
  echo "export.sh: --skip-trt contradicts PLATFORM=tensorrt_plan" >&2; exit 2
fi

# shellcheck source=_cli.sh
source "$(dirname "${BASH_SOURCE[0]}")/_cli.sh"

echo "==> deploying $CHECKPOINT_PATH as $MODEL_NAME ($PLATFORM, $PRECISION) into $MODEL_REPOSITORY" >&2
"${CLI[@]}" deploy \
  --checkpoint "$CHECKPOINT_PATH" --repository "$MODEL_REPOSITORY" \
  --model-name "$MODEL_NAME" --platform "$PLATFORM" --python-runtime "$PYTHON_RUNTIME" \
  --precision "$PRECISION" --max-batch-size "$MAX_BATCH_SIZE" --max-seq-length "$MAX_SEQ_LENGTH" \
  ${EXTRA[@]+"${EXTRA[@]}"}

echo "==> validating $MODEL_REPOSITORY" >&2
"${CLI[@]}" validate "$MODEL_REPOSITORY" --model "$MODEL_NAME"

if [[ $START_SERVER -eq 1 ]]; then
  echo "==> starting tritonserver (Ctrl-C stops it)" >&2
  exec "${CLI[@]}" serve "$MODEL_REPOSITORY" \
    --http-port "${HTTP_PORT:-8000}" --grpc-port "${GRPC_PORT:-8001}" --metrics-port "${METRICS_PORT:-8002}"
fi
