"""Shared helpers for benchmark scripts: environment record, timing, JSON output."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment(
    packages=("torch", "onnxruntime", "openvino", "numpy", "tritonclient", "nvidia-pytriton"),
) -> dict:
    versions = {}
    for p in packages:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        **git_state(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def git_state() -> dict:
    """The commit the numbers come from and whether the tree had uncommitted changes (from git,
    or from UGT_GIT_COMMIT / UGT_GIT_DIRTY where the tree travelled without its .git)."""
    if os.environ.get("UGT_GIT_COMMIT"):
        dirty = os.environ.get("UGT_GIT_DIRTY")
        return {
            "git_commit": os.environ["UGT_GIT_COMMIT"],
            "git_dirty": dirty == "1" if dirty else None,
        }
    root = Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def time_call(
    fn: Callable[[], object], warmup: int = 3, min_runs: int = 10, min_seconds: float = 1.0
) -> dict:
    """Median/p90/min latency in ms of ``fn`` after warm-up (at least min_runs and min_seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 1000:
            break
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "min_ms": samples[0],
        "runs": len(samples),
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
