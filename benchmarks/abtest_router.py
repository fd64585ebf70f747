"""What the A/B router inside Triton costs: P99 through the router against the arm called
directly, on the same server under the same load, side by side (issue 18).

    .venv/bin/python -m benchmarks.abtest_router [--onnx demo-output/model.onnx] \
        [--concurrency 1,16] [--repeats 3] [--router-instances 1,2]

One server holds the arm (``ugt_a``: the ONNX model on ONNX Runtime in model.py, the served CPU
benchmark's configuration: 2 instances x 1 thread, dynamic batching up to 64, preferred 4/8/16,
100 us delay), a second arm ``ugt_b`` (the same artifact) and routers in front of them:

- ``router_i<N>``: A/B mode with every user on A (traffic_split 1.0), N router instances: the
  router's own cost, nothing else changes for the arm;
- ``shadow_10``: shadow mode, A answers everyone and 10 % of the users are mirrored to B (after
  A's answer): what mirroring adds to A's answers.

Each load point (batch 1, seq_len 128, gRPC, closed loop) is measured for every model in turn,
direct first, and the whole round is repeated ``--repeats`` times, so each router point has a
direct point measured just before it. Routed requests carry a user id drawn from 100,000 users.
Without ``--onnx`` (and without demo-output/model.onnx) an untrained tiny model is exported and
optimized for ONNX Runtime fp32 as the demo does: the cost of a request does not depend on the
weights. Writes
benchmarks/results/abtest_router-<stamp>.json and prints a markdown table. On a shared machine
the numbers move with the neighbours: each point records the host's load and the other
processes' CPU use.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from algorithm.serving import (
    ABExperiment,
    BenchmarkConfig,
    ExperimentConfig,
    ExportConfig,
    TritonConfig,
    TritonConfigGenerator,
    TritonServer,
)
from algorithm.serving.benchmark import TritonBenchmark

from .common import environment, write_result

SEQ, USERS = 128, 100_000


def _artifact(onnx: Path | None, folder: Path) -> tuple[Path, str]:
    if onnx is not None:
        return onnx, str(onnx)
    default = Path("demo-output/model.onnx")
    if default.is_file():
        return default, str(default)
    import torch

    from algorithm.serving import export_to_onnx
    from algorithm.serving.backends import optimize
    from algorithm.ugt import UGTConfig, UGTModel

    torch.manual_seed(0)
    model = UGTModel(UGTConfig.tiny()).eval()
    ec = ExportConfig(max_batch_size=64, max_seq_length=1024, precision="fp32")
    onnx = export_to_onnx(model, folder / "export.onnx", ec)
    # as the served CPU benchmark: ONNX Runtime fp32 after the backend's graph optimization
    path = optimize(onnx, folder / "model.onnx", "onnxruntime", ec, reference_model=model)
    return Path(path), "untrained tiny preset, exported and optimized (onnxruntime fp32) here"


def _repository(repo: Path, artifact: Path, router_instances: list[int]) -> list[str]:
    ec = ExportConfig(max_batch_size=64, max_seq_length=1024, opt_seq_length=SEQ)
    tc = TritonConfig(
        platform="python",
        instance_kind="KIND_CPU",
        instance_count=2,
        preferred_batch_sizes=(4, 8, 16),
        max_queue_delay_us=100,
        runtime_threads=1,
        model_warmup=True,
    )
    for arm in ("ugt_a", "ugt_b"):
        TritonConfigGenerator(ec.replace(model_name=arm), tc).generate(repo, model_file=artifact)
    routers = []
    for n in router_instances:
        exp = ExperimentConfig(
            router_name=f"router_i{n}",
            model_a="ugt_a",
            model_b="ugt_b",
            traffic_split=1.0,
            instance_count=n,
        )
        ABExperiment.create(repo, exp)
        routers.append(exp.router_name)
    shadow = ExperimentConfig(
        router_name="shadow_10",
        model_a="ugt_a",
        model_b="ugt_b",
        mode="shadow",
        shadow_fraction=0.1,
        instance_count=max(router_instances),
    )
    ABExperiment.create(repo, shadow)
    return [*routers, shadow.router_name]


def _point(r, model: str, repeat: int) -> dict:
    return {
        "model": model,
        "repeat": repeat,
        "concurrency": r.concurrency,
        "throughput_rps": r.throughput,
        "p50_ms": r.latency_p50,
        "p90_ms": r.latency_p90,
        "p99_ms": r.latency_p99,
        "max_ms": r.latency_max,
        "ok": r.successful_requests,
        "total": r.total_requests,
        "stable": r.stable,
        "server_cpu_ms_per_request": r.server_cpu_ms_per_request,
        "other_cpu_percent": r.other_cpu_percent,
        "host_load_average": r.host_load_average,
        "errors": r.errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=None)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--router-instances", default="1,2")
    ap.add_argument("--requests", type=int, default=600, help="measured requests per point (floor)")
    ap.add_argument("--window-s", type=float, default=1.0)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    instances = [int(n) for n in args.router_instances.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        artifact, artifact_note = _artifact(args.onnx, Path(tmp))
        repo = Path(tmp) / "repo"
        routed = _repository(repo, artifact, instances)
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
            base = dict(
                triton_url=server.grpc_url,
                num_warmup_requests=50,
                num_requests=args.requests,
                measurement_window_s=args.window_s,
                max_trials=5,
                stability_percent=10.0,
                timeout_s=30.0,
                seed=3,
            )
            points = []
            for repeat in range(args.repeats):
                for level in levels:
                    for model in ["ugt_a", *routed]:
                        cfg = BenchmarkConfig(
                            **base,
                            concurrency=level,
                            user_ids=0 if model == "ugt_a" else USERS,
                        )
                        bench = TritonBenchmark(cfg, server_pid=server.process.pid)
                        r = bench.run(server.grpc_url, model, 1, SEQ)
                        points.append(_point(r, model, repeat))
                        print(
                            f"repeat {repeat} c{level} {model}: P99 {r.latency_p99:.2f} ms, "
                            f"p50 {r.latency_p50:.2f} ms, {r.throughput:.0f} req/s",
                            flush=True,
                        )
            router_metrics = [
                ln for ln in server.metrics().splitlines() if ln.startswith("ugt_router_requests")
            ]
    summary = {}
    for level in levels:
        direct = {
            p["repeat"]: p for p in points if p["model"] == "ugt_a" and p["concurrency"] == level
        }
        for model in routed:
            via = {
                p["repeat"]: p for p in points if p["model"] == model and p["concurrency"] == level
            }
            row = {}
            for key in ("p50_ms", "p99_ms", "throughput_rps"):
                added = [via[r][key] - direct[r][key] for r in sorted(via)]
                row[f"direct_{key}_median"] = statistics.median(d[key] for d in direct.values())
                row[f"routed_{key}_median"] = statistics.median(v[key] for v in via.values())
                row[f"added_{key}_median"] = statistics.median(added)
                row[f"added_{key}_each_repeat"] = added
            summary[f"{model} c{level}"] = row
    data = {
        "benchmark": "abtest_router",
        "environment": environment(),
        "artifact": artifact_note,
        "settings": {
            "arm": "python backend, ONNX Runtime fp32, KIND_CPU, 2 instances x 1 thread, "
            "max batch 64, preferred 4/8/16, delay 100 us",
            "request": {"batch": 1, "seq_len": SEQ, "protocol": "grpc", "users": USERS},
            "router": "ab with traffic_split 1.0 (all users on A); shadow_10: shadow, 10% mirrored",
            "concurrency": levels,
            "repeats": args.repeats,
            "router_instances": instances,
            "window_s": args.window_s,
            "min_requests_per_point": args.requests,
        },
        "points": points,
        "summary": summary,
        "router_request_counters": router_metrics,
    }
    path = write_result("abtest_router", data)
    print(
        "\n| path | concurrency | direct p50 / P99 ms | routed p50 / P99 ms "
        "| added p50 ms | added P99 ms (each repeat) | req/s direct -> routed |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, s in summary.items():
        model, level = key.rsplit(" c", 1)
        each = ", ".join(f"{v:+.2f}" for v in s["added_p99_ms_each_repeat"])
        print(
            f"| {model} | {level} | {s['direct_p50_ms_median']:.2f} / {s['direct_p99_ms_median']:.2f} "
            f"| {s['routed_p50_ms_median']:.2f} / {s['routed_p99_ms_median']:.2f} "
            f"| {s['added_p50_ms_median']:+.2f} | {s['added_p99_ms_median']:+.2f} ({each}) "
            f"| {s['direct_throughput_rps_median']:.0f} -> {s['routed_throughput_rps_median']:.0f} |"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
