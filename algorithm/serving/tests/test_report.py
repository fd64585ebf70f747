"""Benchmark reports: files written, numbers carried through, SLO and baseline comparison."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from algorithm.errors import BenchmarkError, InputFileNotFoundError
from algorithm.serving.bench.report import compare, load_report, slo_max_load, write_report
from algorithm.serving.benchmark import BenchmarkResult, histogram, percentiles
from algorithm.serving.config import BenchmarkConfig


def _result(
    model: str,
    concurrency: int,
    batch: int = 1,
    seq: int = 128,
    scale: float = 1.0,
    seed: int = 0,
    failed: int = 0,
) -> BenchmarkResult:
    rng = np.random.default_rng(seed + concurrency)
    lat = rng.lognormal(np.log(4 * scale * concurrency**0.8), 0.3, 400)
    p = percentiles(lat)
    return BenchmarkResult(
        throughput=concurrency / (p["avg"] / 1e3),
        latency_p50=p["p50"],
        latency_p90=p["p90"],
        latency_p95=p["p95"],
        latency_p99=p["p99"],
        latency_avg=p["avg"],
        latency_min=p["min"],
        latency_max=p["max"],
        total_requests=400 + failed,
        successful_requests=400,
        failed_requests=failed,
        model_name=model,
        url="127.0.0.1:8001",
        batch_size=batch,
        seq_length=seq,
        seq_len_mean=seq,
        seq_len_max=seq,
        concurrency=concurrency,
        achieved_concurrency=concurrency,
        duration_s=2.0,
        trials=3,
        stable=True,
        window_throughputs=[1.0, 1.0, 1.0],
        window_p99s=[1.0, 1.0, 1.0],
        server={
            "queue_us": 100.0 * concurrency,
            "compute_input_us": 20.0,
            "compute_infer_us": 3000.0 * scale,
            "compute_output_us": 50.0,
            "request_us": 3500.0 * scale,
            "avg_batch": 1.5,
        },
        batch_sizes_formed={1: 10, 2: 5},
        host_cpu_utilization=0.9,
        latency_histogram=histogram(lat),
        latencies_ms=lat.tolist(),
    )


@pytest.fixture
def runs():
    ours = {r.key: r for r in (_result("fast", c) for c in (1, 4, 16))}
    ours.update({r.key: r for r in (_result("fast", 1, batch=8), _result("fast", 1, seq=32))})
    base = {r.key: r for r in (_result("slow", c, scale=4.0, seed=9) for c in (1, 4, 16))}
    return ours, base


def test_slo_picks_the_highest_load_that_meets_it():
    rs = {r.key: r for r in (_result("m", c) for c in (1, 4, 16))}
    slo = 0.5 * (rs["bs1_seq128_c4"].latency_p99 + rs["bs1_seq128_c16"].latency_p99)
    best = slo_max_load(rs, slo)["batch 1, seq_len 128"]
    assert best["max_load"] == 4 and best["latency_p99"] <= slo
    assert slo_max_load(rs, 1e-3)["batch 1, seq_len 128"]["max_load"] is None
    rs["bs1_seq128_c4"].failed_requests = 1  # a point with failures does not meet the SLO
    assert slo_max_load(rs, slo)["batch 1, seq_len 128"]["max_load"] == 1


def test_compare_matches_points_and_gives_speedups(runs):
    ours, base = runs
    rows = compare(ours, base)
    assert [r["key"] for r in rows] == ["bs1_seq128_c1", "bs1_seq128_c4", "bs1_seq128_c16"]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["throughput"] / r["baseline_throughput"])
        assert r["speedup"] > 2


def test_report_writes_markdown_json_csv_and_plots(runs, tmp_path):
    ours, base = runs
    cfg = BenchmarkConfig(slo_p99_ms=25.0)
    text = write_report(
        ours, tmp_path / "out" / "report.md", baseline=base, config=cfg, meta={"note": "unit test"}
    )
    out = tmp_path / "out"
    assert (out / "report.md").read_text() == text
    for section in (
        "## Results",
        "## SLO: P99 <= 25 ms",
        "## fast vs slow",
        "## Where the time goes",
        "## GPU",
    ):
        assert section in text
    c16 = ours["bs1_seq128_c16"]
    assert f"{c16.latency_p99:.2f}" in text and "unit test" in text
    pngs = sorted(p.name for p in out.glob("report_*.png"))
    assert pngs == [
        "report_batch_seq.png",
        "report_latency_histogram.png",
        "report_latency_vs_load.png",
        "report_server_breakdown.png",
        "report_throughput_latency.png",
    ]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    for p in pngs:
        assert f"]({p})" in text
    data = json.loads((out / "report.json").read_text())
    assert data["results"]["bs1_seq128_c16"]["latency_p99"] == pytest.approx(c16.latency_p99)
    assert data["baseline"]["label"] == "slow" and len(data["comparison"]) == 3
    assert data["meta"]["cpu_count"] >= 1 and "tritonclient" in data["meta"]["versions"]
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ours) + len(base)
    row = next(r for r in rows if r["key"] == "bs1_seq128_c4" and r["label"] == "fast")
    assert float(row["latency_p99"]) == pytest.approx(ours["bs1_seq128_c4"].latency_p99)
    assert float(row["compute_infer_us"]) == pytest.approx(3000.0)


def test_a_saved_report_reloads_and_can_be_a_baseline(runs, tmp_path):
    ours, base = runs
    write_report(base, tmp_path / "before.md", plots=False)
    loaded, none, data = load_report(tmp_path / "before.json")
    assert none is None and set(loaded) == set(base)
    assert loaded["bs1_seq128_c4"].latency_p99 == pytest.approx(base["bs1_seq128_c4"].latency_p99)
    assert loaded["bs1_seq128_c4"].latencies_ms == []  # raw latencies stay out of the JSON...
    text = write_report(ours, tmp_path / "after.md", baseline=loaded)  # ...its histogram is drawn
    assert "## fast vs slow" in text and (tmp_path / "after_latency_histogram.png").is_file()


def test_same_model_twice_gets_distinct_labels(runs, tmp_path):
    ours, _ = runs
    text = write_report(ours, tmp_path / "r.md", baseline=ours, plots=False)
    assert "fast vs fast (baseline)" in text


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(BenchmarkError, match="no benchmark results"):
        write_report({}, tmp_path / "r.md")
    with pytest.raises(InputFileNotFoundError, match="missing.json"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BenchmarkError, match="not a benchmark report"):
        load_report(tmp_path / "bad.json")
