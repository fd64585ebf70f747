"""The main job (`ugt-serving demo`, `make run`): checkpoint -> live, measured Triton server.

Stages: train (or reuse) the tiny checkpoint; export it to ONNX with the parity check; optimize
it for CPU behind the accuracy gate (every candidate backend/precision that passes is timed
in-process and the fastest is served; near-ties go to the more exact one); write one model
repository with the optimized model (python backend, ONNX Runtime, KIND_CPU) and the baseline
(the same weights in PyTorch eager fp32, python backend); start the real tritonserver; sweep
both models at the same load points; write the report (markdown, JSON, CSV, plots) and stop
the server.

The library never prints: ``progress(stage, completed, total, message)`` reports every stage.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from algorithm.errors import CheckpointError, ConfigError, ParityError
from algorithm.fsutil import write_json
from algorithm.serving.config import BenchmarkConfig, ExportConfig, TritonConfig
from algorithm.serving.contract import accuracy_report_path, parity_report_path

logger = logging.getLogger(__name__)

STAGES = ("checkpoint", "export", "optimize", "repository", "server", "benchmark", "report")
ProgressFn = Callable[[str, float | None, float | None, str], None]


@dataclass
class DemoConfig:
    output: str = "demo-output"
    model_name: str = "ugt_tiny"
    baseline_name: str = "ugt_tiny_torch_eager"
    train_steps: int = 1000
    train_time_budget_s: float = 180.0
    # (backend, precision) candidates, most exact first; each must pass the accuracy gate, and a
    # later one replaces the current choice only when it is at least 5% faster
    candidates: tuple[tuple[str, str], ...] = (("onnxruntime", "fp32"), ("onnxruntime", "int8"))
    baseline: bool = True  # also serve and measure PyTorch eager fp32
    fresh: bool = False  # rebuild the export/artifacts even when up to date
    # serving on 2 cores: one instance per core with one runtime thread each beat one instance
    # with two threads (intra-op threads do little for batch-1 work; two instances overlap the
    # python backend's per-execution overhead). Batching does not lower this model's per-row
    # cost on CPU (the beam heads dominate), so the batcher waits only briefly.
    instance_count: int = 2
    runtime_threads: int = 1
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    max_batch_size: int = 64
    # the sweep
    concurrency_levels: tuple[int, ...] = (1, 4, 16)
    batch_size: int = 1
    seq_length: int = 128
    measurement_window_s: float = 1.0
    max_trials: int = 5
    num_requests: int = 100
    num_warmup_requests: int = 50
    slo_p99_ms: float = 30.0
    record_dir: str | None = None  # also write <record_dir>/cpu_serving-<stamp>.json
    extra: dict = field(default_factory=dict)  # free-form notes recorded in the report

    def __post_init__(self):
        if not self.concurrency_levels:
            raise ConfigError("concurrency_levels", self.concurrency_levels, "at least one level")
        if not self.candidates:
            raise ConfigError("candidates", self.candidates, "at least one (backend, precision)")


class Demo:
    """Runs the stages; ``run()`` returns the summary (also written as summary.json)."""

    def __init__(self, config: DemoConfig | None = None, progress: ProgressFn | None = None):
        self.config = config or DemoConfig()
        self.progress = progress or (lambda *a: None)
        self.out = Path(self.config.output)
        self.times: dict[str, float] = {}

    def _stage(self, name: str, completed=None, total=None, message: str = ""):
        self.progress(name, completed, total, message)

    def _timed(self, name: str, fn, *args):
        t0 = time.monotonic()
        self._stage(name, 0, None, "started")
        result = fn(*args)
        self.times[name] = round(time.monotonic() - t0, 1)
        return result

    def run(self) -> dict:
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        model, ckpt, train_report = self._timed("checkpoint", self.checkpoint)
        onnx_path = self._timed("export", self.export, model, ckpt)
        artifact, chosen = self._timed("optimize", self.optimize, model, onnx_path)
        repo, server_cfg = self._timed("repository", self.repository, model, artifact, ckpt)
        from algorithm.serving.triton.server import TritonServer

        server = self._timed("server", self.start_server, TritonServer, repo)
        try:
            results, baseline = self._timed("benchmark", self.benchmark, server)
        finally:
            server.stop()
        summary = self._timed(
            "report",
            self.report,
            results,
            baseline,
            chosen,
            server_cfg,
            train_report,
            ckpt,
            onnx_path,
            artifact,
            repo,
        )
        summary["seconds"] = round(time.monotonic() - t0, 1)
        summary["stage_seconds"] = self.times
        write_json(self.out / "summary.json", summary)
        return summary

    # -- stages ------------------------------------------------------------------------------
    def checkpoint(self):
        from algorithm.ugt import TrainConfig, UGTConfig, UGTModel, train_tiny

        path = self.out / "ugt_tiny.safetensors"
        if path.is_file():
            try:
                model = UGTModel.load(path)
                self._stage("checkpoint", 1, 1, f"reused {path}")
                return model.eval(), path, {"reused": str(path)}
            except (CheckpointError, OSError, ValueError) as e:
                logger.warning("checkpoint %s unusable (%s); training a new one", path, e)
        cfg = self.config
        tc = TrainConfig(steps=cfg.train_steps, time_budget_s=cfg.train_time_budget_s)

        def on_step(step, total, loss):
            if step % 10 == 0 or step == total:
                self._stage("checkpoint", step, total, f"training, loss {loss:.2f}")

        model, report = train_tiny(UGTConfig.tiny(), tc, on_step)
        model.save(path)
        self._stage("checkpoint", 1, 1, f"trained {report['steps']} steps")
        return model.eval(), path, report

    def export_config(self, model, precision: str = "fp32") -> ExportConfig:
        return ExportConfig.for_model(
            model,
            model_name=self.config.model_name,
            precision=precision,
            max_batch_size=self.config.max_batch_size,
        )

    def export(self, model, ckpt: Path) -> Path:
        from algorithm.serving import pipeline

        path = self.out / "model.onnx"
        parity = parity_report_path(path)
        if not self.config.fresh and _newer(path, ckpt) and parity.is_file():
            self._stage("export", 1, 1, f"reused {path} (newer than the checkpoint)")
            return path
        self._stage("export", 0, 1, "torch -> ONNX, parity vs PyTorch")
        pipeline.export(model, self.export_config(model), path)
        worst = json.loads(parity.read_text())["worst"] if parity.is_file() else {}
        self._stage(
            "export", 1, 1, f"parity recall {worst.get('recall_overlap', float('nan')):.3f}"
        )
        return path

    def optimize(self, model, onnx_path: Path) -> tuple[Path, dict]:
        """Every candidate behind the accuracy gate, timed in-process; returns the one to serve."""
        from algorithm.serving import pipeline
        from algorithm.serving.backends import get_backend

        passed, refused = [], []
        n = len(self.config.candidates)
        for i, (backend, precision) in enumerate(self.config.candidates):
            self._stage("optimize", i, n, f"{backend} {precision}")
            folder = self.out / "optimized" / f"{backend}_{precision}"
            artifact = folder / get_backend(backend).artifact_name
            accuracy = accuracy_report_path(artifact)
            try:
                reusable = _newer(artifact, onnx_path) and _newer_than_backends(artifact)
                if self.config.fresh or not (reusable and accuracy.is_file()):
                    artifact = pipeline.optimize(
                        model, onnx_path, backend, self.export_config(model, precision), artifact
                    )
            except ParityError as e:
                refused.append(
                    {"backend": backend, "precision": precision, "reason": str(e).splitlines()[0]}
                )
                continue
            worst = json.loads(accuracy.read_text()).get("worst", {}) if accuracy.is_file() else {}
            timing = _time_runner(get_backend(backend).runtime, artifact, self.config)
            passed.append(
                {
                    "backend": backend,
                    "precision": precision,
                    "artifact": str(artifact),
                    "recall_overlap": worst.get("recall_overlap"),
                    "max_score_diff": worst.get("max_score_diff"),
                    **timing,
                }
            )
        if not passed:
            raise ParityError(
                "no optimized artifact passed the accuracy gate: "
                + "; ".join(r["reason"] for r in refused),
                {"refused": refused},
                hint="Train longer or add fp32 to the candidates.",
            )
        # Candidates are listed most exact first: a later one must be clearly faster (5%) to be
        # served, so timing noise never trades accuracy for nothing (int8 ties fp32 on this CPU).
        best = passed[0]
        for c in passed[1:]:
            if c["score_ms"] < 0.95 * best["score_ms"]:
                best = c
        self._stage("optimize", n, n, f"serving {best['backend']} {best['precision']}")
        return Path(best["artifact"]), {"chosen": best, "candidates": passed, "refused": refused}

    def triton_config(self, runtime: str) -> TritonConfig:
        c = self.config
        return TritonConfig(
            platform="python",
            python_runtime=runtime,
            instance_kind="KIND_CPU",
            gpus=(),
            instance_count=c.instance_count,
            runtime_threads=c.runtime_threads,
            max_queue_delay_us=c.max_queue_delay_us,
            preferred_batch_sizes=c.preferred_batch_sizes,
        )

    def repository(self, model, artifact: Path, ckpt: Path):
        from algorithm.serving.pipeline import publish

        repo = self.out / "model_repository"
        if repo.exists():
            shutil.rmtree(repo)
        ec = self.export_config(model)
        tc = self.triton_config("onnxruntime")
        publish(repo, ec, tc, artifact, version=1)
        served = {
            self.config.model_name: {
                "runtime": "onnxruntime",
                "artifact": str(artifact),
                **tc.to_dict(),
            }
        }
        if self.config.baseline:
            tb = self.triton_config("torch")
            publish(repo, ec.replace(model_name=self.config.baseline_name), tb, ckpt, version=1)
            served[self.config.baseline_name] = {
                "runtime": "torch (PyTorch eager fp32)",
                "artifact": str(ckpt),
                **tb.to_dict(),
            }
        self._stage("repository", 1, 1, f"{repo} ({', '.join(served)})")
        return repo, served

    def start_server(self, server_cls, repo: Path):
        env = {}
        if self.config.runtime_threads:
            # model.py passes `threads` to runners that take it (ONNX Runtime, OpenVINO); PyTorch
            # reads its intra-op thread count from here, so the baseline gets the same threads.
            env = {
                v: str(self.config.runtime_threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
            }
        logs = self.out / "logs"
        server = server_cls(repo, http_port=0, grpc_port=0, metrics_port=0, log_dir=logs, env=env)
        server.start()
        self._stage("server", 1, 1, f"ready: grpc {server.grpc_url}")
        return server

    def benchmark_config(self, metrics_url: str | None) -> BenchmarkConfig:
        c = self.config
        return BenchmarkConfig(
            num_warmup_requests=c.num_warmup_requests,
            num_requests=c.num_requests,
            concurrency_levels=c.concurrency_levels,
            test_batch_sizes=(c.batch_size,),
            test_seq_lengths=(c.seq_length,),
            measurement_window_s=c.measurement_window_s,
            max_trials=c.max_trials,
            slo_p99_ms=c.slo_p99_ms,
            metrics_url=metrics_url,
        )

    def benchmark(self, server):
        from algorithm.serving.benchmark import TritonBenchmark

        c = self.config
        models = [c.model_name] + ([c.baseline_name] if c.baseline else [])
        total = len(models) * len(c.concurrency_levels)
        done = [0]

        def on_event(event, info):
            if event == "point":
                done[0] += 1
                r = info["result"]
                self._stage(
                    "benchmark",
                    done[0],
                    total,
                    f"{info['model']} c={r.concurrency}: {r.throughput:.0f} req/s, p99 {r.latency_p99:.1f} ms",
                )
            elif event == "window":
                self._stage(
                    "benchmark",
                    done[0],
                    total,
                    f"{info['model']} window {info['trial']}: {info['throughput']:.0f} req/s",
                )

        bench = TritonBenchmark(
            self.benchmark_config(server.metrics_url),
            progress=on_event,
            server_pid=server.process.pid,
        )
        self._stage("benchmark", 0, total, f"{c.model_name} c={c.concurrency_levels[0]}")
        results = bench.run_sweep(server.grpc_url, c.model_name)
        baseline = bench.run_sweep(server.grpc_url, c.baseline_name) if c.baseline else None
        return results, baseline

    def report(
        self, results, baseline, chosen, served, train_report, ckpt, onnx_path, artifact, repo
    ) -> dict:
        from algorithm.serving.bench.report import write_report

        c = self.config
        meta = {
            "device": "CPU (python backend, KIND_CPU)",
            "server_config": "; ".join(
                f"{name}: {s['runtime']}, {s['instance_count']} instance(s) x {s['runtime_threads'] or 'default'} "
                f"thread(s), dynamic batching {list(s['preferred_batch_sizes'])} delay {s['max_queue_delay_us']} us"
                for name, s in served.items()
            ),
            "note": f"served artifact: {chosen['chosen']['backend']} {chosen['chosen']['precision']}; "
            f"baseline: the same checkpoint in PyTorch eager fp32 on the same server and load",
        }
        path = self.out / "report.md"
        write_report(
            results,
            path,
            baseline=baseline,
            config=self.benchmark_config(None),
            title="UGT tiny served by Triton on CPU: optimized vs PyTorch eager",
            meta=meta,
        )
        rows = []
        for label, rs in ((c.model_name, results), (c.baseline_name, baseline or {})):
            for r in sorted(rs.values(), key=lambda r: r.load):
                rows.append(
                    {
                        "model": label,
                        "concurrency": r.concurrency,
                        "throughput": r.throughput,
                        "p50_ms": r.latency_p50,
                        "p99_ms": r.latency_p99,
                        "ok": r.successful_requests,
                        "total": r.total_requests,
                        "stable": r.stable,
                    }
                )
        summary = {
            "rows": rows,
            "goals": self._goals(results, baseline),
            "optimization": chosen,
            "served": served,
            "training": train_report,
            "paths": {
                "checkpoint": str(ckpt),
                "onnx": str(onnx_path),
                "artifact": str(artifact),
                "repository": str(repo),
                "report": str(path),
                "json": str(path.with_suffix(".json")),
                "csv": str(path.with_suffix(".csv")),
                "plots": sorted(str(p) for p in self.out.glob("report_*.png")),
            },
        }
        if c.record_dir:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            record = Path(c.record_dir) / f"cpu_serving-{stamp}.json"
            data = json.loads(path.with_suffix(".json").read_text())
            data["demo"] = {k: v for k, v in summary.items() if k != "paths"}
            write_json(record, data)
            summary["paths"]["record"] = str(record)
        self._stage("report", 1, 1, str(path))
        return summary

    def _goals(self, results, baseline) -> dict:
        c = self.config
        key = f"bs{c.batch_size}_seq{c.seq_length}_c"
        goals = {}
        r1 = results.get(f"{key}{min(c.concurrency_levels)}")
        if r1 is not None:
            goals["p99_ms_at_lowest_concurrency"] = r1.latency_p99
            goals["p99_under_15ms"] = bool(r1.latency_p99 < 15.0)
        top = max(c.concurrency_levels)
        ours, base = results.get(f"{key}{top}"), (baseline or {}).get(f"{key}{top}")
        if ours is not None and base is not None and base.throughput > 0:
            goals["speedup_at_highest_concurrency"] = ours.throughput / base.throughput
            goals["speedup_at_least_3x"] = bool(ours.throughput >= 3 * base.throughput)
        return goals


# ----------------------------------------------------------------------------------- helpers
def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def _newer_than_backends(path: Path) -> bool:
    """True when ``path`` is newer than every optimizer source file (a rewrite may have changed)."""
    from algorithm.serving import backends

    return all(_newer(path, f) for f in Path(backends.__file__).parent.glob("*.py"))


def _time_runner(runtime: str, artifact: Path, config: DemoConfig, budget_s: float = 1.5) -> dict:
    """In-process median latency of a candidate at batch 1 and batch 16 (seq_len of the sweep).

    score = batch-1 latency + per-sample time at batch 16: one number for the two goals
    (latency at low load, throughput under dynamic batching)."""
    from algorithm.serving.runtime import create_runner
    from algorithm.ugt.data import random_inputs

    opts = {"intra_op_threads": config.runtime_threads} if runtime == "onnxruntime" else {}
    if runtime == "openvino":
        opts = {"threads": config.runtime_threads}
    runner = create_runner(runtime, artifact, **opts)
    out = {}
    for batch in (1, 16):
        x = random_inputs(batch, config.seq_length, rng=np.random.default_rng(batch))
        runner.infer(x)
        times, t_end = [], time.monotonic() + budget_s
        while len(times) < 5 or (time.monotonic() < t_end and len(times) < 200):
            t = time.perf_counter()
            runner.infer(x)
            times.append((time.perf_counter() - t) * 1e3)
        out[f"batch{batch}_ms"] = float(np.median(times))
    out["score_ms"] = out["batch1_ms"] + out["batch16_ms"] / 16
    return out


def run_demo(config: DemoConfig | None = None, progress: ProgressFn | None = None) -> dict:
    """The main job; returns the summary dict (rows, goals, paths). Raises ServingError subclasses."""
    return Demo(config, progress).run()
