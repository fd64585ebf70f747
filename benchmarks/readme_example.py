"""How long the README's Python example takes, run as written, and what validation costs (issue 16).

    .venv/bin/python -m benchmarks.readme_example [--checkpoint demo-output/ugt_tiny.safetensors]
                                                  [--runs 1]

Runs the example (the first python block of the README's "Python API" section) in a fresh
temporary folder with the checkpoint at demo-output/ugt_tiny.safetensors, as a user would, and
records its wall time with the host's load around it, the sweep's lower-bound estimate
(``plan_sweep``) next to the sweep's measured windows, and how long ``validate_deployment`` and
the artifact check of the published int8 model take (what validation adds before a publish).
Writes benchmarks/results/readme_example-<stamp>.json. A shared machine makes the wall time
noisy: the load average is recorded with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import environment, time_call, write_result

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The README's Python example, exactly as written."""
    text = README.read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if not match:
        raise SystemExit("no python block in the README's Python API section")
    return match.group(1)


def run_example(checkpoint: Path, workdir: Path) -> dict:
    (workdir / "demo-output").mkdir(parents=True)
    shutil.copy(checkpoint, workdir / "demo-output" / "ugt_tiny.safetensors")
    (workdir / "example.py").write_text(python_example())
    env = dict(os.environ)
    # The python-backend stub finds its Python through PATH (this interpreter's bin first).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(README.parent)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "example.py"], cwd=workdir, env=env, capture_output=True, text=True
    )
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"the README example failed:\n{res.stderr[-3000:]}")
    plan = re.search(r"(\d+) points, at least (\d+) s", res.stdout)
    report = json.loads((workdir / "bench" / "report.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "sweep_points": int(plan.group(1)) if plan else None,
        "sweep_estimate_min_seconds": int(plan.group(2)) if plan else None,
        "sweep_measured_seconds": round(
            sum(r["duration_s"] for r in report["results"].values()), 1
        ),
        "points": {
            k: {
                "throughput": round(r["throughput"], 1),
                "latency_p99_ms": round(r["latency_p99"], 2),
                "stable": r["stable"],
                "trials": r["trials"],
            }
            for k, r in report["results"].items()
        },
    }


def validation_cost(workdir: Path) -> dict:
    from algorithm.serving import validate_deployment
    from algorithm.serving.verify.artifact import artifact_problems

    repo = workdir / "model_repository"
    artifact = repo / "ugt_recommend" / "1" / "model.onnx"
    return {
        "artifact_bytes": artifact.stat().st_size,
        "artifact_check": time_call(lambda: artifact_problems(artifact), warmup=1, min_runs=5),
        "validate_deployment": time_call(
            lambda: validate_deployment(repo, "ugt_recommend"), warmup=1, min_runs=5
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("demo-output/ugt_tiny.safetensors"))
    ap.add_argument("--runs", type=int, default=1, help="times to run the example")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        raise SystemExit(
            f"{args.checkpoint} not found: `make run` or `ugt-serving train` writes it"
        )
    runs, cost = [], None
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ugt-readme-") as tmp:
            runs.append(run_example(args.checkpoint, Path(tmp)))
            if i == 0:
                cost = validation_cost(Path(tmp))
        print(
            f"run {i + 1}: {runs[-1]['seconds']:.0f} s (load average "
            f"{runs[-1]['load_average_1m_before']:.1f} -> {runs[-1]['load_average_1m_after']:.1f})"
        )
    path = write_result(
        "readme_example",
        {
            "environment": environment(),
            "checkpoint": str(args.checkpoint),
            "runs": runs,
            "validation": cost,
            "note": "wall time of the README's Python example as written, on a shared machine "
            "(load average recorded); validation timings are medians of in-process calls",
        },
    )
    v = cost["validate_deployment"]["median_ms"]
    a = cost["artifact_check"]["median_ms"]
    print(f"validate_deployment {v:.0f} ms (artifact check {a:.0f} ms of it); wrote {path}")


if __name__ == "__main__":
    main()
