"""Benchmark reports: markdown, JSON, CSV and matplotlib PNG plots, with an optional baseline.

``write_report(results, "out/report.md", baseline=other)`` writes ``report.md`` and beside it
``report.json`` (everything, loadable with ``load_report``), ``report.csv`` (one row per load
point) and ``report_*.png``: latency percentiles against load, the throughput-latency curve
with the SLO line and the highest load that meets it, a latency histogram, bars per batch size
and per seq_len, and the server-side breakdown. A baseline (another model or an earlier run)
is drawn beside the results and compared point by point (same batch, seq_len and load).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import logging
import os
import platform
from pathlib import Path

from algorithm.errors import BenchmarkError, InputFileNotFoundError
from algorithm.fsutil import make_dirs, write_atomic, write_json
from algorithm.serving.bench.result import (
    BenchmarkResult,
    group_key,
    group_label,
    groups,
)
from algorithm.serving.config import BenchmarkConfig, check_output_path

logger = logging.getLogger(__name__)

CSV_FIELDS = (
    "label",
    "key",
    "model_name",
    "mode",
    "batch_size",
    "seq_length",
    "seq_len_distribution",
    "seq_len_mean",
    "concurrency",
    "request_rate",
    "achieved_concurrency",
    "achieved_rate",
    "throughput",
    "samples_per_s",
    "latency_p50",
    "latency_p90",
    "latency_p95",
    "latency_p99",
    "latency_avg",
    "latency_min",
    "latency_max",
    "total_requests",
    "successful_requests",
    "failed_requests",
    "rejected_requests",
    "timed_out_requests",
    "duration_s",
    "trials",
    "stable",
    "queue_us",
    "compute_input_us",
    "compute_infer_us",
    "compute_output_us",
    "request_us",
    "avg_batch",
    "client_overhead_ms",
    "rpc_floor_ms",
    "client_cpu_percent",
    "server_cpu_percent",
    "server_cpu_ms_per_request",
    "other_cpu_percent",
    "host_cpu_utilization",
    "host_load_average",
    "gpu_utilization",
    "gpu_memory_used_mb",
    "gpu_utilization_avg",
    "gpu_memory_peak_mb",
    "power_consumption_avg_w",
    "energy_j",
)


# ------------------------------------------------------------------------------- environment
def environment() -> dict:
    """Where and with what the numbers were measured (date, host, CPU, load, versions)."""
    from importlib import metadata

    versions = {}
    for pkg in ("tritonclient", "nvidia-pytriton", "onnxruntime", "torch", "openvino", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
    }
    with contextlib.suppress(OSError):  # not on every OS
        env["load_average_1m"] = round(os.getloadavg()[0], 2)
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slo_max_load(results: dict[str, BenchmarkResult], slo_ms: float) -> dict[str, dict]:
    """Per (batch, seq_len): the highest load whose P99 <= ``slo_ms`` with no failed request."""
    out = {}
    for g, rs in groups(results).items():
        ok = [
            r
            for r in rs
            if r.successful_requests and r.latency_p99 <= slo_ms and not r.failed_requests
        ]
        best = max(ok, key=lambda r: r.load) if ok else None
        out[group_label(g)] = {
            "slo_p99_ms": slo_ms,
            "max_load": best.load if best else None,
            "mode": g[2],
            "throughput": best.throughput if best else None,
            "latency_p99": best.latency_p99 if best else None,
        }
    return out


def compare(
    results: dict[str, BenchmarkResult], baseline: dict[str, BenchmarkResult]
) -> list[dict]:
    """Point-by-point comparison where both have the same batch, seq_len and load."""
    rows = []
    for key, r in results.items():
        b = baseline.get(key)
        if b is None:
            continue
        cost, base_cost = r.server_cpu_ms_per_request, b.server_cpu_ms_per_request
        rows.append(
            {
                "key": key,
                "throughput": r.throughput,
                "baseline_throughput": b.throughput,
                "speedup": r.throughput / b.throughput if b.throughput > 0 else None,
                "latency_p50": r.latency_p50,
                "baseline_latency_p50": b.latency_p50,
                "latency_p99": r.latency_p99,
                "baseline_latency_p99": b.latency_p99,
                "p99_ratio": b.latency_p99 / r.latency_p99 if r.latency_p99 > 0 else None,
                # server CPU per request: what a CPU-bound server's throughput ratio is on an idle host
                "server_cpu_ms_per_request": cost,
                "baseline_server_cpu_ms_per_request": base_cost,
                "cpu_cost_ratio": base_cost / cost if cost and base_cost else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------------- files
def _csv_row(label: str, r: BenchmarkResult) -> dict:
    d = r.to_dict()
    d.update(r.server)
    d["label"] = label
    d["samples_per_s"] = r.throughput * r.batch_size
    return {k: d.get(k, "") for k in CSV_FIELDS}


def _label(results: dict[str, BenchmarkResult], fallback: str) -> str:
    names = sorted({r.model_name for r in results.values() if r.model_name})
    return ", ".join(names) or fallback


def write_report(
    results: dict[str, BenchmarkResult],
    path,
    baseline: dict[str, BenchmarkResult] | None = None,
    config: BenchmarkConfig | None = None,
    title: str | None = None,
    label: str | None = None,
    baseline_label: str | None = None,
    meta: dict | None = None,
    plots: bool = True,
) -> str:
    """Write the markdown report at ``path`` plus .json, .csv and PNGs beside it; return the text."""
    if not results:
        raise BenchmarkError("no benchmark results to report", hint="Run a benchmark first.")
    path = Path(path)
    check_output_path("report folder", path.parent)
    make_dirs(path.parent)
    config = config or BenchmarkConfig()
    label = label or _label(results, "results")
    baseline_label = baseline_label or (_label(baseline, "baseline") if baseline else None)
    if baseline and baseline_label == label:
        baseline_label = f"{baseline_label} (baseline)"
    env = {**environment(), **(meta or {})}
    slo = slo_max_load(results, config.slo_p99_ms)
    slo_base = slo_max_load(baseline, config.slo_p99_ms) if baseline else None
    comparison = compare(results, baseline) if baseline else []
    stem = path.with_suffix("")
    data = {
        "meta": env,
        "config": config.to_dict(),
        "label": label,
        "results": {k: r.to_dict() for k, r in results.items()},
        "slo": slo,
        "baseline": {
            "label": baseline_label,
            "results": {k: r.to_dict() for k, r in baseline.items()},
            "slo": slo_base,
        }
        if baseline
        else None,
        "comparison": comparison,
        "plots": [],
    }
    # The measurements first: whatever fails later (a plot, the markdown), the JSON and CSV hold
    # every number.
    write_json(stem.with_suffix(".json"), data)
    rows = io.StringIO()
    w = csv.DictWriter(rows, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in results.values():
        w.writerow(_csv_row(label, r))
    for r in (baseline or {}).values():
        w.writerow(_csv_row(baseline_label, r))
    write_atomic(stem.with_suffix(".csv"), rows.getvalue())
    images = []
    if plots:
        from algorithm.serving.bench.plots import draw_all

        images = draw_all(results, baseline, label, baseline_label, config.slo_p99_ms, slo, stem)
        data["plots"] = [p.name for p in images]
        write_json(stem.with_suffix(".json"), data)
    text = render_markdown(data, results, baseline, config, title)
    write_atomic(path, text)
    logger.info("wrote %s (+ .json, .csv, %d plots)", path, len(images))
    return text


def load_report(path) -> tuple[dict[str, BenchmarkResult], dict[str, BenchmarkResult] | None, dict]:
    """(results, baseline or None, whole JSON) from a report's .json (or the .md beside it)."""
    p = Path(path)
    if p.suffix != ".json":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise InputFileNotFoundError(
            f"benchmark JSON not found: {p}",
            hint="Pass the .json written by `ugt-serving benchmark --output`.",
        )
    try:
        data = json.loads(p.read_text())
        results = {k: BenchmarkResult.from_dict(v) for k, v in data["results"].items()}
        base = data.get("baseline") or None
        baseline = (
            {k: BenchmarkResult.from_dict(v) for k, v in base["results"].items()} if base else None
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BenchmarkError(
            f"{p} is not a benchmark report JSON: {e}",
            hint="Pass the .json written by `ugt-serving benchmark --output`.",
        ) from e
    return results, baseline, data


# ---------------------------------------------------------------------------------- markdown
def measurement_rule(config: BenchmarkConfig) -> str:
    """The stopping rule in words, as ``TritonBenchmark._measure`` applies it."""
    return (
        f"warm-up {config.num_warmup_requests} requests excluded; then windows of "
        f"{config.measurement_window_s:g} s until at least {config.num_requests} requests are "
        f"measured and either the last 3 windows agree within {config.stability_percent:g}% "
        f"(stable) or {config.max_trials} windows have run (not stable; windows go on past "
        f"{config.max_trials} while fewer than {config.num_requests} requests are measured); "
        f"timeout {config.timeout_s:g} s"
    )


def load_label(load, mode: str) -> str:
    """A load level as the user set it: concurrency 4 (not 4.00), or 12.5/s."""
    if load is None:
        return "-"
    if mode == "request_rate":
        return f"{load:g}/s"
    return str(int(load))


def _f(v, digits: int = 2) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v == v else "nan"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return lines


_SERVER_US = ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us", "request_us")


def _ms(v) -> str | None:
    return None if v is None else f"{v:.3f}"


def outside_triton_ms(r: BenchmarkResult) -> float | None:
    """Client latency not spent in Triton's queue or compute (ms, >= 0), or None without the
    server's statistics. The two averages cover the same requests (the statistics delta spans
    exactly the measured ones); rounding of Triton's ns counters can leave a hair below 0."""
    s = r.server or {}
    parts = [s.get(k) for k in _SERVER_US[:4]]
    if not s or any(p is None for p in parts) or not s.get("success_count"):
        return None
    return max(0.0, r.latency_avg - sum(parts) / 1e3)


def _pct(v) -> str | None:
    return None if v is None else f"{v:.0f}"


def _load_text(r: BenchmarkResult) -> str:
    if r.mode == "request_rate":
        return f"{r.request_rate:g}/s ({r.achieved_rate:.1f})"
    return f"c{r.concurrency} ({r.achieved_concurrency:.1f})"


def _result_rows(label: str, results: dict[str, BenchmarkResult]) -> list[list]:
    rows = []
    for r in sorted(results.values(), key=lambda r: (group_key(r)[:2], r.load)):
        seq = (
            r.seq_length
            if r.seq_length is not None
            else f"{r.seq_len_distribution} ~{r.seq_len_mean:.0f}"
        )
        rows.append(
            [
                label,
                r.batch_size,
                seq,
                _load_text(r),
                f"{r.throughput:.1f}",
                f"{r.throughput * r.batch_size:.1f}",
                r.latency_p50,
                r.latency_p90,
                r.latency_p95,
                r.latency_p99,
                r.latency_avg,
                r.latency_max,
                f"{r.successful_requests}/{r.total_requests}",
                r.failed_requests,
                r.rejected_requests,
                r.timed_out_requests,
                "yes" if r.stable else f"no ({r.trials} windows)",
            ]
        )
    return rows


def contract_text(contract: dict) -> str:
    """What the generated requests used and where it came from, in one line."""
    if not contract:
        return "-"
    src = contract.get("source", {})
    cb = ", ".join(str(c) for c in contract.get("codebook_sizes", []))
    text = (
        f"codebooks {cb} ({src.get('codebook_sizes', '?')}), longest history "
        f"{contract.get('seq_len_max')} ({src.get('seq_len_max', '?')})"
    )
    if contract.get("max_batch_size") is not None:
        text += f", max batch {contract['max_batch_size']} (server)"
    return text


def _gpu_section(series) -> list[str]:
    """GPU utilization, memory and power per point: GPUMonitoredBenchmark's figures where there
    are any (with the reason where they are missing), else the plain benchmark's samples."""
    pairs = [(lab, r) for lab, rs in series for r in rs.values()]
    extended = [(lab, r) for lab, r in pairs if hasattr(r, "gpu_utilization_avg")]
    measured = [(lab, r) for lab, r in extended if r.gpu_samples]
    if measured:
        rows = []
        for lab, r in measured:
            per_gpu = "; ".join(
                f"{i} {name}: {_f(u, 0)}%, {_f(m, 0)} MB, {_f(w, 0)} W"
                for i, name, u, m, w in zip(
                    r.gpu_indices,
                    r.gpu_names or [""] * len(r.gpu_indices),
                    r.gpu_utilization_avg_per_gpu,
                    r.gpu_memory_peak_mb_per_gpu,
                    r.power_consumption_avg_w_per_gpu,
                    strict=False,
                )
            )
            per_req = r.energy_per_request_j
            rows.append(
                [
                    lab,
                    r.key,
                    _f(r.gpu_utilization_avg, 1),
                    _f(r.gpu_memory_peak_mb, 0),
                    _f(r.power_consumption_avg_w, 1),
                    None if per_req is None else f"{per_req * 1e3:.2f}",
                    per_gpu,
                    r.gpu_monitor,
                ]
            )
        header = ["model", "point", "util %", "memory peak MB", "power W", "mJ/request"]
        lines = _table(header + ["per GPU (util, memory, power)", "source"], rows)
        missing = sorted({r.gpu_monitor_note for _, r in extended if not r.gpu_samples})
        if missing:
            lines += ["", f"Not measured at some points: {'; '.join(missing)}."]
        return lines
    if extended:
        notes = sorted({r.gpu_monitor_note or "no GPU sample" for _, r in extended})
        return [f"GPU not measured: {'; '.join(notes)}. The GPU fields are empty (None)."]
    rows = [
        [lab, r.key, r.gpu_utilization, r.gpu_memory_used_mb, json.dumps(r.per_gpu)]
        for lab, r in pairs
        if r.gpu_utilization is not None
    ]
    if rows:
        return _table(["model", "point", "utilization (0-1)", "memory used MB", "per GPU"], rows)
    return [
        "No GPU on the server (or no metrics endpoint / NVML): GPU fields are empty. "
        "GPUMonitoredBenchmark (`ugt-serving benchmark --gpu-monitor`) also measures power."
    ]


def render_markdown(data: dict, results, baseline, config, title=None) -> str:
    """The markdown report of ``data`` (the report's JSON as ``write_report`` builds it) with
    the results as objects."""
    env, label, slo, comparison = data["meta"], data["label"], data["slo"], data["comparison"]
    baseline_label = (data["baseline"] or {}).get("label")
    slo_base = (data["baseline"] or {}).get("slo")
    images = [Path(name) for name in data["plots"]]
    first = next(iter(results.values()))
    lines = [f"# {title or f'Benchmark: {label}'}", ""]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines += _table(
        ["", ""],
        [
            ["date", env.get("date")],
            [
                "host",
                f"{env.get('cpu')} x {env.get('cpu_count')} (1-min load average "
                f"{env.get('load_average_1m', '-')} when the report was written)",
            ],
            ["server", f"{first.url} ({first.protocol})"],
            ["mode", first.mode],
            ["requests", contract_text(first.request_contract)],
            ["versions", versions],
            ["measurement", measurement_rule(config)],
        ]
        + [[k, v] for k, v in env.items() if k in ("device", "note", "server_config")],
    )
    lines += [
        "",
        "## Results",
        "",
        "Latency in ms over every measured request; throughput in requests/s. Load: target "
        "(achieved). ok/total; failed includes timed out; rejected = turned away by the "
        "queue policy.",
        "",
    ]
    header = [
        "model",
        "batch",
        "seq_len",
        "load",
        "req/s",
        "samples/s",
        "p50",
        "p90",
        "p95",
        "p99",
        "avg",
        "max",
        "ok/total",
        "failed",
        "rejected",
        "timed out",
        "stable",
    ]
    rows = _result_rows(label, results) + (
        _result_rows(baseline_label, baseline) if baseline else []
    )
    lines += _table(header, rows)
    lines += ["", f"## SLO: P99 <= {config.slo_p99_ms:g} ms", ""]
    srows = [
        [label, g, load_label(v["max_load"], v["mode"]), v["throughput"], v["latency_p99"]]
        for g, v in slo.items()
    ]
    srows += [
        [baseline_label, g, load_label(v["max_load"], v["mode"]), v["throughput"], v["latency_p99"]]
        for g, v in (slo_base or {}).items()
    ]
    lines += _table(
        ["model", "point", "highest load meeting the SLO", "req/s there", "p99 there"], srows
    )
    if comparison:
        lines += ["", f"## {label} vs {baseline_label}", ""]
        lines += _table(
            [
                "point",
                f"req/s {label}",
                f"req/s {baseline_label}",
                "throughput x",
                f"p99 {label}",
                f"p99 {baseline_label}",
                "p99 x lower",
                "server CPU ms/request",
                "CPU-cost x",
            ],
            [
                [
                    c["key"],
                    c["throughput"],
                    c["baseline_throughput"],
                    c["speedup"],
                    c["latency_p99"],
                    c["baseline_latency_p99"],
                    c["p99_ratio"],
                    None
                    if c["server_cpu_ms_per_request"] is None
                    else f"{c['server_cpu_ms_per_request']:.2f} vs {c['baseline_server_cpu_ms_per_request']:.2f}",
                    c["cpu_cost_ratio"],
                ]
                for c in comparison
            ],
        )
        lines += [
            "",
            "CPU-cost x = the baseline's server CPU per request / ours: the throughput ratio "
            "of CPU-bound servers on a host with nothing else running.",
        ]
    lines += [
        "",
        "## Where the time goes",
        "",
        "All times in ms, averages per request. queue, input, infer, output and request come "
        "from Triton's statistics API (deltas over the measured window; request = the whole "
        "request inside Triton, which includes releasing it after the response left). `outside "
        "Triton` = the client's average latency - (queue + input + infer + output): the network, "
        "the RPC stacks and the client. It cannot be negative: a request's queue and compute "
        "time pass before its response is sent (Triton updating its counters a moment late can "
        "leave a hair below 0, shown as 0). Client overhead = building/serializing a request "
        "and reading its answer in this process; RPC floor = a health RPC round trip. CPU % is of "
        "one core, for a server on this host (found by its port): the server's process tree, "
        "and every other process on the host; load avg = the 1-minute load average when the "
        "point began. Where other processes used CPU, every number here is slower than on an "
        "idle host.",
        "",
    ]
    brows = []
    for lab, rs in ((label, results), (baseline_label, baseline or {})):
        for r in rs.values():
            s = r.server or {}
            ms = {k: s[k] / 1e3 for k in _SERVER_US if s.get(k) is not None}
            formed = ", ".join(f"{b}x{n}" for b, n in sorted(r.batch_sizes_formed.items())) or "-"
            brows.append(
                [
                    lab,
                    r.key,
                    _ms(ms.get("queue_us")),
                    _ms(ms.get("compute_input_us")),
                    _ms(ms.get("compute_infer_us")),
                    _ms(ms.get("compute_output_us")),
                    _ms(ms.get("request_us")),
                    _ms(outside_triton_ms(r)),
                    s.get("avg_batch"),
                    formed,
                    r.client_overhead_ms,
                    r.rpc_floor_ms,
                    f"{r.client_cpu_percent:.0f}",
                    _pct(r.server_cpu_percent),
                    r.server_cpu_ms_per_request,
                    _pct(r.other_cpu_percent),
                    r.host_load_average,
                ]
            )
    lines += _table(
        [
            "model",
            "point",
            "queue",
            "input",
            "infer",
            "output",
            "request",
            "outside Triton",
            "avg batch",
            "batches formed (size x n)",
            "client overhead",
            "RPC floor",
            "client CPU %",
            "server CPU %",
            "server CPU per request",
            "other processes CPU %",
            "load avg",
        ],
        brows,
    )
    lines += ["", "## GPU", ""]
    lines += _gpu_section(((label, results), (baseline_label, baseline or {})))
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in images]
    lines.append("")
    return "\n".join(lines)
