"""The report's PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from algorithm.serving.bench.result import BREAKDOWN, BenchmarkResult, group_label, groups

logger = logging.getLogger(__name__)


def _save(fig, path: Path, plt) -> Path:
    """Tight layout, PNG, close: the finish every plot shares."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finish(fig, ax, path: Path, plt) -> Path:
    """Grid and legend of a one-axis latency plot, then ``_save``."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _xlabel(rs: list[BenchmarkResult]) -> str:
    return (
        "request rate (req/s)"
        if rs and rs[0].mode == "request_rate"
        else "concurrency (requests in flight)"
    )


def _series(results, baseline, label, baseline_label):
    out = [(label, results, "-")]
    if baseline:
        out.append((baseline_label, baseline, "--"))
    return out


PCT_COLORS = (("p50", "tab:blue"), ("p90", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red"))


def plot_latency_vs_load(series, path: Path, plt) -> Path:
    """One panel per (batch, seq_len): p50/p90/p95/p99 against load; a baseline dashed."""
    keys = list(groups(series[0][1]))[:6]
    cols = 1 if len(keys) == 1 else 2
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, g in zip(axes.flat, keys, strict=False):
        loads = []
        for name, results, style in series:
            rs = groups(results).get(g, [])
            x = [r.load for r in rs]
            loads += x
            for pct, color in PCT_COLORS:
                ax.plot(
                    x,
                    [getattr(r, f"latency_{pct}") for r in rs],
                    style,
                    marker="o",
                    color=color,
                    label=f"{name} {pct}",
                )
        if loads and max(loads) / max(min(loads), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(loads)), [f"{v:g}" for v in sorted(set(loads))])
        ax.set_xlabel(_xlabel(groups(series[0][1])[g]))
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"Latency percentiles vs load: {group_label(g)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return _save(fig, path, plt)


def plot_throughput_latency(series, slo_ms: float, slo: dict, path: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, results, style in series:
        for g, rs in groups(results).items():
            x = [r.throughput * r.batch_size for r in rs]
            y = [r.latency_p99 for r in rs]
            (line,) = ax.plot(x, y, style, marker="o", label=f"{name} {group_label(g)}")
            for r, xi, yi in zip(rs, x, y, strict=True):
                ax.annotate(
                    f"{r.load:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
            if name == series[0][0]:
                best = slo.get(group_label(g), {})
                if best.get("max_load") is not None:
                    ax.scatter(
                        [best["throughput"] * g[0]],
                        [best["latency_p99"]],
                        s=160,
                        facecolors="none",
                        edgecolors=line.get_color(),
                        linewidths=2,
                        label=f"highest load meeting SLO: {best['max_load']:g}",
                    )
    ax.axhline(slo_ms, color="red", linestyle=":", label=f"SLO P99 {slo_ms:g} ms")
    ax.set_xlabel("throughput (samples/s)")
    ax.set_ylabel("P99 latency (ms)")
    ax.set_title("Throughput vs P99 latency (labels: load)")
    return _finish(fig, ax, path, plt)


def _hist_data(r: BenchmarkResult):
    if r.latencies_ms:
        return np.asarray(r.latencies_ms), None
    h = r.latency_histogram or {}
    if h.get("counts"):
        return None, (np.asarray(h["edges_ms"]), np.asarray(h["counts"]))
    return None, None


def plot_histogram(series, path: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, results, _ in series:
        for r in sorted(results.values(), key=lambda r: (r.batch_size, r.load))[:6]:
            raw, binned = _hist_data(r)
            lab = f"{name} {r.key}"
            if raw is not None and len(raw):
                lo, hi = max(raw.min(), 1e-3), max(raw.max(), 2e-3)
                bins = np.geomspace(lo, hi * 1.001, 40) if hi > lo * 1.01 else 20
                ax.hist(raw, bins=bins, histtype="step", label=lab)
            elif binned is not None:
                edges, counts = binned
                ax.stairs(counts, edges, label=lab)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("requests")
    ax.set_title("Latency distribution")
    return _finish(fig, ax, path, plt)


def _bars(
    ax, names: list[str], values: list[list[float]], labels: list[str], ylabel: str, title: str
):
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(names))
    for i, (name, vals) in enumerate(zip(names, values, strict=True)):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def plot_batch_seq(series, path: Path, plt) -> Path:
    """Throughput and P99 per batch size (at the first seq_len and lowest load) and per seq_len."""
    results = series[0][1]
    first = min(results.values(), key=lambda r: (r.load, r.batch_size, r.seq_length or 0))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (attr, fixed_attr) in enumerate(
        (("batch_size", "seq_length"), ("seq_length", "batch_size"))
    ):
        keys = sorted({getattr(r, attr) for r in results.values() if getattr(r, attr) is not None})
        names, thr, p99 = [], [], []
        for name, res, _ in series:
            pick = {}
            for r in res.values():
                if getattr(r, fixed_attr) == getattr(first, fixed_attr) and r.load == first.load:
                    pick[getattr(r, attr)] = r
            names.append(name)
            thr.append([pick[k].throughput * pick[k].batch_size if k in pick else 0 for k in keys])
            p99.append([pick[k].latency_p99 if k in pick else 0 for k in keys])
        what = "batch size" if attr == "batch_size" else "seq_len"
        fixed = f"{fixed_attr.replace('_', ' ')} {getattr(first, fixed_attr)}, load {first.load:g}"
        _bars(
            axes[0][col],
            names,
            thr,
            [str(k) for k in keys],
            "samples/s",
            f"Throughput per {what} ({fixed})",
        )
        _bars(
            axes[1][col],
            names,
            p99,
            [str(k) for k in keys],
            "P99 (ms)",
            f"P99 per {what} ({fixed})",
        )
    return _save(fig, path, plt)


def plot_breakdown(series, path: Path, plt) -> Path:
    """Stacked server-side time per request (queue, compute) plus what is spent outside the server."""
    rows = [
        (f"{name}\n{r.key}", r)
        for name, results, _ in series
        for r in sorted(results.values(), key=lambda r: (r.batch_size, r.seq_length or 0, r.load))
    ]
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows)), 4.8))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key, name in BREAKDOWN:
        vals = np.array([(r.server or {}).get(key, 0.0) / 1e3 for _, r in rows])
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom += vals
    outside = np.array(
        [
            max(0.0, r.latency_avg - (r.server or {}).get("request_us", 0.0) / 1e3)
            if (r.server or {}).get("request_us")
            else 0.0
            for _, r in rows
        ]
    )
    ax.bar(
        x, outside, bottom=bottom, label="outside server (network, RPC, client)", color="lightgray"
    )
    ax.set_xticks(x, [lab for lab, _ in rows], fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("ms per request (average)")
    ax.set_title("Where a request's time goes (Triton statistics, measured window)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


GPU_PANELS = (
    ("gpu_utilization_avg", "GPU utilization (%)"),
    ("gpu_memory_peak_mb", "GPU memory peak (MB)"),
    ("power_consumption_avg_w", "GPU power (W)"),
)


def has_gpu_figures(series) -> bool:
    return any(getattr(r, "gpu_samples", 0) for _, results, _ in series for r in results.values())


def plot_gpu(series, path: Path, plt) -> Path:
    """Utilization, peak memory and power against load side by side, one line per (batch,
    seq_len) and series (GPUMonitoredBenchmark's figures)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), squeeze=False)
    for ax, (field, title) in zip(axes.flat, GPU_PANELS, strict=True):
        for name, results, style in series:
            for g, rs in groups(results).items():
                pts = [(r.load, getattr(r, field, None)) for r in rs]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True), style, marker="o", label=f"{name} {group_label(g)}"
                    )
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0, top=100 if field == "gpu_utilization_avg" else None)
        ax.set_xlabel(_xlabel(next(iter(groups(series[0][1]).values()), [])))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path, plt)


def draw_all(results, baseline, label, baseline_label, slo_ms, slo, stem: Path) -> list[Path]:
    """Every plot as ``<stem>_<name>.png``; returns the paths written."""
    plt = _plt()
    series = _series(results, baseline, label, baseline_label)
    stem = Path(stem)
    jobs = [
        ("latency_vs_load", lambda p: plot_latency_vs_load(series, p, plt)),
        ("throughput_latency", lambda p: plot_throughput_latency(series, slo_ms, slo, p, plt)),
        ("latency_histogram", lambda p: plot_histogram(series, p, plt)),
        ("batch_seq", lambda p: plot_batch_seq(series, p, plt)),
        ("server_breakdown", lambda p: plot_breakdown(series, p, plt)),
    ]
    if has_gpu_figures(series):
        jobs.append(("gpu", lambda p: plot_gpu(series, p, plt)))
    out = []
    for name, draw in jobs:
        path = stem.parent / f"{stem.name}_{name}.png"
        out.append(draw(path))
    return out


# -------------------------------------------------------------------------------------- tuning
def plot_tune_candidates(candidates: list[dict], slo_ms: float, path: Path) -> Path:
    """Throughput against P99 for every measured point of every tune candidate.

    ``candidates``: [{"label", "role" ("default", "winner", "closest" or ""), "points": [(throughput,
    p99_ms, load, within_budget)]}]. A candidate's points (one per load level) are joined;
    filled markers are within the budget, hollow ones past it; the default and the winner are
    drawn in their own colours and named in the legend.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {
        "default": ("tab:blue", 9, 3),
        "winner": ("tab:green", 11, 4),
        "closest": ("tab:orange", 10, 4),
    }
    for c in candidates:
        pts = c["points"]
        if not pts:
            continue
        color, size, z = styles.get(c["role"], ("0.55", 6, 2))
        label = f"{c['role']}: {c['label']}" if c["role"] else None
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, "-", color=color, alpha=0.5 if not c["role"] else 0.9, zorder=z, lw=1)
        for thr, p99, _, ok in pts:
            ax.plot(
                [thr],
                [p99],
                "o",
                ms=size if c["role"] else 6,
                color=color,
                markerfacecolor=color if ok else "none",
                zorder=z,
                label=label,
            )
            label = None
        if c["role"] == "winner":
            best = max((p for p in pts if p[3]), key=lambda p: p[0], default=None)
            if best is not None:
                ax.annotate(
                    f"winner: {best[0]:.0f} req/s, P99 {best[1]:.1f} ms",
                    (best[0], best[1]),
                    textcoords="offset points",
                    xytext=(6, -14),
                    fontsize=8,
                    color=color,
                )
    ax.axhline(slo_ms, color="red", linestyle=":", label=f"P99 budget {slo_ms:g} ms")
    ax.plot([], [], "o", color="0.55", ms=6, label="other candidates (filled: within budget)")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("P99 latency (ms)")
    ax.set_title("Tune: every measured candidate (one marker per load level)")
    return _finish(fig, ax, path, plt)


def plot_tune_side_by_side(curves: dict[str, list[tuple]], slo_ms: float, xlabel: str, path: Path):
    """The winner and the config it replaces, measured in the same run: throughput and P99
    against load. ``curves``: {name: [(load, throughput, p99_ms)]}; the first is dashed."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        loads = [p[0] for p in pts]
        style = "--" if i == 0 else "-"
        left.plot(loads, [p[1] for p in pts], style, marker="o", label=name)
        right.plot(loads, [p[2] for p in pts], style, marker="o", label=name)
    right.axhline(slo_ms, color="red", linestyle=":", label=f"P99 budget {slo_ms:g} ms")
    for ax, ylabel in ((left, "throughput (requests/s)"), (right, "P99 latency (ms)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_title("Same run: throughput", fontsize=9)
    right.set_title("Same run: P99 latency", fontsize=9)
    return _save(fig, path, plt)
