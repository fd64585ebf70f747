#!/usr/bin/env bash
# The host path of two checkouts, interleaved on one machine (host_path.py, blocking or
# pipelined, the engine's forward stubbed; pipelined sends wait --send-us with the GIL free):
#   benchmarks/gpu/host_path_ab.sh BEFORE_TREE AFTER_TREE OUT_JSON [REPS]
# Each rep runs both trees back to back, per mode (MODES, default "d2 d1c": pipelined depth 2
# and depth 1 with continuous batching; "b1 b16": the blocking path at batch 1 and 16);
# OUT_JSON gets every run's JSON (with its tree's commit) and the medians per tree and mode.
set -euo pipefail
BEFORE=${1:?before tree}; AFTER=${2:?after tree}; OUT=${3:?output json}; REPS=${4:-5}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
for rep in $(seq "$REPS"); do
  for tree in "$BEFORE" "$AFTER"; do
    for mode in ${MODES:-d2 d1c}; do
      case $mode in  # b1, b16: the blocking path at batch 1 and 16; d2, d1c: pipelined
        b1) args=(--batch 1 --iters 3000);; b16) args=(--batch 16 --iters 300);;
        d2) args=(--batch 16 --iters 300 --pipeline-depth 2);;
        d1c) args=(--batch 16 --iters 300 --pipeline-depth 1 --continuous);;
      esac
      tag=$(basename "$tree")
      (cd "$tree" && PYTHONPATH="$tree" "$PY" benchmarks/gpu/host_path.py --stub-forward \
        "${args[@]}" --out "$TMP/${tag}_${mode}_${rep}.json" > /dev/null)
    done
  done
done
"$PY" - "$TMP" "$OUT" "$BEFORE" "$AFTER" <<'PY'
import json, statistics, sys
from pathlib import Path
tmp, out, before, after = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = {f.stem: json.loads(f.read_text()) for f in sorted(tmp.glob("*.json"))}
summary = {}
for tree in (before, after):
    tag = Path(tree).name
    for mode in ("b1", "b16", "d2", "d1c"):
        rows = [r for k, r in runs.items() if k.startswith(f"{tag}_{mode}_")]
        if not rows:
            continue
        for load in ("fixed1024", "mix"):
            for m in ("wall_us_per_request", "cpu_us_per_request", "us_per_request"):
                if m in rows[0][load]:
                    summary.setdefault(f"{mode}_{load}_{m}", {})[tag] = statistics.median(
                        r[load][m] for r in rows
                    )
        summary.setdefault("commits", {})[tag] = rows[0]["environment"]["git_commit"]
out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
print(json.dumps(summary, indent=1))
PY
