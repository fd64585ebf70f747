"""Per-arm results of an experiment routed inside Triton: read, summarised, reported.

Two sources, both on the live server:

- the router's own counters on the metrics endpoint (``triton/python_model/router.py``):
  requests and users per arm and path ("served" answers, "shadow" mirrors) by outcome, a
  latency histogram of each arm as the router calls it, and for shadow traffic the sums behind
  the agreement of B with A (recall@K overlap, top-1 agreement, mean |score difference|);
- each arm model's statistics (Triton's statistics API): successes, failures and the mean
  request / queue / compute time, which include any traffic that reaches the arm directly.

The counters are cumulative since the router was loaded (a reload keeps them, a server restart
starts them at zero). Percentiles come from the histogram's buckets (each 1.25x the one below),
interpolated inside a bucket, so they are good to about a quarter of their value.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

from algorithm.errors import BenchmarkError
from algorithm.fsutil import make_dirs, write_atomic, write_json, write_text_atomic
from algorithm.serving.bench.metrics import parse_metrics
from algorithm.serving.bench.monitor import stats_snapshot

logger = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
ARMS = ("a", "b")
PATHS = ("served", "shadow")
OUTCOMES = ("success", "error", "timeout", "dropped")


def _base(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _get(url: str, headers: dict | None, what: str, timeout: float = 5.0) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (the user's server)
            return r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:300]
        hint = (
            "The server restricts this API: pass its admin key."
            if e.code in (401, 403)
            else "Check the URL and that the model is loaded."
        )
        raise BenchmarkError(f"{what} at {url}: HTTP {e.code} {detail}", hint=hint) from e
    except (urllib.error.URLError, OSError) as e:
        raise BenchmarkError(
            f"{what}: no answer from {url}: {e}",
            hint="Start the server or pass --url (HTTP host:port) and --metrics-url.",
        ) from e


def histogram_percentile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of a Prometheus histogram given as (upper bound,
    cumulative count) pairs; linear inside the bucket it falls in. None without observations;
    the largest finite bound when it falls in the +Inf bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q / 100.0 * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def router_results(metrics_text: str, router: str) -> dict:
    """The router's counters from a metrics page: {"arms": {arm: {path: {...}}}, "shadow": {...}}."""
    m = parse_metrics(metrics_text)

    def mine(name):
        return [(lb, v) for lb, v in m.get(name, []) if lb.get("router") == router]

    arms: dict = {}
    for lb, v in mine("ugt_router_requests_total"):
        slot = arms.setdefault(lb["arm"], {}).setdefault(lb["path"], _empty(lb.get("model")))
        slot["requests"][lb["outcome"]] = slot["requests"].get(lb["outcome"], 0) + int(v)
    for lb, v in mine("ugt_router_users_total"):
        slot = arms.setdefault(lb["arm"], {}).setdefault(lb["path"], _empty(lb.get("model")))
        slot["users"] += int(v)
    hist: dict = {}
    for lb, v in mine("ugt_router_latency_us_bucket"):
        le = float("inf") if lb["le"] == "+Inf" else float(lb["le"])
        hist.setdefault((lb["arm"], lb["path"]), []).append((le, v))
    sums = {(lb["arm"], lb["path"]): v for lb, v in mine("ugt_router_latency_us_sum")}
    for (arm, path), buckets in hist.items():
        slot = arms.setdefault(arm, {}).setdefault(path, _empty(None))
        n = max(c for _, c in buckets)
        slot["latency_ms"] = {
            **{f"p{q}": _ms(histogram_percentile(buckets, q)) for q in PERCENTILES},
            "mean": _ms(sums.get((arm, path), 0.0) / n) if n else None,
            "count": int(n),
        }
        slot["latency_buckets_us"] = [[b, c] for b, c in sorted(buckets) if b != float("inf")]
    for paths in arms.values():
        for slot in paths.values():
            done = sum(slot["requests"].values())
            slot["requests"]["total"] = done
            slot["error_rate"] = (done - slot["requests"].get("success", 0)) / done if done else 0.0
    stats = {lb["stat"]: v for lb, v in mine("ugt_router_shadow_sum")}
    users = stats.get("users", 0.0)
    shadow = {"compared_users": int(users)}
    if users:
        shadow.update(
            recall_overlap=stats.get("recall_overlap", 0.0) / users,
            top1_agreement=stats.get("top1_agreement", 0.0) / users,
            mean_score_diff=stats.get("mean_score_diff", 0.0) / users,
        )
    return {"arms": arms, "shadow": shadow}


def _empty(model) -> dict:
    return {"model": model, "requests": {}, "users": 0, "latency_ms": None, "error_rate": 0.0}


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def arm_statistics(stats: dict, model: str) -> dict:
    """One arm's totals from Triton's statistics (all versions): successes, failures, mean
    request / queue / compute-infer time in ms."""
    s = stats_snapshot(stats, model)

    def mean_ms(key):
        count, ns = s[key]
        return ns / count / 1e6 if count else None

    return {
        "success": s["success"][0],
        "fail": s["fail"][0],
        "inference_count": s["inference_count"],
        "execution_count": s["execution_count"],
        "request_ms": mean_ms("success"),
        "queue_ms": mean_ms("queue"),
        "compute_infer_ms": mean_ms("compute_infer"),
    }


def collect(exp, url: str, metrics_url: str, headers: dict | None = None) -> dict:
    """Live results of experiment ``exp`` (an ExperimentConfig) from a server: the router's
    counters (``metrics_url``) and the arms' statistics (``url``, HTTP host:port)."""
    results = router_results(_get(metrics_url, None, "metrics"), exp.router_name)
    arms = {}
    for arm, model in (("a", exp.model_a), ("b", exp.model_b)):
        text = _get(f"{_base(url)}/v2/models/{model}/stats", headers, f"statistics of {model}")
        try:
            arms[arm] = {"model": model, **arm_statistics(json.loads(text), model)}
        except ValueError as e:
            raise BenchmarkError(f"statistics of {model} at {url} are not JSON: {e}") from e
    results["arm_statistics"] = arms
    return results


# ------------------------------------------------------------------------------------ report
def _f(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(exp, history: dict, live: dict | None) -> str:
    """The experiment report: definition, timeline, per-arm results, shadow agreement."""
    lines = [f"# Experiment `{exp.name}` (router `{exp.router_name}`)", ""]
    effective = {
        "promoted": f"all users to B ({exp.model_b})",
        "stopped": f"all users to A ({exp.model_a})",
    }.get(exp.status)
    if effective is None:
        effective = (
            f"{exp.traffic_split:.0%} of users to A ({exp.model_a}), the rest to B ({exp.model_b})"
            if exp.mode == "ab"
            else f"A ({exp.model_a}) answers all; {exp.shadow_fraction:.0%} of users mirrored "
            f"to B ({exp.model_b})"
        )
    lines += [
        f"- mode **{exp.mode}**, status **{exp.status}**: {effective}",
        f"- users hashed with salt `{exp.hash_salt}` (BLAKE2b; `ABTestingRouter` agrees)",
        "",
        "## Timeline",
        "",
        "| time | action | mode | status | split (A) | shadow |",
        "|---|---|---|---|---|---|",
    ]
    for e in history.get("events", []):
        lines.append(
            f"| {e.get('time')} | {e.get('action')} | {e.get('mode')} | {e.get('status')} "
            f"| {_f(e.get('traffic_split'))} | {_f(e.get('shadow_fraction'))} |"
        )
    if not live:
        return "\n".join([*lines, "", "No live results (no server URL given).", ""])
    lines += [
        "",
        "## Per arm (router's counters since the router was first loaded on this server)",
        "",
        "| arm | model | path | requests | users | errors | timeouts | dropped | "
        "P50 ms | P90 ms | P99 ms | mean ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for path in PATHS:
            s = live["arms"].get(arm, {}).get(path)
            if not s:
                continue
            r, lat = s["requests"], s["latency_ms"] or {}
            lines.append(
                f"| {arm.upper()} | {s['model'] or '-'} | {path} | {r.get('total', 0)} "
                f"| {s['users']} | {r.get('error', 0)} | {r.get('timeout', 0)} "
                f"| {r.get('dropped', 0)} | {_f(lat.get('p50'))} | {_f(lat.get('p90'))} "
                f"| {_f(lat.get('p99'))} | {_f(lat.get('mean'))} |"
            )
    lines += [
        "",
        "## Arm models (Triton's statistics: all their traffic, direct calls included)",
        "",
        "| arm | model | successes | failures | mean request ms | mean queue ms | mean compute ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in live.get("arm_statistics", {}).items():
        lines.append(
            f"| {arm.upper()} | {s['model']} | {s['success']} | {s['fail']} "
            f"| {_f(s['request_ms'])} | {_f(s['queue_ms'])} | {_f(s['compute_infer_ms'])} |"
        )
    sh = live.get("shadow", {})
    if sh.get("compared_users"):
        lines += [
            "",
            "## Shadow agreement (B against A on the same requests)",
            "",
            f"- users compared: {sh['compared_users']}",
            f"- recall@K overlap: {sh['recall_overlap']:.4f}",
            f"- top-1 agreement: {sh['top1_agreement']:.4f}",
            f"- mean |score difference| (position by position): {sh['mean_score_diff']:.4g}",
        ]
    return "\n".join([*lines, ""])


def plot(live: dict, path):
    """Latency CDF of each arm and path (from the histograms) beside the requests per arm, as
    PNG to ``path`` (a file name or a binary file object)."""
    from algorithm.serving.bench.plots import _plt, _save

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, counts, errors = [], [], []
    for arm in ARMS:
        for p in PATHS:
            s = live["arms"].get(arm, {}).get(p)
            if not s:
                continue
            label = f"{arm.upper()} {s['model'] or ''} ({p})"
            buckets = s.get("latency_buckets_us") or []
            total = buckets[-1][1] if buckets else 0
            if total:  # the buckets from just below the fastest request to the slowest
                first = next(i for i, (_, c) in enumerate(buckets) if c > 0)
                last = next(i for i, (_, c) in enumerate(buckets) if c >= total)
                shown = buckets[max(0, first - 1) : last + 2]
                ax1.step([b / 1e3 for b, _ in shown], [c / total for _, c in shown], label=label)
            labels.append(label)
            counts.append(s["requests"].get("success", 0))
            errors.append(s["requests"].get("total", 0) - s["requests"].get("success", 0))
    ax1.set_xscale("log")
    ax1.set_xlabel("arm latency seen by the router (ms, log scale)")
    ax1.set_ylabel("share of requests")
    ax1.set_title("Latency per arm", fontsize=9)
    ax1.grid(alpha=0.3)
    if labels:
        ax1.legend(fontsize=7)
    x = range(len(labels))
    ax2.bar(x, counts, label="answered")
    ax2.bar(x, errors, bottom=counts, label="errors / timeouts / dropped", color="tab:red")
    ax2.set_xticks(list(x), labels, rotation=15, fontsize=7)
    ax2.set_ylabel("requests")
    sh = live.get("shadow", {})
    title = "Requests per arm"
    if sh.get("compared_users"):
        title += f" (shadow: recall@K {sh['recall_overlap']:.3f}, top-1 {sh['top1_agreement']:.3f})"
    ax2.set_title(title, fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, axis="y")
    return _save(fig, path, plt)


def write_experiment_report(output_dir, exp, history: dict, live: dict | None) -> dict:
    """report.md, report.json (and report.png with live results) in ``output_dir``."""
    out = make_dirs(Path(output_dir))
    paths = {
        "markdown": str(write_text_atomic(out / "report.md", render_markdown(exp, history, live)))
    }
    data = {"experiment": exp.to_dict(), "history": history, "live": live}
    paths["json"] = str(write_json(out / "report.json", data))
    if live:
        png = io.BytesIO()  # drawn in memory, then written atomically like every other file
        plot(live, png)
        paths["plot"] = str(write_atomic(out / "report.png", png.getvalue()))
    return paths


__all__ = [
    "arm_statistics",
    "collect",
    "histogram_percentile",
    "render_markdown",
    "router_results",
    "write_experiment_report",
]
