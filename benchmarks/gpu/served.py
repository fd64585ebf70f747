"""The served part of the GPU benchmark: the real tritonserver, python backend, GPU instances.

One repository holds two models over the same checkpoint: ``ugt_packed`` (the torch runner's
GpuEngine, length-aware batching: a dynamic batch's requests are packed, no padding) and
``ugt_pad`` (the same engine, pad-to-longest). Load comes from several client processes (one
asyncio TritonBenchmark each, gRPC) so that the client is not the bottleneck; latencies are
merged, throughputs added, and GPU utilization is read per GPU through NVML while measuring.

- server: for each instance count in ``server_instances`` (1-4), batch-1 requests at seq_len 1024
  (concurrency 1, 16, 64, 128) and the realistic length mix (log-normal, median 200, max 1024;
  concurrency 64, 128), the mix also on ``ugt_pad`` at ``pad_instances``. Each point reports
  the host microseconds per request that model.py spent in each phase of execute() (its
  ``phase_stats`` files, summed over the instances).
- scaling (issue 8): the same server on GPU 0 alone, then on GPUs 0 and 1 (instance groups from
  TritonConfigGenerator with gpus [0, 1]); throughput at P99 <= the SLO, one GPU vs two.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServeOptions:
    instances: int = 3  # per GPU; run 4 (H100): 3 served the most at c64/c128 with GPU >= 90%
    server_instances: tuple = (1, 2, 3, 4)  # the server part measures each
    pad_instances: tuple = (2,)  # ... and serves ugt_pad (mix points) beside ugt_packed at these
    max_queue_delay_us: int = 100
    preferred: tuple = (16, 32, 48, 64)
    max_batch: int = 64
    window_s: float = 2.0
    trials: int = 3
    warmup_requests: int = 64  # per client process
    per_client: int = 16  # concurrency per client process
    fixed_levels: tuple = (1, 16, 64, 128)
    mix_levels: tuple = (64, 128)
    scaling_mix_levels: tuple = (16, 64, 128)  # per GPU
    scaling_fixed_levels: tuple = (16, 64)  # per GPU
    scaling_instances: tuple = (2, 3)
    slo_ms: float = 15.0
    seq_len: int = 1024
    median: int = 200
    sigma: float = 0.8
    gpus: tuple = (0,)
    timeout_s: float = 30.0
    engine_warmup: list = field(default_factory=list)  # empty: TritonConfigGenerator's plan
    mix_coverage: float = 0.9995  # of the mix's dynamic batches whose packed graph is warmed
    tensor_transport: str = ""  # "dlpack": as with numpy 2 (the GPU machine) also under numpy 1
    phase_stats: bool = True  # model.py writes its host time per phase; points report us/request
    # Serving configurations compared side by side in one run (the server part): each a name and
    # ServeOptions fields it overrides (instances, max_queue_delay_us, preferred, max_batch).
    # Empty: one configuration per entry of server_instances (the earlier runs).
    server_variants: list = field(default_factory=list)
    # Recorded, not acted on: whether the CUDA MPS daemon ran during the run (run_issue14.sh
    # starts it), so the python-backend instances' contexts shared the GPU instead of time-slicing.
    mps: bool = False
    # model.py's pipeline_depth (issue 14): batches an instance keeps queued on the GPU while it
    # reads the next; 0 = execute() waits for its batch (the design before)
    pipeline_depth: int = 0
    # model.py's continuous_batching (with pipeline_depth >= 1): execute() returns at once and the
    # pipeline queues what it was left whenever a slot frees (batches at the GPU's pace)
    continuous_batching: bool = False
    # model.py's gil_switch_interval_us (0: Python's 5000 us): how soon a thread of the pipelined
    # paths gets the GIL back from one that holds it
    gil_switch_interval_us: int = 0
    # EngineConfig fields over the run's --engine for this configuration (e.g. blocking_sync)
    engine_options: dict = field(default_factory=dict)


def server_env() -> dict:
    """LD_LIBRARY_PATH for tritonserver and the stub: the wheel's libs and this Python's libpython."""
    from algorithm.serving.triton.server import find_tritonserver

    libs = find_tritonserver().resolve().parents[3] / "nvidia_pytriton.libs"
    paths = [str(libs)] if libs.is_dir() else []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths.append(libdir)
    paths.append(os.environ.get("LD_LIBRARY_PATH", ""))
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p),
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


def write_repository(
    repo: Path,
    ckpt: Path,
    engine: dict,
    so: ServeOptions,
    gpus,
    kind: str,
    cfg,
    dtype: str,
    batchings: tuple[str, ...],
    phase_dir: Path | None = None,
) -> list[str]:
    """Two python-backend models over one checkpoint; config.pbtxt from TritonConfigGenerator."""
    from algorithm.fsutil import write_text_atomic
    from algorithm.serving.config import ExportConfig, TritonConfig
    from algorithm.serving.triton.schema import (
        artifact_filename,
        config_to_text,
        parse_config,
        pipelined_engine,
    )
    from algorithm.serving.triton_config import TritonConfigGenerator

    names = []
    for name, batching in (("ugt_packed", "length_aware"), ("ugt_pad", "pad")):
        if batching not in batchings:
            continue
        ec = ExportConfig(
            model_name=name,
            precision=dtype,
            max_batch_size=so.max_batch,
            max_seq_length=cfg.max_seq_length,
            seq_length_buckets=(min(so.seq_len, cfg.max_seq_length),),
            codebook_sizes=tuple(cfg.codebook_sizes),
            num_recommendations=cfg.num_recommendations,
        )
        tc = TritonConfig(
            platform="python",
            python_runtime="torch",
            instance_count=so.instances,
            gpus=tuple(gpus) if kind == "KIND_GPU" else (),
            instance_kind=kind,
            preferred_batch_sizes=tuple(so.preferred),
            max_queue_delay_us=so.max_queue_delay_us,
            model_warmup=False,
            length_mix=(so.median, so.sigma),
            warmup_coverage=so.mix_coverage,
            pipeline_depth=so.pipeline_depth,
            continuous_batching=so.continuous_batching,
        )
        gen = TritonConfigGenerator(ec, tc)  # on GPUs its warm-up plan: gen.gpu_warmup()
        path = Path(gen.generate(repo, model_file=ckpt))
        msg = gen.build_config(artifact_filename("python", "torch", ckpt))
        msg.parameters["batching"].string_value = batching
        # the run's engine, this configuration's options over it, then what the generator adds
        # for users (a pipelined model's blocking waits, unless the options say otherwise)
        opts = {**engine, **so.engine_options}
        opts = pipelined_engine(opts) if so.pipeline_depth else opts
        msg.parameters["engine"].string_value = json.dumps(opts)
        if so.engine_warmup:
            msg.parameters["warmup"].string_value = json.dumps(so.engine_warmup)
        if so.tensor_transport:
            msg.parameters["tensor_transport"].string_value = so.tensor_transport
        if so.gil_switch_interval_us:
            msg.parameters["gil_switch_interval_us"].string_value = str(so.gil_switch_interval_us)
        if phase_dir is not None:
            msg.parameters["phase_stats"].string_value = str(phase_dir)
        text = config_to_text(msg)
        parse_config(text)
        write_text_atomic(path, text)
        names.append(name)
    return names


# -- load ---------------------------------------------------------------------------------------
def _client(job: dict) -> dict:
    """One load-generator process: TritonBenchmark over gRPC, its result with every latency."""
    sys.path.insert(0, str(ROOT))
    from algorithm.serving.benchmark import TritonBenchmark
    from algorithm.serving.config import BenchmarkConfig

    cfg = BenchmarkConfig(**job["config"])
    try:
        r = TritonBenchmark(cfg).run(
            job["url"], job["model"], 1, job["seq_len"], concurrency=job["concurrency"]
        )
        out = r.to_dict(latencies=True)
    except Exception as e:
        res = getattr(e, "result", None)
        out = res.to_dict(latencies=True) if res is not None else {}
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    Path(job["result_path"]).write_text(json.dumps(out, default=str))
    return out


def load_point(
    url: str, model: str, concurrency: int, so: ServeOptions, codebook_sizes, mix: bool, seed: int
) -> dict:
    procs = max(1, math.ceil(concurrency / so.per_client))
    share = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    jobs = []
    for i, c in enumerate(share):
        config = {
            "triton_url": url,
            "concurrency": c,
            "num_requests": 1,
            "num_warmup_requests": so.warmup_requests,
            "measurement_window_s": so.window_s,
            "max_trials": so.trials,
            "stability_percent": 0.0,
            "timeout_s": so.timeout_s,
            "slo_p99_ms": so.slo_ms,
            "codebook_sizes": tuple(codebook_sizes),
            "seed": seed + i,
            "seq_len_distribution": "lognormal" if mix else "fixed",
            "seq_len_median": so.median,
            "seq_len_sigma": so.sigma,
            "seq_len_max": so.seq_len,
        }
        jobs.append(
            {
                "config": config,
                "url": url,
                "model": model,
                "concurrency": c,
                "seq_len": None if mix else so.seq_len,
            }
        )
    # separate interpreters (not multiprocessing: that would re-import the torch-heavy main script)
    with tempfile.TemporaryDirectory(prefix="ugt-load-") as tmp:
        running = []
        for i, job in enumerate(jobs):
            job["result_path"] = str(Path(tmp) / f"client{i}.json")
            running.append(
                subprocess.Popen(
                    [sys.executable, __file__, json.dumps(job)], stdout=subprocess.DEVNULL
                )
            )
        parts = []
        for job, proc in zip(jobs, running, strict=True):
            try:
                rc = proc.wait(timeout=so.window_s * so.trials + 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed after a timeout"
            path = Path(job["result_path"])
            parts.append(
                json.loads(path.read_text()) if path.is_file() else {"error": f"client exited {rc}"}
            )
    return merge(parts, concurrency, procs)


def merge(parts: list[dict], concurrency: int, procs: int) -> dict:
    errors = [p["error"] for p in parts if p.get("error")]
    lat = (
        np.concatenate([np.asarray(p.get("latencies_ms", []), dtype=np.float64) for p in parts])
        if parts
        else np.zeros(0)
    )
    out = {"concurrency": concurrency, "client_processes": procs}
    if errors:
        out["client_errors"] = errors[:3]
    if lat.size == 0:
        out["error"] = errors[0] if errors else "no successful request"
        return out
    gpus: dict[str, list] = {}
    for p in parts:
        for idx, g in (p.get("per_gpu") or {}).items():
            if g.get("utilization") is not None:
                gpus.setdefault(str(idx), []).append(g["utilization"])
    out.update(
        {
            "throughput": float(sum(p.get("throughput", 0.0) for p in parts)),
            "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()),
            "min_ms": float(lat.min()),
            "max_ms": float(lat.max()),
            "requests": int(lat.size),
            "failed": int(sum(p.get("failed_requests", 0) for p in parts)),
            "gpu_util_per_gpu": [float(np.mean(gpus[k])) for k in sorted(gpus, key=int)],
            "gpu_memory_used_mb": max((p.get("gpu_memory_used_mb") or 0) for p in parts),
            "client_cpu_percent": float(sum(p.get("client_cpu_percent", 0.0) for p in parts)),
            "seq_len_mean": float(np.mean([p.get("seq_len_mean", 0.0) for p in parts])),
            "server_breakdown_us": parts[0].get("server", {}),
            "batch_sizes_formed": parts[0].get("batch_sizes_formed", {}),
            "duration_s": float(np.mean([p.get("duration_s", 0.0) for p in parts])),
        }
    )
    return out


def phase_snapshot(phase_dir: Path | None, model: str) -> dict:
    """Summed host seconds per phase over the model's instances (model.py's phase_stats files)."""
    out = {"batches": 0, "requests": 0, "eager_runs": 0, "rounded_up": 0, "seconds": {}}
    if phase_dir is None:
        return out
    for f in phase_dir.glob(f"{model}_*.json"):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out["batches"] += d["batches"]
        out["requests"] += d["requests"]
        for k in ("eager_runs", "rounded_up"):
            out[k] += d.get(k, 0)
        for k, v in d["seconds"].items():
            out["seconds"][k] = out["seconds"].get(k, 0.0) + v
        for k, v in (d.get("launch_seconds") or {}).items():
            launch = out.setdefault("launch_seconds", {})
            launch[k] = launch.get(k, 0.0) + v
        if d.get("gc"):  # each instance is its own process: the collectors' passes add up
            g = out.setdefault("gc", {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]})
            for key in ("collections", "seconds"):
                g[key] = [x + y for x, y in zip(g[key], d["gc"][key], strict=True)]
    return out


def phase_delta(before: dict, after: dict) -> dict:
    """Host microseconds per request in each phase of execute() between two snapshots."""
    n = after["requests"] - before["requests"]
    if n <= 0:
        return {}
    us = {k: 1e6 * (v - before["seconds"].get(k, 0.0)) / n for k, v in after["seconds"].items()}
    # "infer" holds the GPU time of a blocking execute(); a pipelined one waits for a free slot
    # and (its second thread) for the GPU: waits, not host work. Its "send" is the response
    # senders' round trips summed over the send threads (reported apart: they run side by side)
    host = sum(v for k, v in us.items() if k not in ("infer", "wait_slot", "wait_gpu", "send"))
    batches = after["batches"] - before["batches"]
    # the launch's own steps (layout, stage_wait, run, event), per request
    launch = after.get("launch_seconds") or {}
    launch_us = {
        k: 1e6 * (v - (before.get("launch_seconds") or {}).get(k, 0.0)) / n
        for k, v in launch.items()
    }
    gc_a, gc_b = before.get("gc") or {}, after.get("gc") or {}
    gc_delta = None
    if gc_b:  # the collector's passes in this server's stubs over the point
        zero = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
        a = gc_a or zero
        gc_delta = {
            "collections": [
                y - x for x, y in zip(a["collections"], gc_b["collections"], strict=True)
            ],
            "ms": [
                round(1e3 * (y - x), 2) for x, y in zip(a["seconds"], gc_b["seconds"], strict=True)
            ],
        }
    return {
        "gc": gc_delta,
        "requests": n,
        "batches": batches,  # run on the GPU: with continuous batching, the merged ones
        "avg_gpu_batch": n / batches if batches > 0 else None,
        "eager_batches": after["eager_runs"] - before["eager_runs"],  # ran without a graph
        "rounded_up_batches": after["rounded_up"] - before["rounded_up"],  # in a larger graph
        "us_per_request": us,
        "host_us_per_request_outside_infer": host,
        "send_us_per_request_summed_over_threads": us.get("send"),
        "launch_us_per_request": launch_us or None,
    }


def throughput_at_p99(points: dict, prefix: str, slo: float) -> float | None:
    """Throughput where a load curve (its points in order of concurrency) crosses the P99 budget:
    linear between the last point within it and the next one past it; the last point's own
    throughput when every point is within it; None when none is."""
    curve = sorted(
        (p["concurrency"], p["p99_ms"], p["throughput"])
        for k, p in points.items()
        if k.startswith(prefix) and "error" not in p
    )
    for (_, p99_a, x_a), (_, p99_b, x_b) in zip(curve, curve[1:], strict=False):
        if p99_a <= slo < p99_b:
            return x_a + (x_b - x_a) * (slo - p99_a) / (p99_b - p99_a)
    within = [x for _, p99, x in curve if p99 <= slo]
    return within[-1] if within and curve[-1][1] <= slo else None


def _phase_dir(work: Path, tag: str, so: ServeOptions) -> Path | None:
    """A fresh folder for model.py's phase_stats files of one server (None when off)."""
    if not so.phase_stats:
        return None
    path = work / f"phases_{tag}"
    path.mkdir()
    return path


def best_under_slo(points: dict, prefix: str, slo: float) -> dict | None:
    ok = [
        (k, p)
        for k, p in points.items()
        if k.startswith(prefix) and "error" not in p and p["p99_ms"] <= slo
    ]
    if not ok:
        return None
    k, p = max(ok, key=lambda kp: kp[1]["throughput"])
    return {
        "point": k,
        "throughput": p["throughput"],
        "p99_ms": p["p99_ms"],
        "gpu_util_per_gpu": p["gpu_util_per_gpu"],
    }


POINT_OF = re.compile(r"(fixed\d+|mix_packed|mix_pad|mix)_c\d+")


def instance_summary(pts: dict, tag: str, so: ServeOptions, pad: bool) -> dict:
    """P99, req/s, GPU utilization and host us/request of one instance count's points."""
    keys = ("throughput", "p50_ms", "p99_ms", "gpu_util_per_gpu")
    out = {}
    for name, p in pts.items():
        # this server's points only: "{tag}_{load}_c{n}" (another variant's name may start with
        # this tag: "pipe" and "pipe_old_engine")
        if not POINT_OF.fullmatch(name[len(tag) + 1 :]) or not name.startswith(f"{tag}_"):
            continue
        if "error" in p:
            continue
        row = {k: p.get(k) for k in keys}
        row["host_us_per_request"] = p.get("host_phases", {}).get(
            "host_us_per_request_outside_infer"
        )
        row["avg_batch"] = p.get("server_breakdown_us", {}).get("avg_batch")
        row["avg_gpu_batch"] = p.get("host_phases", {}).get("avg_gpu_batch")  # merged ones
        for k in ("eager_batches", "rounded_up_batches"):
            row[k] = p.get("host_phases", {}).get(k)
        for k in ("python_loop_us", "cpu_steal_pct"):  # the host's speed: a noisy machine
            row[k] = p.get("host_check", {}).get(k)
        out[name[len(tag) + 1 :]] = row
    if pad:
        packed = best_under_slo(pts, f"{tag}_mix_packed", so.slo_ms)
        padded = best_under_slo(pts, f"{tag}_mix_pad", so.slo_ms)
        out["length_aware_over_pad_at_slo"] = (
            packed["throughput"] / padded["throughput"] if packed and padded else None
        )
        out["length_aware_over_pad_same_concurrency"] = {
            c: (
                pts.get(f"{tag}_mix_packed_c{c}", {}).get("throughput", 0)
                / max(pts.get(f"{tag}_mix_pad_c{c}", {}).get("throughput", 0), 1e-9)
            )
            for c in so.mix_levels
        }
    return out


def error_lines(message: str, limit: int = 25) -> list[str]:
    """The error lines of the server log a ServerError names ("full log <path>")."""
    import re

    m = re.search(r"full log (\S+?\.log)", message)
    if not m or not Path(m.group(1)).is_file():
        return []
    lines = Path(m.group(1)).read_text(errors="replace").splitlines()
    keep = [
        x for x in lines if x.startswith("E") or "Error" in x or "error" in x or "Traceback" in x
    ]
    return [x[:400] for x in keep[-limit:]]


# -- the host's own speed -------------------------------------------------------------------------
def _python_loop_us(n: int = 20000) -> float:
    """A fixed pure-Python workload, median of 5 (us): this host's Python speed right now."""
    times = []
    for _ in range(5):
        t = time.perf_counter()
        acc = 0
        for i in range(n):
            acc += i * i % 7
        times.append((time.perf_counter() - t) * 1e6)
    return float(np.median(times))


def _cpu_times() -> list[int] | None:
    """/proc/stat's aggregate cpu line (user nice system idle iowait irq softirq steal ...)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def host_check() -> dict:
    """How fast and how contended this host is now (a noisy VM shows here first)."""
    return {
        "python_loop_us": _python_loop_us(),
        "loadavg_1m": os.getloadavg()[0],
        "cpu_times": _cpu_times(),
    }


def host_check_delta(before: dict, after: dict) -> dict:
    """One point's host check: the Python loop before and after it (us; the same loop took
    ~600-900 us on this project's CPU machine), the load average after it, and the share of
    CPU time over the point that was busy and that the hypervisor stole (steal), in %."""
    out = {
        "python_loop_us": [round(before["python_loop_us"], 1), round(after["python_loop_us"], 1)],
        "loadavg_1m": round(after["loadavg_1m"], 2),
    }
    a, b = before["cpu_times"], after["cpu_times"]
    if a and b and len(a) == len(b) and len(a) >= 8:
        d = [y - x for x, y in zip(a, b, strict=True)]
        total = sum(d[:8]) or 1  # guest time is already counted in user
        out["cpu_busy_pct"] = round(100 * (total - d[3] - d[4]) / total, 1)
        out["cpu_steal_pct"] = round(100 * d[7] / total, 2)
    return out


# -- runs ---------------------------------------------------------------------------------------
def run_server(
    tag: str,
    repo: Path,
    points_spec,
    so: ServeOptions,
    cfg,
    log,
    elapsed,
    budget,
    out: dict,
    write,
    phase_dir: Path | None = None,
):
    """Start tritonserver on ``repo``, run ``points_spec`` [(name, model, concurrency, mix)]."""
    from algorithm.serving.triton.server import TritonServer

    t = time.monotonic()
    with TritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        startup_timeout_s=300,
        env=server_env(),
        log_dir=Path(tempfile.gettempdir()) / f"triton-{tag}",
    ) as server:
        out.setdefault("startup_s", {})[tag] = round(time.monotonic() - t, 1)
        log(f"[{tag}] tritonserver ready in {out['startup_s'][tag]} s at {server.grpc_url}")
        for i, (name, model, conc, mix) in enumerate(points_spec):
            if elapsed() > budget:
                out["points"][name] = {
                    "error": f"skipped: {elapsed():.0f}s past the {budget:.0f}s budget"
                }
                continue
            before = phase_snapshot(phase_dir, model)
            host_before = host_check()
            try:
                p = load_point(
                    server.grpc_url, model, conc, so, cfg.codebook_sizes, mix, seed=100 + i
                )
            except Exception as e:
                p = {"error": f"{type(e).__name__}: {e}"[:500]}
            # the stubs write their totals from execute(), at most twice a second: a point's
            # totals may miss its last 0.5 s of batches (the per-request ratios do not change)
            phases = phase_delta(before, phase_snapshot(phase_dir, model))
            if phases:
                p["host_phases"] = phases
            p["host_check"] = host_check_delta(host_before, host_check())
            out["points"][name] = p
            write()
            if "error" in p:
                log(f"[{tag}] {name}: ERROR {p['error'][:200]}")
            else:
                hp, hc = p.get("host_phases", {}), p["host_check"]
                host = hp.get("host_us_per_request_outside_infer")
                log(
                    f"[{tag}] {name}: {p['throughput']:.0f} req/s p50 {p['p50_ms']:.2f} p99 "
                    f"{p['p99_ms']:.2f} ms gpu {p['gpu_util_per_gpu']}"
                    + (f" host {host:.0f} us/req outside infer" if host is not None else "")
                    + (
                        f", of {hp['batches']} batches {hp['eager_batches']} without a graph"
                        f" and {hp['rounded_up_batches']} in a larger bucket's"
                        if hp
                        else ""
                    )
                    + f"; host python loop {hc['python_loop_us']} us,"
                    f" steal {hc.get('cpu_steal_pct')}%"
                )
        out.setdefault("server_log_tail", {})[tag] = server.log_tail(15)


def serve_part(
    args, device, model, engine_opts: dict, result: dict, write, log, elapsed, parts
) -> None:
    so = ServeOptions(**json.loads(args.server_config)) if args.server_config else ServeOptions()
    cfg = model.config
    if args.preset == "tiny":  # CPU check of every path: small everything
        so.seq_len, so.median = min(so.seq_len, 64), min(so.median, 16)
    cuda = device.type == "cuda"
    kind = "KIND_GPU" if cuda else "KIND_CPU"
    dtype = engine_opts.get("dtype", "bf16") if cuda else "fp32"
    # warmed shapes are captured at load; a shape first seen under load runs eagerly (no stall)
    engine = {
        **{k: v for k, v in engine_opts.items() if k != "layout"},
        "capture_new_shapes": False,
    }
    if not cuda:
        engine.update(dtype="fp32", varlen_kernel="auto")
    work = Path(tempfile.mkdtemp(prefix="ugt-gpu-serve-"))
    ckpt = work / "ugt.safetensors"
    model.save(ckpt)
    if "server" in parts:
        out = result["server"] = {
            "options": asdict(so),
            "engine": engine,
            "kind": kind,
            "points": {},
        }
        try:
            summ = {}
            variants = so.server_variants or [
                {"name": f"i{inst}", "instances": inst} for inst in so.server_instances
            ]
            for variant in variants:
                fields = {k: v for k, v in variant.items() if k != "name"}
                tag = variant["name"]
                so_i = ServeOptions(**{**asdict(so), **fields, "server_variants": []})
                inst = so_i.instances
                repo = work / f"repo_{tag}"
                phase_dir = _phase_dir(work, tag, so)
                models = ("packed", "pad") if inst in so.pad_instances else ("packed",)
                batchings = ("length_aware", "pad") if "pad" in models else ("length_aware",)
                write_repository(
                    repo, ckpt, engine, so_i, so.gpus, kind, cfg, dtype, batchings, phase_dir
                )
                spec = [
                    (f"{tag}_fixed{so.seq_len}_c{c}", "ugt_packed", c, False)
                    for c in so.fixed_levels
                ]
                spec += [
                    (f"{tag}_mix_{m}_c{c}", f"ugt_{m}", c, True)
                    for m in models
                    for c in so.mix_levels
                ]
                run_server(
                    tag, repo, spec, so_i, cfg, log, elapsed, args.budget_s, out, write, phase_dir
                )
                summ[tag] = instance_summary(out["points"], tag, so, "pad" in models)
            out["summary"] = summ
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"server part failed: {out['error']}")
        write()
    if "scaling" in parts:
        out = result["scaling"] = {
            "options": asdict(so),
            "engine": engine,
            "kind": kind,
            "points": {},
        }
        try:
            import torch

            ngpu = torch.cuda.device_count() if cuda else 1
            configs = [((0,), i) for i in so.scaling_instances]
            if ngpu >= 2:
                configs += [((0, 1), i) for i in so.scaling_instances]
            for gpus, inst in configs:
                tag = f"gpus{''.join(map(str, gpus))}_i{inst}"
                so_i = ServeOptions(**{**asdict(so), "instances": inst})
                repo = work / f"repo_{tag}"
                phase_dir = _phase_dir(work, tag, so)
                write_repository(
                    repo, ckpt, engine, so_i, gpus, kind, cfg, dtype, ("length_aware",), phase_dir
                )
                spec = [
                    (f"{tag}_mix_c{c * len(gpus)}", "ugt_packed", c * len(gpus), True)
                    for c in so.scaling_mix_levels
                ]
                spec += [
                    (
                        f"{tag}_fixed{so.seq_len}_c{c * len(gpus)}",
                        "ugt_packed",
                        c * len(gpus),
                        False,
                    )
                    for c in so.scaling_fixed_levels
                ]
                run_server(
                    tag, repo, spec, so_i, cfg, log, elapsed, args.budget_s, out, write, phase_dir
                )
            pts = out["points"]
            summ = {}
            for gpus, inst in configs:
                tag = f"gpus{''.join(map(str, gpus))}_i{inst}"
                for load in ("mix", f"fixed{so.seq_len}"):
                    summ[f"{tag}_{load}"] = best_under_slo(pts, f"{tag}_{load}_", so.slo_ms)
            most = max(so.scaling_instances)
            for load in ("mix", f"fixed{so.seq_len}"):
                one = max(
                    (
                        v
                        for k, v in summ.items()
                        if k.startswith("gpus0_") and k.endswith(load) and v
                    ),
                    key=lambda v: v["throughput"],
                    default=None,
                )
                two = max(
                    (
                        v
                        for k, v in summ.items()
                        if k.startswith("gpus01_") and k.endswith(load) and v
                    ),
                    key=lambda v: v["throughput"],
                    default=None,
                )
                summ[f"{load}_two_over_one_at_slo"] = (
                    two["throughput"] / one["throughput"] if one and two else None
                )
                # the same from each curve read at exactly the P99 budget (linear between the
                # two measured points around it): less sensitive to where the levels fall
                at = {
                    g: throughput_at_p99(pts, f"{g}_i{most}_{load}_", so.slo_ms)
                    for g in ("gpus0", "gpus01")[: 2 if ngpu >= 2 else 1]
                }
                summ[f"{load}_throughput_at_slo_interpolated"] = at
                if at.get("gpus0") and at.get("gpus01"):
                    summ[f"{load}_two_over_one_at_slo_interpolated"] = at["gpus01"] / at["gpus0"]
                # at the saturating load (the most each reached, whatever its P99)
                sat = {}
                for g in ("gpus0_", "gpus01_"):
                    cands = [
                        (k, p)
                        for k, p in pts.items()
                        if k.startswith(g) and f"_{load}_c" in k and "error" not in p
                    ]
                    if cands:
                        k, p = max(cands, key=lambda kp: kp[1]["throughput"])
                        sat[g.rstrip("_")] = {
                            "point": k,
                            "throughput": p["throughput"],
                            "p99_ms": p["p99_ms"],
                            "gpu_util_per_gpu": p["gpu_util_per_gpu"],
                        }
                summ[f"{load}_saturating"] = sat
                if len(sat) == 2:
                    summ[f"{load}_two_over_one_saturating"] = (
                        sat["gpus01"]["throughput"] / sat["gpus0"]["throughput"]
                    )
            out["summary"] = summ
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"[:2000]
            out["server_error_lines"] = error_lines(str(e))
            log(f"scaling part failed: {out['error']}\n" + "\n".join(out["server_error_lines"]))
        write()


if __name__ == "__main__":  # one load-generator process (see load_point)
    _client(json.loads(sys.argv[1]))
