"""`ugt-serving benchmark` and `ugt-serving demo` (the main job). Registered on ``cli.app`` on import."""

from __future__ import annotations

from pathlib import Path

import typer

from algorithm.serving.cli.app import (
    ADMIN_KEY_FILE_OPT,
    STATE,
    TLS_CA_OPT,
    TLS_CERT_OPT,
    TLS_KEY_OPT,
    app,
    client_security,
    console,
    emit,
    handle_errors,
    out,
    print_table,
    progress,
)
from algorithm.serving.config import check_output_path


def _numbers(field: str, values: list[str] | None, kind=int) -> tuple:
    """Repeatable and/or comma-separated numbers: --concurrency 1 --concurrency 4,16."""
    from algorithm.errors import ConfigError

    items = [t for v in values or [] for t in str(v).split(",") if t.strip()]
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise ConfigError(
            field, ",".join(items), f"comma-separated {kind.__name__}s, e.g. 1,4,16"
        ) from None


RESULT_COLUMNS = (
    "model",
    "point",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "ok/total",
    "failed",
    "rejected",
    "stable",
)


def load_config(
    *,
    url: str,
    protocol: str,
    warmup: int,
    requests: int,
    concurrency: list[str],
    mode: str,
    rates: str | None,
    seq_dist: str,
    seq_median: int,
    seq_sigma: float,
    seq_max: int | None,
    seq_hist: Path | None,
    window: float,
    max_trials: int,
    timeout: float,
    slo: float,
    admin_key_file: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    **more,
):
    """The BenchmarkConfig of the load options `benchmark` and `tune` share (``more``: the
    fields only one of them has)."""
    from algorithm.serving.config import BenchmarkConfig

    levels = _numbers("concurrency", concurrency)
    return BenchmarkConfig(
        triton_url=url,
        num_warmup_requests=warmup,
        num_requests=requests,
        concurrency=levels[0] if levels else 1,
        concurrency_levels=levels,
        protocol=protocol,
        mode=mode,
        request_rates=_numbers("rates", [rates] if rates else [], float),
        seq_len_distribution=seq_dist,
        seq_len_median=seq_median,
        seq_len_sigma=seq_sigma,
        seq_len_max=seq_max,
        seq_len_histogram_file=str(seq_hist) if seq_hist else None,
        measurement_window_s=window,
        max_trials=max_trials,
        timeout_s=timeout,
        slo_p99_ms=slo,
        admin_key_file=str(admin_key_file) if admin_key_file else None,
        **client_security(tls_ca, tls_cert, tls_key),
        **more,
    )


LOAD_OPTIONS = (
    "url", "protocol", "warmup", "requests", "concurrency", "mode", "rates", "seq_dist",
    "seq_median", "seq_sigma", "seq_max", "seq_hist", "window", "max_trials", "timeout", "slo",
    "admin_key_file", "tls_ca", "tls_cert", "tls_key",
)  # fmt: skip


def load_options(scope: dict) -> dict:
    """``load_config``'s arguments from a command's parameters (its ``locals()``)."""
    return {k: scope[k] for k in LOAD_OPTIONS}


def _result_rows(groups: list[tuple[str, dict]]) -> list[list]:
    rows = []
    for label, results in groups:
        for r in sorted(results.values(), key=lambda r: (r.batch_size, r.seq_length or 0, r.load)):
            rows.append(
                [
                    label,
                    r.key,
                    f"{r.throughput:.1f}",
                    f"{r.latency_p50:.2f}",
                    f"{r.latency_p90:.2f}",
                    f"{r.latency_p99:.2f}",
                    f"{r.latency_max:.2f}",
                    f"{r.successful_requests}/{r.total_requests}",
                    r.failed_requests,
                    r.rejected_requests,
                    "yes" if r.stable else f"no ({r.trials} windows)",
                ]
            )
    return rows


def _served_limits(url: str, protocol: str, model: str, timeout: float) -> dict:
    """max_batch_size and max_seq_length of ``model`` as the server has it (preflight), or {}
    when the server does not answer (the benchmark then says so with its own hint)."""
    try:
        if protocol == "http":
            import tritonclient.http as client_lib

            config = client_lib.InferenceServerClient(
                url, connection_timeout=timeout
            ).get_model_config(model)
        else:
            import tritonclient.grpc as client_lib

            config = client_lib.InferenceServerClient(url).get_model_config(
                model, as_json=True, client_timeout=timeout
            )["config"]
    except Exception:  # unreachable or unknown model: the benchmark's own check reports it
        return {}
    params = config.get("parameters", {}) or {}
    seq = (params.get("max_seq_length") or {}).get("string_value", "")
    return {
        "max_batch_size": int(config.get("max_batch_size", 0) or 0),
        "max_seq_length": int(seq) if str(seq).isdigit() else None,
    }


def _check_points(model: str, cfg, limits: dict) -> None:
    """A batch or history longer than the served model takes fails every request: say it now."""
    from algorithm.errors import ConfigError

    mbs = limits.get("max_batch_size")
    too_big = [b for b in cfg.test_batch_sizes if mbs and b > mbs]
    if too_big:
        raise ConfigError(
            "--batch-sizes",
            ",".join(map(str, cfg.test_batch_sizes)),
            f"sizes <= {mbs}, the max_batch_size of {model} on the server ({too_big} are larger)",
            hint=f"Use --batch-sizes up to {mbs}, or deploy the model with a larger --max-batch-size.",
        )
    msl = limits.get("max_seq_length")
    lengths = (
        list(cfg.test_seq_lengths) if cfg.seq_len_distribution == "fixed" else [cfg.seq_len_max]
    )
    too_long = [s for s in lengths if msl and s > msl]
    if too_long:
        option = "--seq-lengths" if cfg.seq_len_distribution == "fixed" else "--seq-max"
        raise ConfigError(
            option,
            ",".join(map(str, lengths)),
            f"lengths <= {msl}, the longest history {model} on the server accepts",
            hint=f"Use {option} up to {msl}, or deploy the model with a larger --max-seq-length.",
        )


def _print_gpu_table(groups: list[tuple[str, dict]]) -> None:
    """GPU utilization, memory peak and power per point, or why they were not measured."""
    rows = [(label, r) for label, results in groups for r in results.values()]
    if not any(r.gpu_samples for _, r in rows):
        notes = sorted({r.gpu_monitor_note for _, r in rows})
        out.print(f"GPU not measured: {'; '.join(notes)}", highlight=False)
        return

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    cells = [
        [
            label,
            r.key,
            num(r.gpu_utilization_avg, ".0f"),
            num(r.gpu_memory_peak_mb, ".0f"),
            num(r.power_consumption_avg_w, ".0f"),
            r.gpu_monitor or r.gpu_monitor_note,
        ]
        for label, r in rows
    ]
    columns = ("model", "point", "util %", "memory peak MB", "power W", "source")
    print_table("GPU (measured window)", columns, cells, left=2)


# -------------------------------------------------------------------------------- benchmark
@app.command()
@handle_errors
def benchmark(
    url: str = typer.Option(
        "localhost:8001", "--url", "-u", help="Server endpoint host:port (gRPC 8001, HTTP 8000)."
    ),
    model: str = typer.Option("ugt_recommend", "--model", "-m", help="Model name on the server."),
    requests: int = typer.Option(
        1000, "--requests", "-n", min=1, help="Minimum measured requests per load point."
    ),
    concurrency: list[str] = typer.Option(
        ["1"],
        "--concurrency",
        "-c",
        help="Requests in flight; repeat or comma-list to sweep (1,4,16).",
    ),
    batch_sizes: str = typer.Option(
        "1", "--batch-sizes", "-b", help="Histories per request, comma list."
    ),
    seq_lengths: str = typer.Option(
        "128", "--seq-lengths", "-s", help="History lengths (fixed distribution), comma list."
    ),
    mode: str = typer.Option(
        "concurrency", help="concurrency (closed loop) or request_rate (Poisson arrivals)."
    ),
    rates: str | None = typer.Option(None, help="Requests/s for --mode request_rate, comma list."),
    seq_dist: str = typer.Option(
        "fixed", help="fixed, uniform, lognormal, or histogram (--seq-hist)."
    ),
    seq_median: int = typer.Option(200, min=1, help="lognormal median length."),
    seq_sigma: float = typer.Option(0.8, min=0.0, help="lognormal sigma."),
    seq_min: int = typer.Option(1, min=1, help="Shortest history (uniform/lognormal/histogram)."),
    seq_max: int | None = typer.Option(
        None,
        min=1,
        help="Longest history (uniform/lognormal/histogram); default: the served model's.",
    ),
    codebook_sizes: str | None = typer.Option(
        None,
        help="Codebook sizes of the generated ids, e.g. 1024,4096,16384; default: the served model's.",
    ),
    seq_hist: Path | None = typer.Option(
        None, help='JSON {"lengths": [...], "counts": [...]} for --seq-dist histogram.'
    ),
    protocol: str = typer.Option("grpc", help="grpc or http (match the --url port)."),
    warmup: int = typer.Option(100, min=0, help="Warm-up requests (not measured)."),
    window: float = typer.Option(2.0, min=0.05, help="Measurement window in seconds."),
    max_trials: int = typer.Option(
        5, min=1, help="Most windows per point when it does not stabilize."
    ),
    stability: float = typer.Option(
        10.0, min=0.0, help="Stable when the last 3 windows agree within this %."
    ),
    timeout: float = typer.Option(
        10.0, min=0.001, help="Per-request timeout in seconds (counted as failed)."
    ),
    slo: float = typer.Option(
        30.0, min=0.001, help="P99 latency SLO in ms (report: highest load meeting it)."
    ),
    metrics_url: str | None = typer.Option(
        None, help="Server metrics page, e.g. http://localhost:8002/metrics (CPU/GPU use)."
    ),
    gpu_monitor: bool = typer.Option(
        False,
        "--gpu-monitor",
        help="Sample GPU utilization, memory and power per point (NVML here, the server's "
        "nv_gpu_* metrics when remote; install 'ugt-serving[gpu]').",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write report.md/.json/.csv and plots here."
    ),
    baseline: Path | None = typer.Option(None, help="Compare with an earlier run's report .json."),
    baseline_model: str | None = typer.Option(
        None, help="Compare with another model on the same server (same points)."
    ),
    admin_key_file: Path | None = ADMIN_KEY_FILE_OPT,
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
) -> None:
    """Measure a model on a live Triton server: latency percentiles, throughput, server breakdown."""
    from algorithm.errors import BenchmarkError, ConfigError
    from algorithm.serving.benchmark import GPUMonitoredBenchmark, TritonBenchmark

    base = None
    if baseline is not None and baseline_model is not None:
        raise ConfigError(
            "baseline", str(baseline), "either --baseline or --baseline-model, not both"
        )
    if output is not None:  # before minutes of measuring, not after
        check_output_path("--output", output)
    cfg = load_config(
        **load_options(locals()),
        test_batch_sizes=_numbers("batch_sizes", [batch_sizes]),
        test_seq_lengths=_numbers("seq_lengths", [seq_lengths]),
        seq_len_min=seq_min,
        stability_percent=stability,
        metrics_url=metrics_url,
        codebook_sizes=_numbers("codebook_sizes", [codebook_sizes]) if codebook_sizes else None,
    )
    if baseline is not None:
        from algorithm.serving.bench.report import load_report

        base, _, _ = load_report(baseline)  # a bad file fails now, not after the run
    models = [model] + ([baseline_model] if baseline_model else [])
    for name in models:
        _check_points(name, cfg, _served_limits(url, protocol, name, min(timeout, 5.0)))
    bench = (GPUMonitoredBenchmark if gpu_monitor else TritonBenchmark)(cfg)
    points = len(bench.plan_sweep()["points"])
    report_path = output / "report.md" if output is not None else None
    with progress() as p:
        task = p.add_task("Benchmarking", total=points * len(models))

        def on_event(event, info):
            if event == "window":
                p.update(
                    task,
                    description=f"{info['model']}: window {info['trial']} "
                    f"{info['throughput']:.0f} req/s, p99 {info['p99']:.1f} ms",
                )
            elif event == "sweep":
                p.update(
                    task,
                    description=f"{info['model']}: {info['total']} points, at least "
                    f"{info['min_seconds']:.0f} s",
                )
            elif event == "point":
                p.advance(task)

        bench.progress = on_event
        try:
            results = bench.run_sweep(url, model)
            if baseline_model:
                base = bench.run_sweep(url, baseline_model)
        except BenchmarkError as e:
            # Keep what was measured before the failure (a server that died mid-sweep).
            if report_path is not None and getattr(e, "results", None):
                bench.generate_report(e.results, report_path.with_name("partial-report.md"))
                e.hint = f"{e.hint} The points measured before it are in {report_path.parent}/partial-report.json."
            raise
    if report_path is not None:
        bench.generate_report(results, report_path, baseline=base)
    if STATE.json:
        emit(
            {
                "results": {k: r.to_dict() for k, r in results.items()},
                "baseline": {k: r.to_dict() for k, r in (base or {}).items()} or None,
                "report": str(report_path) if report_path else None,
            },
            "Benchmark",
        )
        return
    groups = [(model, results)] + (
        [(baseline_model or f"baseline ({baseline})", base)] if base else []
    )
    print_table(f"{model} @ {url} ({protocol})", RESULT_COLUMNS, _result_rows(groups), left=2)
    from algorithm.serving.bench.report import contract_text

    first = next(iter(results.values()))
    out.print(f"requests: {contract_text(first.request_contract)}", highlight=False)
    if gpu_monitor:
        _print_gpu_table(groups)
    if base:
        from algorithm.serving.bench.report import compare

        for row in compare(results, base):
            out.print(
                f"{row['key']}: throughput x{row['speedup']:.2f}, p99 {row['latency_p99']:.2f} vs "
                f"{row['baseline_latency_p99']:.2f} ms",
                highlight=False,
            )
    if report_path:
        out.print(f"report: {report_path} (+ .json, .csv, plots)", highlight=False)


# ------------------------------------------------------------------------------------- demo
@app.command()
@handle_errors
def demo(
    output: Path = typer.Option(
        Path("demo-output"), "--output", "-o", help="Folder for every artifact and the report."
    ),
    steps: int = typer.Option(
        1000, min=1, help="Training steps when no checkpoint is there to reuse."
    ),
    time_budget: float = typer.Option(
        180.0, min=0.0, help="Stop training after this many seconds."
    ),
    concurrency: list[str] = typer.Option(
        ["1,4,16"], "--concurrency", "-c", help="Load points (comma list)."
    ),
    seq_length: int = typer.Option(128, min=1, help="History length of the sweep."),
    window: float = typer.Option(1.0, min=0.05, help="Measurement window in seconds."),
    max_trials: int = typer.Option(5, min=1, help="Most windows per load point."),
    instances: int = typer.Option(2, min=1, help="Model instances per model (2 cores: 2)."),
    threads: int = typer.Option(
        1, min=0, help="Intra-op threads per instance (0 = runtime default)."
    ),
    baseline: bool = typer.Option(
        True, help="Also serve and measure PyTorch eager fp32 (the baseline)."
    ),
    fresh: bool = typer.Option(
        False, help="Rebuild the export and optimized artifacts even when up to date."
    ),
    record_dir: Path | None = typer.Option(
        None, help="Also write cpu_serving-<date>.json here (e.g. benchmarks/results)."
    ),
) -> None:
    """The main job: train/reuse -> export -> optimize -> repository -> Triton -> benchmark -> report."""
    from algorithm.serving.demo import STAGES, DemoConfig, run_demo

    check_output_path("--output", output)
    if record_dir is not None:
        check_output_path("--record-dir", record_dir)

    cfg = DemoConfig(
        output=str(output),
        train_steps=steps,
        train_time_budget_s=time_budget or None,
        concurrency_levels=_numbers("concurrency", concurrency),
        seq_length=seq_length,
        measurement_window_s=window,
        max_trials=max_trials,
        instance_count=instances,
        runtime_threads=threads,
        baseline=baseline,
        fresh=fresh,
        record_dir=str(record_dir) if record_dir else None,
    )
    names = {
        "checkpoint": "Checkpoint",
        "export": "Export + parity",
        "optimize": "Optimize + accuracy gate",
        "repository": "Model repository",
        "server": "Start tritonserver",
        "benchmark": "Benchmark",
        "report": "Report",
    }
    with progress() as p:
        tasks = {s: p.add_task(f"{names[s]}", total=None, start=False) for s in STAGES}

        def on_stage(stage, completed, total, message):
            task = tasks[stage]
            p.start_task(task)
            for prev in STAGES[: STAGES.index(stage)]:  # earlier stages are done
                t = p.tasks[tasks[prev]]
                if not t.finished:
                    p.update(tasks[prev], total=t.total or 1, completed=t.total or 1)
            fields = {"description": f"{names[stage]}: {message}" if message else names[stage]}
            if total is not None:
                fields.update(total=total, completed=completed or 0)
            p.update(task, **fields)

        summary = run_demo(cfg, on_stage)
        for t in p.tasks:
            p.update(t.id, total=t.total or 1, completed=t.total or 1)
    if STATE.json:
        emit(summary, "Demo")
        return
    print_table(
        f"UGT tiny on Triton (CPU), batch 1, seq_len {seq_length}",
        ("model", "concurrency", "req/s", "p50 ms", "p99 ms", "ok/total", "stable"),
        [
            [
                r["model"],
                r["concurrency"],
                f"{r['throughput']:.1f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['ok']}/{r['total']}",
                "yes" if r["stable"] else "no",
            ]
            for r in summary["rows"]
        ],
    )
    chosen = summary["optimization"]["chosen"]
    goals = summary["goals"]
    facts = {
        "served artifact": f"{chosen['backend']} {chosen['precision']} (recall@K overlap "
        f"{chosen['recall_overlap']})"
    }
    training = summary.get("training", {})
    if "steps" in training:
        recall = next((v for k, v in training.items() if k.startswith("heldout_recall")), None)
        chance = next((v for k, v in training.items() if k.startswith("chance_recall")), None)
        facts["checkpoint trained"] = (
            f"{training['steps']} steps, held-out recall@K {recall} (chance {chance})"
        )
    if "p99_ms_at_lowest_concurrency" in goals:
        facts["goal: P99 < 15 ms at the lowest concurrency"] = (
            f"{goals['p99_ms_at_lowest_concurrency']:.2f} ms: {'met' if goals['p99_under_15ms'] else 'NOT met'}"
        )
    if "speedup_at_highest_concurrency" in goals:
        facts["goal: >= 3x baseline throughput at the highest concurrency"] = (
            f"x{goals['speedup_at_highest_concurrency']:.2f}: {'met' if goals['speedup_at_least_3x'] else 'NOT met'}"
        )
    facts.update({k: v for k, v in summary["paths"].items() if k != "plots"})
    facts["plots"] = f"{len(summary['paths']['plots'])} PNG files in {output}"
    facts["time"] = (
        f"{summary['seconds']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in summary['stage_seconds'].items())})"
    )
    emit(facts, "Summary")
    console.print(f"open {summary['paths']['report']}", highlight=False)
