"""`tune` on one GPU (issue 15): the served base model, tuned against the current defaults.

    GPU_SCRIPT=benchmarks/gpu/tune_gpu.py benchmarks/gpu/run_gpu.sh --out $OUT/tune_h100.json
    python benchmarks/gpu/tune_gpu.py --device cpu --preset tiny --time-budget 120   # CPU check

One model repository as the served GPU benchmark writes it (``served.write_repository``: python
backend, GpuEngine, length-aware batching, the defaults of ``served.ServeOptions``: 3 instances,
preferred batch sizes [16, 32, 48, 64], 100 us queue delay, CUDA graphs warmed at load) and one
tritonserver in explicit model control. ``ServingTuner`` tunes it for each load profile:

- ``fixed``: batch-1 requests of seq_len 1024 at concurrency 64;
- ``mix``: log-normal history lengths (median 200, sigma 0.8, max 1024) at concurrency 64.

Load comes from ``served.load_point`` (several client processes, so that the client is not the
bottleneck). Each profile ends with the winner and the defaults measured alternately in the
same run. Between profiles the repository's config is restored, so each starts from the
defaults. A candidate's load captures its CUDA graphs (30-60 s for 3 instances on the H100), so
the default budget of 1200 s per profile holds roughly 10-15 candidates. The JSON is written
after each profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import served  # noqa: E402  (benchmarks/gpu/served.py)

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def as_result(point: dict, level: float, model: str, mix: bool, seq_len: int, gpus=None):
    """served.load_point's merged dict as a BenchmarkResult (what the tuner judges). ``gpus``:
    the cards serving the model; the utilization is theirs (on a two-GPU host the runs of
    2026-11-28 averaged in the idle second card: their ``gpu_utilization`` is half of GPU 0's)."""
    from algorithm.errors import BenchmarkError
    from algorithm.serving.bench.result import BenchmarkResult

    if "error" in point:
        raise BenchmarkError(f"load point at concurrency {level:g} failed: {point['error']}")
    util = point.get("gpu_util_per_gpu") or []
    if gpus is not None:
        serving = set(gpus)
        util = [u for i, u in enumerate(util) if i in serving]
    return BenchmarkResult(
        throughput=point["throughput"],
        latency_p50=point["p50_ms"],
        latency_p90=point["p90_ms"],
        latency_p95=point["p95_ms"],
        latency_p99=point["p99_ms"],
        latency_avg=point["mean_ms"],
        latency_min=point["min_ms"],
        latency_max=point["max_ms"],
        total_requests=point["requests"] + point["failed"],
        successful_requests=point["requests"],
        failed_requests=point["failed"],
        model_name=model,
        seq_length=None if mix else seq_len,
        seq_len_distribution="lognormal" if mix else "fixed",
        seq_len_mean=point.get("seq_len_mean", 0.0),
        concurrency=int(level),
        duration_s=point.get("duration_s", 0.0),
        client_cpu_percent=point.get("client_cpu_percent", 0.0),
        server=point.get("server_breakdown_us", {}),
        batch_sizes_formed={int(k): v for k, v in point.get("batch_sizes_formed", {}).items()},
        gpu_utilization=sum(util) / len(util) if util else None,
        gpu_memory_used_mb=point.get("gpu_memory_used_mb") or None,
        per_gpu={i: {"utilization": u} for i, u in enumerate(util)},
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_gpu.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base", choices=("base", "tiny"))
    ap.add_argument("--profiles", default="fixed,mix")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--slo", type=float, default=30.0, help="P99 budget in ms")
    ap.add_argument("--time-budget", type=float, default=1200.0, help="seconds per profile")
    ap.add_argument("--rounds", type=int, default=2, help="same-run rounds, winner vs defaults")
    ap.add_argument("--instances", default="1,2,3,4")
    ap.add_argument("--delays", default="", help="queue delays (us) to try; default: the tune's")
    ap.add_argument("--pipeline-depths", default="", help="model.py pipeline depths to try")
    ap.add_argument("--settings", default="", help="the settings searched; default: all")
    ap.add_argument("--server-config", default="", help="JSON overrides for served.ServeOptions")
    args = ap.parse_args(argv)

    import torch
    from run_gpu import environment, trained_model  # benchmarks/gpu/run_gpu.py

    from algorithm.serving import BenchmarkConfig, ServingTuner, TuneConfig
    from algorithm.serving.triton.server import TritonServer
    from algorithm.serving.tune import restore_previous_config

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    so = served.ServeOptions(**json.loads(args.server_config)) if args.server_config else None
    so = so or served.ServeOptions()
    if args.preset == "tiny":  # CPU check of every path: small everything
        so.seq_len, so.median, so.warmup_requests = min(so.seq_len, 64), min(so.median, 16), 8
        so.window_s, so.trials = 0.5, 2
    model, train = trained_model(args.preset, device, steps=0, budget_s=0)  # timing only
    cfg = model.config
    engine = {"dtype": "bf16", "capture_new_shapes": False}
    if not cuda:
        engine.update(dtype="fp32", varlen_kernel="auto")
    kind = "KIND_GPU" if cuda else "KIND_CPU"
    work = Path(tempfile.mkdtemp(prefix="ugt-tune-gpu-"))
    ckpt = work / "ugt.safetensors"
    model.save(ckpt)
    repo = work / "repo"
    (name,) = served.write_repository(
        repo, ckpt, engine, so, so.gpus, kind, cfg, engine["dtype"], ("length_aware",)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join(["benchmarks/gpu/tune_gpu.py", *(argv or sys.argv[1:])]),
        "environment": environment(device),
        "model": {"preset": args.preset, "training": train},
        "defaults": asdict(so),
        "engine": engine,
        "profiles": {},
    }

    def write():
        out.write_text(json.dumps(result, indent=1, default=str))

    write()
    with TritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control="explicit",
        startup_timeout_s=900,
        env=served.server_env(),
        log_dir=work / "logs",
    ) as server:
        log(f"tritonserver ready at {server.grpc_url} ({name}: {so.instances} instances)")
        for profile in [p.strip() for p in args.profiles.split(",") if p.strip()]:
            mix = profile == "mix"
            seeds = iter(range(1000, 10**6))

            def measure(url, model_name, level, mix=mix, seeds=seeds):
                p = served.load_point(
                    url, model_name, int(level), so, cfg.codebook_sizes, mix, next(seeds)
                )
                return as_result(p, level, model_name, mix, so.seq_len, so.gpus)

            def progress(event, info, profile=profile):
                if event == "measured":
                    c, j = info["candidate"], info["judge"]
                    thr, p99 = j.throughput(c), j.best_p99(c)
                    log(
                        f"[{profile}] {c.step:<22} {c.settings.label:<42} in budget: "
                        f"{'-' if thr is None else f'{thr:.0f} req/s'}, best p99 "
                        f"{'-' if p99 is None else f'{p99:.1f}'} ms {c.error or ''}"
                    )

            tc = TuneConfig(
                model_name=name,
                time_budget_s=args.time_budget,
                compare_rounds=args.rounds,
                instance_counts=tuple(int(i) for i in args.instances.split(",") if i),
                max_queue_delays_us=tuple(int(d) for d in args.delays.split(",") if d),
                pipeline_depths=tuple(int(d) for d in args.pipeline_depths.split(",") if d),
                **({"settings": tuple(args.settings.split(","))} if args.settings else {}),
                load_timeout_s=900,
                resume=False,
            )
            bc = BenchmarkConfig(
                concurrency=args.concurrency,
                concurrency_levels=(args.concurrency,),
                test_batch_sizes=(1,),
                test_seq_lengths=(so.seq_len,),
                seq_len_distribution="lognormal" if mix else "fixed",
                seq_len_median=so.median,
                seq_len_sigma=so.sigma,
                seq_len_max=so.seq_len,
                slo_p99_ms=args.slo,
                codebook_sizes=tuple(cfg.codebook_sizes),
            )
            log(f"[{profile}] tuning at concurrency {args.concurrency}, P99 <= {args.slo:g} ms")
            try:
                r = ServingTuner(tc, bc, progress=progress, measure_point=measure).tune(
                    repo, url=server.grpc_url, output=work / f"tune_{profile}"
                )
                result["profiles"][profile] = {
                    "summary": r.summary(),
                    "side_by_side": r.side_by_side(),
                    "tune": r.to_dict(),
                }
                log(f"[{profile}] {r.summary()}")
                if r.written:  # the next profile starts from the defaults again
                    restore_previous_config(repo, name, url=server.grpc_url)
            except Exception as e:  # keep the other profile's numbers
                result["profiles"][profile] = {"error": f"{type(e).__name__}: {e}"[:3000]}
                log(f"[{profile}] failed: {type(e).__name__}: {e}")
            write()
        result["server_log_tail"] = server.log_tail(20)
    write()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
