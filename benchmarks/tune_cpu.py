"""`tune` on the CPU demo model: the tuned configuration against the demo's default (issue 15).

    .venv/bin/python -m benchmarks.tune_cpu [--concurrency 16] [--slo 30] [--time-budget 900]
                                            [--rounds 3] [--work demo-output]

Builds (or reuses) the demo's artifacts in ``--work`` (the trained tiny checkpoint, its ONNX
export, the ONNX Runtime fp32 artifact behind the accuracy gate), writes a fresh model repository
with the demo's default serving config (2 instances x 1 thread, dynamic batching [4, 8, 16] with
a 100 us queue delay), then runs ``ServingTuner`` on it with the embedded tritonserver: batch-1
requests of seq_len 128 at the given closed-loop concurrency, P99 budget ``--slo``. The tune ends
with the winner and the default measured alternately (``--rounds`` rounds) in the same run; the
JSON (benchmarks/results/tune_cpu-<stamp>.json) holds every candidate and every point.

The default repository is rebuilt and the tune output folder (default ``tune-output/cpu``)
emptied on every run, so no stored point of an earlier run is reused. The 2-core development VM is shared: read the
recorded load average and the same-run comparison, not one number alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from algorithm.serving import BenchmarkConfig, ServingTuner, TuneConfig
from algorithm.serving.demo import Demo, DemoConfig

from .common import environment, write_result


def _repository(work: Path) -> tuple[Path, dict]:
    """The demo's model repository with its default config (artifacts reused when up to date)."""
    demo = Demo(DemoConfig(output=str(work), candidates=(("onnxruntime", "fp32"),), baseline=False))
    model, ckpt, _ = demo.checkpoint()
    onnx = demo.export(model, ckpt)
    artifact, _ = demo.optimize(model, onnx)
    repo, served = demo.repository(model, artifact, ckpt)
    return repo, served


def _portable(value):
    """Paths as the reader's checkout has them: relative to the working folder, else just the
    name (no machine's absolute paths in a committed result)."""
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    try:
        return (
            os.path.relpath(value)
            if not os.path.relpath(value).startswith("..")
            else Path(value).name
        )
    except ValueError:
        return Path(value).name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="demo-output", help="demo artifacts (reused when present)")
    ap.add_argument("--concurrency", default="16", help="closed-loop levels, comma list")
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--slo", type=float, default=30.0, help="P99 budget in ms")
    ap.add_argument("--time-budget", type=float, default=900.0)
    ap.add_argument("--rounds", type=int, default=3, help="same-run rounds, winner vs default")
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--instances", default="", help="instance counts (default: the tune's)")
    ap.add_argument(
        "--output", default="tune-output/cpu", help="tune output folder (emptied first)"
    )
    args = ap.parse_args(argv)

    levels = tuple(int(c) for c in args.concurrency.split(","))
    t0 = time.monotonic()
    repo, served = _repository(Path(args.work))
    model = next(iter(served))
    tc = TuneConfig(
        model_name=model,
        time_budget_s=args.time_budget,
        compare_rounds=args.rounds,
        instance_counts=tuple(int(i) for i in args.instances.split(",") if i),
        resume=False,
    )
    bc = BenchmarkConfig(
        concurrency=levels[0],
        concurrency_levels=levels,
        test_batch_sizes=(1,),
        test_seq_lengths=(args.seq_length,),
        num_warmup_requests=50,
        num_requests=args.requests,
        measurement_window_s=args.window,
        max_trials=args.max_trials,
        slo_p99_ms=args.slo,
    )

    def progress(event: str, info: dict) -> None:
        if event == "measured":
            c, j = info["candidate"], info["judge"]
            thr, p99 = j.throughput(c), j.best_p99(c)
            others = [r.other_cpu_percent or 0.0 for r in c.results]
            print(
                f"[{time.monotonic() - t0:6.0f}s] {c.step:<22} {c.settings.label:<34} "
                f"in budget: {'-' if thr is None else f'{thr:.0f} req/s'}, best p99 "
                f"{'-' if p99 is None else f'{p99:.1f}'} ms; other processes "
                f"{max(others, default=0):.0f}% of a core",
                flush=True,
            )

    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)  # nothing stored by an earlier run is reused
    # the python-backend stub finds its environment through PATH
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = ServingTuner(tc, bc, progress=progress).tune(repo, output=out)
    print(result.summary())
    tune = result.to_dict()
    tune["paths"] = {k: _portable(v) for k, v in tune["paths"].items()}
    data = {
        "environment": environment(),
        "options": vars(args),
        "default_config": {k: _portable(v) for k, v in served[model].items()},
        "summary": result.summary(),
        "side_by_side": result.side_by_side(),
        "tune": tune,
    }
    path = write_result("tune_cpu", data)
    print(f"wrote {path}")
    return 0 if result.met_budget else 1


if __name__ == "__main__":
    sys.exit(main())
