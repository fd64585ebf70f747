"""Overload behaviour of the real tritonserver under Triton's queue policy (issue 6).

    .venv/bin/python -m benchmarks.overload --onnx demo-output/model.onnx [--factors 1,2,4]

One server (python backend, ONNX Runtime, batch 1 requests of 64 items, dynamic batching up to
8) serves the same model under three queue policies, each with 1 and 2 instances:
``none`` (unbounded queue), ``timeout`` (default_queue_timeout_us only) and ``queue+timeout``
(max_queue_size = 2 batches per instance, plus the timeout). The capacity of each instance count
is measured closed-loop (a full batch running and one waiting per instance, no policy); then Poisson
arrivals at ``factors`` x that capacity hit every policy. With ``--pin`` (default on >= 2 cores)
the server runs on core 0 and the load generator on the others, so the client's CPU does not
eat the server's. Writes benchmarks/results/overload-<stamp>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from algorithm.serving import (
    BenchmarkConfig,
    ExportConfig,
    TritonConfig,
    TritonConfigGenerator,
    TritonServer,
)
from algorithm.serving.benchmark import TritonBenchmark

from .common import environment, write_result

MAX_BS, SEQ = 8, 64


def _policies(timeout_us: int) -> dict[str, dict]:
    return {
        "none": {},
        "timeout": {"default_queue_timeout_us": timeout_us},
        "queue+timeout": {"default_queue_timeout_us": timeout_us, "max_queue_size": 2 * MAX_BS},
    }


def _write_models(repo: Path, onnx: Path, timeout_us: int, instances: tuple[int, ...]) -> list[str]:
    names = []
    ec = ExportConfig(max_batch_size=MAX_BS, max_seq_length=256, opt_seq_length=SEQ)
    for n in instances:
        for policy, fields in _policies(timeout_us).items():
            name = f"i{n}_{policy.replace('+', '_')}"
            tc = TritonConfig(
                platform="python",
                instance_kind="KIND_CPU",
                instance_count=n,
                preferred_batch_sizes=(MAX_BS,),
                max_queue_delay_us=2000,
                runtime_threads=1,
                allow_timeout_override=False,
                **fields,
            )
            TritonConfigGenerator(ec.replace(model_name=name), tc).generate(repo, model_file=onnx)
            names.append(name)
    return names


def _drain(server, name: str, limit_s: float = 120.0) -> None:
    """Wait until ``name`` has no pending requests (an unbounded queue keeps a backlog)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pending = [
            ln
            for ln in server.metrics().splitlines()
            if ln.startswith("nv_inference_pending_request_count") and f'model="{name}"' in ln
        ]
        if not pending or all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in pending):
            return
        time.sleep(0.2)


def _row(r, name: str, factor: float, capacity: float) -> dict:
    return {
        "model": name,
        "factor": factor,
        "offered_rps": r.request_rate,
        "achieved_rps": r.achieved_rate,
        "capacity_rps": capacity,
        "total": r.total_requests,
        "ok": r.successful_requests,
        "rejected": r.rejected_requests,
        "failed": r.failed_requests,
        "timed_out": r.timed_out_requests,
        "goodput_rps": r.throughput,
        "goodput_of_capacity": r.throughput / capacity if capacity else None,
        "p50_ms": r.latency_p50,
        "p99_ms": r.latency_p99,
        "max_ms": r.latency_max,
        "server_queue_ms": r.server.get("queue_us", 0) / 1e3,
        "executions": r.server.get("execution_count"),
        "avg_batch": r.server.get("avg_batch"),
        "client_cpu_percent": r.client_cpu_percent,
        "errors": r.errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--onnx", type=Path, default=Path("demo-output/model.onnx"))
    ap.add_argument("--factors", default="1,2,4", help="offered load as multiples of the capacity")
    ap.add_argument("--instances", default="1,2")
    ap.add_argument(
        "--timeout-ms", type=float, default=300.0, help="default_queue_timeout_us / 1000"
    )
    ap.add_argument("--client-timeout-s", type=float, default=5.0)
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2
    )
    args = ap.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    instances = tuple(int(n) for n in args.instances.split(","))
    timeout_us = int(args.timeout_ms * 1e3)
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        names = _write_models(Path(tmp), args.onnx, timeout_us, instances)
        if args.pin:
            os.sched_setaffinity(0, {cores[0]})  # the server (a child) inherits core 0
        with TritonServer(tmp, http_port=0, grpc_port=0, metrics_port=0) as server:
            if args.pin:
                os.sched_setaffinity(0, set(cores[1:]))
            base = dict(
                triton_url=server.grpc_url,
                num_warmup_requests=4 * MAX_BS,
                num_requests=200,
                measurement_window_s=args.window_s,
                max_trials=3,
                timeout_s=args.client_timeout_s,
                seed=5,
            )
            rows, capacities = [], {}
            for n in instances:
                cap = TritonBenchmark(BenchmarkConfig(**base, concurrency=2 * MAX_BS * n)).run(
                    server.grpc_url, f"i{n}_none", 1, SEQ
                )
                capacities[n] = {
                    "rps": cap.throughput,
                    "p50_ms": cap.latency_p50,
                    "p99_ms": cap.latency_p99,
                }
                for factor in factors:
                    # the unbounded queue last: its backlog is drained before the next point
                    for name in sorted(
                        (m for m in names if m.startswith(f"i{n}_")),
                        key=lambda m: m.endswith("none"),
                    ):
                        cfg = BenchmarkConfig(
                            **base, mode="request_rate", request_rates=(factor * cap.throughput,)
                        )
                        r = TritonBenchmark(cfg).run(server.grpc_url, name, 1, SEQ)
                        _drain(server, name)
                        rows.append(_row(r, name, factor, cap.throughput))
                        print(
                            f"{name} x{factor:g}: ok {r.throughput:.0f}/s, rejected {r.rejected_requests}, "
                            f"timed out {r.timed_out_requests}, P99 {r.latency_p99:.0f} ms",
                            flush=True,
                        )
    data = {
        "benchmark": "overload",
        "environment": environment(),
        "onnx": str(args.onnx),
        "settings": {
            "max_batch_size": MAX_BS,
            "seq_len": SEQ,
            "request_batch": 1,
            "max_queue_delay_us": 2000,
            "default_queue_timeout_us": timeout_us,
            "max_queue_size": "2 * max_batch_size (queue+timeout only)",
            "runtime_threads": 1,
            "client_timeout_s": args.client_timeout_s,
            "pinned": args.pin,
            "server_cores": cores[:1] if args.pin else cores,
            "client_cores": cores[1:] if args.pin else cores,
        },
        "capacity": capacities,
        "points": rows,
    }
    path = write_result("overload", data)
    print(
        "\n| model | load | offered/s | ok/s (of capacity) | rejected | timed out | P50 ms | P99 ms | max ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | x{r['factor']:g} | {r['offered_rps']:.0f} | {r['goodput_rps']:.0f} "
            f"({100 * r['goodput_of_capacity']:.0f}%) | {r['rejected']} | {r['timed_out']} | {r['p50_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['max_ms']:.0f} |"
        )
    print(f"\ncapacity: {capacities}\nwrote {path}")


if __name__ == "__main__":
    main()
