"""The tune's report: ``tune_report.md``, ``tune_report.json`` (everything, every measured point),
``tuned_config.pbtxt`` (the winner's config) and two plots: throughput against P99 for every
candidate with the budget and the winner marked, and the tuned config (the winner, or the
closest when none met the budget) beside the config it would replace, in the same run."""

from __future__ import annotations

import logging
from pathlib import Path

from algorithm.fsutil import write_json, write_text_atomic
from algorithm.serving.bench.plots import plot_tune_candidates, plot_tune_side_by_side
from algorithm.serving.bench.report import environment
from algorithm.serving.tuning.result import TuneResult
from algorithm.serving.tuning.search import Candidate

logger = logging.getLogger(__name__)

REPORT = "tune_report.md"
TUNED_CONFIG = "tuned_config.pbtxt"
SETTING_NAMES = {
    "instance_count": "instances",
    "runtime_threads": "runtime threads",
    "max_batch_size": "max batch size",
    "preferred_batch_sizes": "preferred batch sizes",
    "max_queue_delay_us": "max queue delay (us)",
    "max_queue_size": "max queue size (0 = unbounded)",
    "queue_timeout_us": "queue timeout (us, 0 = none)",
    "gpu_batching": "GPU engine batching",
    "pipeline_depth": "pipeline depth (0 = off)",
}


def _role(result: TuneResult, c: Candidate) -> str:
    if result.winner is c:
        return "winner"
    if result.closest is c and c is not result.baseline:
        return "closest"
    return "default" if c is result.baseline else ""


def _points(result: TuneResult, c: Candidate) -> list[tuple]:
    return [
        (r.throughput, r.latency_p99, r.load, result.judge.point_ok(r))
        for r in c.results
        if r.successful_requests
    ]


def draw(result: TuneResult, folder: Path) -> list[Path]:
    paths = []
    cands = [
        {"label": c.settings.label, "role": _role(result, c), "points": _points(result, c)}
        for c in result.candidates
    ]
    paths.append(plot_tune_candidates(cands, result.slo_p99_ms, folder / "tune_candidates.png"))
    if result.rounds:
        curves = {}
        for which in ("default", "tuned"):
            for i, rnd in enumerate(result.rounds):
                c = rnd[which]
                name = f"{which} ({c.settings.label})" + (
                    f", round {i + 1}" if len(result.rounds) > 1 else ""
                )
                curves[name] = [(r.load, r.throughput, r.latency_p99) for r in c.results]
        first = result.rounds[0]["default"].results
        xlabel = (
            "request rate (req/s)"
            if first and first[0].mode == "request_rate"
            else "concurrency (requests in flight)"
        )
        paths.append(
            plot_tune_side_by_side(
                curves, result.slo_p99_ms, xlabel, folder / "tune_side_by_side.png"
            )
        )
    return paths


def write_tune_report(result: TuneResult, folder) -> dict:
    """Write the report files into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict = {}
    if result.winner_config:
        paths["tuned_config"] = str(write_text_atomic(folder / TUNED_CONFIG, result.winner_config))
    try:
        paths["plots"] = [str(p) for p in draw(result, folder)]
    except Exception as e:  # a plot is not worth losing the measurements for
        logger.warning("tune plots failed: %s", e)
        paths["plots"] = []
    paths["markdown"] = str(folder / REPORT)
    paths["json"] = str(folder / "tune_report.json")
    result.paths = paths
    env = environment()
    data = {"meta": env, **result.to_dict()}
    write_json(paths["json"], data)
    write_text_atomic(paths["markdown"], render(result, env))
    logger.info("wrote %s (+ .json, %d plots)", paths["markdown"], len(paths["plots"]))
    return paths


# ---------------------------------------------------------------------------------- markdown
def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out


def _load(result: TuneResult) -> str:
    load = result.context.get("load", {})
    if load.get("mode") == "request_rate":
        levels = f"request rates {list(load.get('request_rates', []))} req/s (Poisson)"
    else:
        levels = f"concurrency {list(load.get('concurrency_levels') or [load.get('concurrency')])} (closed loop)"
    dist = load.get("seq_len_distribution", "fixed")
    seq = (
        f"seq_len {load.get('test_seq_lengths', ['?'])[0]}"
        if dist == "fixed"
        else f"seq_len {dist} (median {load.get('seq_len_median')}, max {load.get('seq_len_max')})"
    )
    return f"batch {load.get('test_batch_sizes', ['?'])[0]} per request, {seq}, {levels}"


def _setting(v) -> str:
    if v is None:
        return "off / n.a."
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(map(str, v)) + "]" if v else "[] (any)"
    return str(v)


def _curve_rows(result: TuneResult) -> list[list]:
    rows = []
    for i, rnd in enumerate(result.rounds):
        for which in ("default", "tuned"):
            c = rnd[which]
            for r in c.results:
                rows.append(
                    [
                        i + 1,
                        which,
                        f"{r.load:g}",
                        _f(r.throughput),
                        _f(r.latency_p50, 2),
                        _f(r.latency_p99, 2),
                        f"{r.successful_requests}/{r.total_requests}",
                        "yes" if result.judge.point_ok(r) else "no",
                    ]
                )
    return rows


def render(result: TuneResult, env: dict) -> str:
    j = result.judge
    lines = [
        f"# Tune: {result.model_name}, P99 budget {j.slo_p99_ms:g} ms",
        "",
        f"**{result.summary()}**",
        "",
        f"- load: {_load(result)}",
        f"- server: {result.context.get('server')} on {env.get('host')} ({env.get('cpu')}, "
        f"{env.get('cpu_count')} cores, load average {env.get('load_average_1m')})",
        f"- {len(result.candidates)} candidates ({sum(c.reused for c in result.candidates)} reused "
        f"from stored points) in {result.seconds:.0f} s"
        + (f"; the search stopped at the {result.stopped}" if result.stopped else ""),
        f"- a point meets the budget when P99 <= {j.slo_p99_ms:g} ms, no request failed and at "
        f"most {j.max_rejected_percent:g}% were rejected; a candidate's throughput is that of its "
        "best such point",
        "",
    ]
    sbs = result.side_by_side()
    if sbs:
        who = "the winner" if sbs["tuned_met_budget"] else "the closest, as none met the budget"
        lines += [
            f"## The tuned config ({who}) against the one it would replace, in the same run",
            "",
            f"Throughput within the budget: **{_f(sbs['tuned_throughput'])} req/s** against "
            f"{_f(sbs['default_throughput'])} req/s"
            + (f" (**x{sbs['speedup']:.2f}**)" if sbs["speedup"] else "")
            + f"; best P99 {_f(sbs['tuned_best_p99_ms'], 2)} ms against "
            f"{_f(sbs['default_best_p99_ms'], 2)} ms. Medians of {sbs['rounds']} round(s), the "
            "two measured alternately at every load level.",
            "",
            *_table(
                ["round", "config", "load", "req/s", "p50 ms", "p99 ms", "ok/total", "in budget"],
                _curve_rows(result),
            ),
            "",
        ]
    if result.winner is not None:
        base, win = result.baseline.settings.to_dict(), result.winner.settings.to_dict()
        lines += [
            "## Settings",
            "",
            *_table(
                ["setting", "before", "tuned"],
                [
                    [SETTING_NAMES.get(k, k), _setting(base[k]), _setting(win[k])]
                    for k in base
                    if base[k] is not None or win[k] is not None
                ],
            ),
            "",
        ]
    if result.written:
        lines += [
            f"The tuned config is in `{result.written['config']}`; the one before it is kept as "
            f"`{result.written['previous']}`. To put it back: "
            f"`ugt-serving tune <repository> -m {result.model_name} --restore`.",
            "",
        ]
    elif result.winner_config:
        lines += [
            f"The tuned config was not written into the repository ({result.not_written}); "
            f"it is in `{TUNED_CONFIG}` here.",
            "",
        ]
    lines += ["## Every candidate", ""]
    rows = []
    for i, c in enumerate(result.candidates):
        best = j.best_point(c)
        note = c.error or ("reused" if c.reused else "")
        if c.skipped_levels:
            note = (note + "; " if note else "") + f"skipped loads {c.skipped_levels} (past budget)"
        rows.append(
            [
                i,
                _role(result, c) or c.step,
                f"`{c.settings.label}`",
                ", ".join(f"{r.load:g}" for r in c.results),
                _f(j.throughput(c)),
                _f(best.latency_p99 if best else j.best_p99(c), 2),
                "yes" if best else "no",
                _f(c.seconds, 0),
                note,
            ]
        )
    lines += _table(
        ["#", "step", "settings", "loads", "req/s in budget", "p99 ms", "meets", "s", "note"], rows
    )
    lines += ["", "Searched values (the current one included):", ""]
    lines += [
        f"- {SETTING_NAMES.get(k, k)}: {[_setting(v) for v in vs]}"
        for k, vs in result.values.items()
    ]
    plots = result.paths.get("plots", [])
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", f"Measured {env.get('date')}; versions {env.get('versions')}.", ""]
    return "\n".join(lines)


__all__ = ["REPORT", "TUNED_CONFIG", "write_tune_report"]
