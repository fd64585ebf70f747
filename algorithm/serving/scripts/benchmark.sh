#!/usr/bin/env bash
# Benchmark a live Triton server (guide 8.3): a thin wrapper over `ugt-serving benchmark`.
#
#   ./benchmark.sh [--url URL] [--model NAME] [--requests N] [--concurrency LIST]
#                  [--output DIR] [-- extra `ugt-serving benchmark` options]
#
#   --url          server endpoint host:port (default localhost:8001, gRPC; with
#                  `-- --protocol http`, the HTTP port, usually 8000)
#   --model        model name on the server (default ugt_recommend)
#   --requests     minimum measured requests per load point (default 1000)
#   --concurrency  requests in flight; a comma list sweeps, e.g. 1,4,16 (default 1)
#   --output       report folder: report.md, .json, .csv and plots (default benchmark-report)
#
# Variables with the same meaning: TRITON_URL, MODEL_NAME, NUM_REQUESTS, CONCURRENCY, OUTPUT;
# UGT_SERVING (the CLI command; default `ugt-serving`, else `$PYTHON -m algorithm.serving.cli`).
# --url, --model, --requests and --concurrency default to the CLI's defaults. Extra options:
#   ./benchmark.sh --concurrency 1,4,16 -- --batch-sizes 1,8 --seq-lengths 128,512 --baseline old.json
set -euo pipefail

# The help is the comment block above (up to the first line that is not a comment).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

URL="${TRITON_URL:-localhost:8001}"
MODEL="${MODEL_NAME:-ugt_recommend}"
REQUESTS="${NUM_REQUESTS:-1000}"
CONCURRENCY="${CONCURRENCY:-1}"
OUTPUT="${OUTPUT:-benchmark-report}"
EXTRA=()
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "benchmark.sh: $1 needs a value" >&2; usage >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --url) need "$@"; URL="$2"; shift ;;
    --model) need "$@"; MODEL="$2"; shift ;;
    --requests) need "$@"; REQUESTS="$2"; shift ;;
    --concurrency) need "$@"; CONCURRENCY="$2"; shift ;;
    --output) need "$@"; OUTPUT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "benchmark.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=_cli.sh
source "$(dirname "${BASH_SOURCE[0]}")/_cli.sh"

# The CLI checks the output folder, the server and the model before measuring anything.
echo "==> benchmarking $MODEL at $URL: $REQUESTS requests, concurrency $CONCURRENCY -> $OUTPUT/" >&2
exec "${CLI[@]}" benchmark --url "$URL" --model "$MODEL" --requests "$REQUESTS" \
  --concurrency "$CONCURRENCY" --output "$OUTPUT" ${EXTRA[@]+"${EXTRA[@]}"}
