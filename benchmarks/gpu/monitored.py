"""The ``monitored`` part of the GPU benchmark (issue 17, guide 10.2): one short sweep of
GPUMonitoredBenchmark against the served model, with the GPU's utilization, peak memory and
power at each load point.

    benchmarks/gpu/run_gpu.sh --parts monitored --out $OUT/gpu_monitored_h100.json

The repository is the server part's (``served.write_repository``: python backend, the torch
runner's GpuEngine, length-aware batching, KIND_GPU) with ``ServeOptions.instances`` instances;
one client process (asyncio, gRPC) measures batch-1 requests at ``seq_len`` for each level in
``monitored_levels`` (default 1, 16, 64: the client, not the GPU, may limit the last). GPU
figures come from NVML (nvidia-ml-py) on this machine, summed over the GPUs the server uses.
The JSON section holds every point (``ExtendedBenchmarkResult.to_dict()``), and the markdown
report with its plots is written beside ``--out`` (``<out stem>_report.md``).
``--device cpu --preset tiny`` runs the same path on a CPU: the GPU fields are None with the
reason in ``gpu_monitor_note``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from served import ServeOptions, server_env, write_repository


def monitored_part(args, device, model, engine_opts: dict, result: dict, write, log) -> None:
    from algorithm.serving.benchmark import GPUMonitoredBenchmark
    from algorithm.serving.config import BenchmarkConfig
    from algorithm.serving.triton.server import TritonServer

    so = ServeOptions(**json.loads(args.server_config)) if args.server_config else ServeOptions()
    cuda = device.type == "cuda"
    seq_len = so.seq_len if cuda else min(so.seq_len, 64)
    levels = tuple(getattr(args, "monitored_levels", None) or (1, 16, 64))
    kind = "KIND_GPU" if cuda else "KIND_CPU"
    dtype = engine_opts.get("dtype", "bf16") if cuda else "fp32"
    engine = {
        **{k: v for k, v in engine_opts.items() if k != "layout"},
        "capture_new_shapes": False,
    }
    if not cuda:
        engine.update(dtype="fp32", varlen_kernel="auto")
    out = result["monitored"] = {
        "options": {**asdict(so), "levels": list(levels), "seq_len": seq_len},
        "engine": engine,
        "kind": kind,
    }
    work = Path(tempfile.mkdtemp(prefix="ugt-gpu-monitored-"))
    try:
        ckpt = work / "ugt.safetensors"
        model.save(ckpt)
        repo = work / "repo"
        write_repository(
            repo, ckpt, engine, so, so.gpus, kind, model.config, dtype, ("length_aware",)
        )
        t = time.monotonic()
        with TritonServer(
            repo,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            startup_timeout_s=300,
            env=server_env(),
            log_dir=Path(tempfile.gettempdir()) / "triton-monitored",
        ) as server:
            out["startup_s"] = round(time.monotonic() - t, 1)
            log(f"[monitored] tritonserver ready in {out['startup_s']} s at {server.grpc_url}")
            cfg = BenchmarkConfig(
                triton_url=server.grpc_url,
                num_warmup_requests=so.warmup_requests,
                num_requests=1,
                concurrency_levels=levels,
                test_batch_sizes=(1,),
                test_seq_lengths=(seq_len,),
                measurement_window_s=so.window_s,
                max_trials=so.trials,
                stability_percent=0.0,
                timeout_s=so.timeout_s,
                slo_p99_ms=so.slo_ms,
            )
            bench = GPUMonitoredBenchmark(
                cfg, server_pid=server.process.pid, gpus=so.gpus if cuda else None
            )
            results = bench.run_sweep(server.grpc_url, "ugt_packed")
            out["results"] = {k: r.to_dict() for k, r in results.items()}
            for k, r in results.items():
                log(
                    f"[monitored] {k}: {r.throughput:.0f} req/s p99 {r.latency_p99:.2f} ms, GPU "
                    f"util {r.gpu_utilization_avg}, memory peak {r.gpu_memory_peak_mb} MB, "
                    f"power {r.power_consumption_avg_w} W ({r.gpu_monitor or r.gpu_monitor_note})"
                )
            report = Path(args.out).with_name(Path(args.out).stem + "_report.md")
            bench.generate_report(
                results, report, title="GPU-monitored benchmark", meta={"device": str(device)}
            )
            out["report"] = report.name
            out["server_log_tail"] = server.log_tail(10)
    except Exception as e:  # keep what was measured; the JSON says what failed
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        log(f"monitored part failed: {out['error']}")
    write()
