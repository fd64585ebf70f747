"""TritonBenchmark: request data, statistics, and measurements against the real tritonserver."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from algorithm.errors import BenchmarkError, ConfigError, InputFileNotFoundError
from algorithm.serving.bench.metrics import parse_metrics
from algorithm.serving.bench.monitor import (
    sample_metrics,
    server_breakdown,
    stats_snapshot,
    summarize_samples,
)
from algorithm.serving.benchmark import (
    FAILED,
    REJECTED,
    TIMED_OUT,
    BenchmarkResult,
    TritonBenchmark,
    classify_error,
    is_stable,
    make_requests,
    percentiles,
    run_benchmark,
    sample_seq_lengths,
)
from algorithm.serving.config import BenchmarkConfig, ExportConfig, TritonConfig

CB = (1024, 4096, 16384)


# ------------------------------------------------------------------------------ request data
@pytest.mark.parametrize("dist", ["fixed", "uniform", "lognormal"])
def test_seq_lengths_follow_the_distribution(dist, rng):
    cfg = BenchmarkConfig(
        seq_len_distribution=dist, seq_len_min=8, seq_len_max=300, seq_len_median=64
    )
    n = sample_seq_lengths(cfg, 4000, rng, fixed=128)
    if dist == "fixed":
        assert set(n.tolist()) == {128}
    else:
        assert n.min() >= 8 and n.max() <= 300
        assert len(set(n.tolist())) > 50
    if dist == "lognormal":
        assert 50 <= np.median(n) <= 80  # median honoured, tail clipped at seq_len_max
    if dist == "uniform":
        assert 130 <= n.mean() <= 178


def test_histogram_distribution_draws_only_listed_lengths(tmp_path, rng):
    path = tmp_path / "hist.json"
    path.write_text(json.dumps({"lengths": [16, 64, 512], "counts": [1, 0, 3]}))
    cfg = BenchmarkConfig(seq_len_distribution="histogram", seq_len_histogram_file=str(path))
    n = sample_seq_lengths(cfg, 2000, rng)
    assert set(n.tolist()) == {16, 512}
    assert 0.7 < (n == 512).mean() < 0.8


def test_histogram_errors_name_the_file(tmp_path, rng):
    cfg = BenchmarkConfig(
        seq_len_distribution="histogram", seq_len_histogram_file=str(tmp_path / "none.json")
    )
    with pytest.raises(InputFileNotFoundError, match="none.json"):
        sample_seq_lengths(cfg, 4, rng)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lengths": [4, 8], "counts": [1]}))
    with pytest.raises(ConfigError, match="seq_len_histogram_file"):
        sample_seq_lengths(cfg.replace(seq_len_histogram_file=str(bad)), 4, rng)


def test_requests_hold_valid_ids_and_a_matching_mask(rng):
    lengths = np.array([5, 9, 3, 7, 2, 8])
    reqs = make_requests(3, lengths, CB, rng)
    assert len(reqs) == 2
    first = reqs[0]
    assert first["encoder_l1_ids"].shape == (3, 9) and first["attention_mask"].sum(1).tolist() == [
        5,
        9,
        3,
    ]
    for r in reqs:
        for i, c in enumerate(CB):
            ids = r[f"encoder_l{i + 1}_ids"]
            assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < c
            assert (ids[r["attention_mask"] == 0] == 0).all()  # padding is zero


# ------------------------------------------------------------------------------- statistics
def test_percentiles_are_ordered_and_stability_follows_perf_analyzer(rng):
    p = percentiles(rng.lognormal(1.0, 0.7, 5000))
    assert p["min"] <= p["p50"] <= p["p90"] <= p["p95"] <= p["p99"] <= p["max"]
    assert is_stable([100, 104, 98], [10, 10.5, 9.6], 10)
    assert not is_stable([100, 130, 98], [10, 10, 10], 10)  # throughput moved
    assert not is_stable([100, 100, 100], [10, 20, 10], 10)  # p99 moved
    assert not is_stable([100, 100], [10, 10], 10)  # fewer than 3 windows


def test_errors_are_classified_by_what_the_server_said():
    from tritonclient.utils import InferenceServerException

    def exc(msg, status):
        return InferenceServerException(msg, status=status)

    assert classify_error(asyncio.TimeoutError()) == TIMED_OUT
    assert classify_error(exc("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED")) == TIMED_OUT
    assert classify_error(exc("Exceeds maximum queue size", "StatusCode.UNAVAILABLE")) == REJECTED
    assert classify_error(exc("Request timeout expired", "StatusCode.UNAVAILABLE")) == REJECTED
    assert (
        classify_error(exc("failed to connect to all addresses", "StatusCode.UNAVAILABLE"))
        == FAILED
    )


STATS = {
    "model_stats": [
        {
            "name": "m",
            "version": "1",
            "inference_count": "10",
            "execution_count": "4",
            "inference_stats": {
                "success": {"count": "10", "ns": "50000000"},
                "fail": {},
                "queue": {"count": "10", "ns": "10000000"},
                "compute_input": {"count": "10", "ns": "1000000"},
                "compute_infer": {"count": "10", "ns": "30000000"},
                "compute_output": {"count": "10", "ns": "2000000"},
            },
            "batch_stats": [
                {"batch_size": "1", "compute_infer": {"count": "2", "ns": "1"}},
                {"batch_size": "4", "compute_infer": {"count": "2", "ns": "1"}},
            ],
        },
        {"name": "other", "inference_count": "99"},
    ]
}


def test_server_breakdown_is_the_delta_over_the_window():
    before = stats_snapshot({}, "m")
    after = stats_snapshot(STATS, "m")
    server, batches = server_breakdown(before, after)
    assert server["queue_us"] == pytest.approx(1000)
    assert server["compute_infer_us"] == pytest.approx(3000)
    assert server["request_us"] == pytest.approx(5000)
    assert server["avg_batch"] == pytest.approx(2.5)
    assert batches == {1: 2, 4: 2}
    assert server_breakdown(after, after)[1] == {}


def test_metrics_give_cpu_and_per_gpu_values():
    text = """# HELP nv_gpu_utilization x
nv_cpu_utilization 0.5
nv_gpu_utilization{gpu_uuid="GPU-a"} 0.25
nv_gpu_utilization{gpu_uuid="GPU-b"} 0.75
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 1048576
nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 3145728
"""
    assert parse_metrics(text)["nv_gpu_utilization"][1] == ({"gpu_uuid": "GPU-b"}, 0.75)
    s = sample_metrics(text)
    assert s == {"cpu": 0.5, "gpus": {0: (0.25, 1048576.0), 1: (0.75, 3145728.0)}}
    out = summarize_samples([s, {"cpu": 0.7, "gpus": {0: (0.35, 2097152.0), 1: (0.75, 3145728.0)}}])
    assert out["host_cpu_utilization"] == pytest.approx(0.6)
    assert out["per_gpu"][0] == {
        "utilization": pytest.approx(0.3),
        "memory_used_mb": pytest.approx(2.0),
    }
    assert out["gpu_memory_used_mb"] == pytest.approx(5.0)
    assert (
        summarize_samples([sample_metrics("nv_cpu_utilization 0.1\n")]).get("gpu_utilization")
        is None
    )


def test_host_cpu_splits_server_client_and_others():
    import subprocess
    import sys

    from algorithm.serving.bench.monitor import HostCpu

    busy = "import time\nwhile time.process_time() < 0.5: pass\nprint('done', flush=True)\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
    try:
        host = HostCpu(child.pid)
        before = host.snapshot()
        assert child.stdout.readline().strip() == "done"
        after = host.snapshot()
    finally:
        child.kill()
        child.wait()
    d = HostCpu.delta(before, after, requests=10)
    assert d["server_cpu_ms_per_request"] * 10 >= 300  # the child's CPU seconds, per request
    assert d["other_cpu_percent"] >= 0 and d["client_cpu_percent"] >= 0
    assert HostCpu.delta(None, after, 10) == {}
    assert "server_cpu_percent" not in HostCpu.delta(HostCpu().snapshot(), HostCpu().snapshot(), 10)


def test_result_round_trips_through_json():
    r = BenchmarkResult(
        50.0,
        1,
        2,
        3,
        4,
        2,
        0.5,
        9,
        100,
        97,
        2,
        rejected_requests=1,
        model_name="m",
        concurrency=4,
        batch_sizes_formed={1: 3, 4: 5},
        per_gpu={0: {"utilization": 0.5}},
        latencies_ms=[1.0, 2.0],
    )
    d = json.loads(json.dumps(r.to_dict()))
    assert "latencies_ms" not in d and d["key"] == "bs1_fixed_c4"
    back = BenchmarkResult.from_dict(d)
    assert back.batch_sizes_formed == {1: 3, 4: 5} and back.per_gpu == {0: {"utilization": 0.5}}
    assert back.rejected_requests == 1 and "p99 4.00" in back.summary()


def test_config_rejects_bad_benchmark_fields():
    with pytest.raises(ConfigError, match="request_rates"):
        BenchmarkConfig(mode="request_rate")
    with pytest.raises(ConfigError, match="metrics_url"):
        BenchmarkConfig(metrics_url="localhost:8002")
    with pytest.raises(ConfigError, match="batch_size"):
        TritonBenchmark(BenchmarkConfig()).run("localhost:1", "m", batch_size=0)


def test_unreachable_server_fails_fast_naming_the_url():
    from algorithm.serving.triton.server import free_port

    url = f"127.0.0.1:{free_port()}"
    for protocol in ("grpc", "http"):
        with pytest.raises(BenchmarkError, match=url.replace(".", r"\.")) as e:
            TritonBenchmark(BenchmarkConfig(protocol=protocol)).run(url, "ugt", 1, 16)
        assert "not reachable" in str(e.value) and e.value.hint


# ------------------------------------------------------------------------------ real server
FAST = dict(num_warmup_requests=10, num_requests=40, measurement_window_s=0.5, max_trials=4)


@pytest.fixture(scope="module")
def repository(onnx_model, tmp_path_factory):
    """ugt_ort (ONNX Runtime, dynamic batching) and ugt_small_queue (max_queue_size 1)."""
    from algorithm.serving.triton_config import TritonConfigGenerator

    repo = tmp_path_factory.mktemp("bench_repo")
    ec = ExportConfig(precision="fp32", max_batch_size=16, max_seq_length=256)
    base = TritonConfig(
        platform="python",
        python_runtime="onnxruntime",
        instance_kind="KIND_CPU",
        gpus=(),
        instance_count=1,
        runtime_threads=1,
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=500,
        model_warmup=False,
    )
    TritonConfigGenerator(ec.replace(model_name="ugt_ort"), base).generate(
        repo, model_file=onnx_model
    )
    TritonConfigGenerator(
        ec.replace(model_name="ugt_small_queue"),
        base.replace(max_queue_size=1, preferred_batch_sizes=(), max_queue_delay_us=0),
    ).generate(repo, model_file=onnx_model)
    # served with a smaller contract than the benchmark's defaults: codebooks of 64/128/256 ids
    # (model.py refuses larger ids), histories up to 48, batches up to 4
    TritonConfigGenerator(
        ec.replace(
            model_name="ugt_small_cb",
            codebook_sizes=(64, 128, 256),
            max_seq_length=48,
            max_batch_size=4,
        ),
        base.replace(preferred_batch_sizes=(4,)),
    ).generate(repo, model_file=onnx_model)
    return repo


@pytest.fixture(scope="module")
def server(repository):
    from algorithm.serving.triton.server import TritonServer

    with TritonServer(repository, 0, 0, 0) as s:
        yield s


def _consistent(r: BenchmarkResult):
    assert (
        r.latency_min
        <= r.latency_p50
        <= r.latency_p90
        <= r.latency_p95
        <= r.latency_p99
        <= r.latency_max
    )
    assert r.successful_requests + r.failed_requests + r.rejected_requests == r.total_requests
    assert r.timed_out_requests <= r.failed_requests
    assert len(r.latencies_ms) == r.successful_requests
    assert r.trials >= 1 and len(r.window_throughputs) == r.trials


@pytest.mark.server
@pytest.mark.timeout(600)
def test_concurrency_numbers_agree_with_each_other(server):
    cfg = BenchmarkConfig(metrics_url=server.metrics_url, **FAST)
    bench = TritonBenchmark(cfg, server_pid=server.process.pid)
    r = bench.run(server.grpc_url, "ugt_ort", batch_size=1, seq_length=64, concurrency=4)
    _consistent(r)
    assert (
        r.failed_requests == r.rejected_requests == 0 and r.successful_requests >= cfg.num_requests
    )
    # Little's law: a closed loop of 4 keeps 4 in flight, so throughput x latency ~ 4.
    assert 0.6 < r.throughput * r.latency_avg / 1e3 / 4 < 1.4
    assert 3.0 < r.achieved_concurrency <= 4.05
    # The server saw exactly the measured requests (warm-up drained before the snapshot).
    assert r.server["success_count"] == r.successful_requests
    assert sum(b * n for b, n in r.batch_sizes_formed.items()) == r.server["inference_count"]
    assert r.server["compute_infer_us"] > 0 and r.server["request_us"] / 1e3 <= r.latency_avg
    assert r.host_cpu_utilization is not None and r.gpu_utilization is None and r.per_gpu == {}
    assert 0 < r.client_overhead_ms < r.latency_avg and r.rpc_floor_ms > 0
    # the server's process tree did the work: CPU seconds ~ requests x compute time
    assert r.server_cpu_percent > 10 and r.other_cpu_percent >= 0 and r.client_cpu_percent > 0
    assert (
        r.server_cpu_ms_per_request
        >= 0.5 * r.server["compute_infer_us"] / 1e3 / r.server["avg_batch"]
    )


@pytest.mark.server
@pytest.mark.timeout(600)
def test_sweep_batches_and_http(server):
    cfg = BenchmarkConfig(protocol="http", **FAST)
    results = TritonBenchmark(cfg).run_sweep(
        server.http_url, "ugt_ort", batch_sizes=(1, 4), seq_lengths=(32,), levels=(2,)
    )
    assert set(results) == {"bs1_seq32_c2", "bs4_seq32_c2"}
    for r in results.values():
        _consistent(r)
        assert r.protocol == "http" and r.failed_requests == 0
    # batch 4 requests: every execution holds a multiple of 4 rows
    assert all(b % 4 == 0 for b in results["bs4_seq32_c2"].batch_sizes_formed)


@pytest.mark.server
@pytest.mark.timeout(600)
def test_request_rate_mode_holds_its_rate(server):
    cfg = BenchmarkConfig(
        mode="request_rate", request_rates=(40.0,), **{**FAST, "measurement_window_s": 1.0}
    )
    r = TritonBenchmark(cfg).run(server.grpc_url, "ugt_ort", 1, 32)
    _consistent(r)
    assert r.request_rate == 40.0
    assert abs(r.achieved_rate - 40.0) / 40.0 < 0.10
    assert r.successful_requests == r.total_requests


@pytest.mark.server
@pytest.mark.timeout(600)
def test_lognormal_lengths_and_queue_rejections_are_counted(server):
    cfg = BenchmarkConfig(
        seq_len_distribution="lognormal", seq_len_median=32, seq_len_max=256, **FAST
    )
    r = TritonBenchmark(cfg).run(
        server.grpc_url, "ugt_small_queue", batch_size=2, seq_length=None, concurrency=12
    )
    _consistent(r)
    assert r.seq_length is None and r.seq_len_max <= 256 and r.key == "bs2_lognormal_c12"
    assert r.rejected_requests > 0  # queue of 1 behind one instance turns requests away
    assert r.failed_requests == 0 and r.successful_requests > 0
    assert any("queue" in msg.lower() for msg in r.errors)


@pytest.mark.server
@pytest.mark.timeout(600)
def test_run_benchmark_returns_the_guide_keys(server):
    d = run_benchmark(
        server.grpc_url,
        "ugt_ort",
        num_requests=20,
        num_warmup_requests=5,
        measurement_window_s=0.3,
        max_trials=3,
        test_seq_lengths=(16,),
    )
    for k in (
        "throughput",
        "latency_p50",
        "latency_p90",
        "latency_p95",
        "latency_p99",
        "total_requests",
    ):
        assert k in d
    assert d["seq_length"] == 16 and d["successful_requests"] >= 20
    from algorithm.serving import ServingExporter

    cfg = BenchmarkConfig(test_seq_lengths=(16,), **{**FAST, "measurement_window_s": 0.3})
    m = ServingExporter(benchmark_config=cfg).benchmark(server.grpc_url, "ugt_ort", num_requests=20)
    assert set(m) >= {"throughput", "latency_p50", "latency_p90", "latency_p99"}
    assert 0 < m["latency_p50"] <= m["latency_p90"] <= m["latency_p99"] and m["throughput"] > 0


@pytest.mark.server
@pytest.mark.timeout(600)
def test_unknown_model_is_a_clear_error(server):
    with pytest.raises(BenchmarkError, match="'nope' is not ready"):
        TritonBenchmark(BenchmarkConfig(**FAST)).run(server.grpc_url, "nope", 1, 16)


@pytest.mark.server
@pytest.mark.timeout(600)
def test_stopped_server_gives_failures_and_an_error_not_a_hang(repository):
    from algorithm.serving.triton.server import TritonServer

    s = TritonServer(repository, 0, 0, 0, load_models=["ugt_ort"], model_control="explicit").start()
    try:
        cfg = BenchmarkConfig(
            num_warmup_requests=5,
            num_requests=10**6,
            measurement_window_s=0.5,
            max_trials=1000,
            timeout_s=5.0,
        )
        timer = threading.Timer(1.5, s.stop)
        timer.start()
        with pytest.raises(BenchmarkError, match=s.grpc_url.replace(".", r"\.")) as e:
            TritonBenchmark(cfg).run(s.grpc_url, "ugt_ort", 1, 32, concurrency=4)
        timer.join()
    finally:
        s.stop()
    partial = e.value.result
    assert partial.failed_requests > 0 and partial.successful_requests > 0
    assert (
        partial.successful_requests + partial.failed_requests + partial.rejected_requests
        == partial.total_requests
    )


# ------------------------------------------------------------------------------ the served contract
def test_the_contract_is_read_from_either_protocols_config_form():
    from algorithm.serving.bench.loadgen import request_contract, served_contract

    params = {
        "max_seq_length": {"string_value": "48"},
        "codebook_sizes": {"string_value": "64,128,256"},
        "num_recommendations": {"string_value": "50"},
    }
    grpc_form = {"config": {"name": "m", "max_batch_size": 4, "parameters": params}}
    http_form = {"name": "m", "max_batch_size": 4, "parameters": params}
    want = {"max_batch_size": 4, "max_seq_length": 48, "codebook_sizes": (64, 128, 256),
            "num_recommendations": 50}  # fmt: skip
    assert served_contract(grpc_form) == served_contract(http_form) == want
    bare = served_contract({"config": {"name": "m", "max_batch_size": 8}})
    assert bare["codebook_sizes"] is None and bare["max_seq_length"] is None
    c = request_contract(BenchmarkConfig(), bare, 8, 1000)
    assert c["codebook_sizes"] == [1024, 4096, 16384] and c["seq_len_max"] == 1024
    assert c["source"] == {
        "max_batch_size": "server",
        "codebook_sizes": "default",
        "seq_len_max": "default",
    }
    c = request_contract(BenchmarkConfig(codebook_sizes=(8, 8, 8), seq_len_max=16), want, 2, None)
    assert c["codebook_sizes"] == [8, 8, 8] and c["seq_len_max"] == 16
    assert c["source"]["codebook_sizes"] == c["source"]["seq_len_max"] == "config"


@pytest.mark.server
@pytest.mark.timeout(600)
def test_requests_follow_the_served_models_contract(server):
    cfg = BenchmarkConfig(**FAST)  # codebooks and longest history left unset
    r = TritonBenchmark(cfg).run(server.grpc_url, "ugt_small_cb", batch_size=2, seq_length=32)
    assert r.failed_requests == 0 and r.successful_requests >= cfg.num_requests
    assert r.request_contract == {
        "codebook_sizes": [64, 128, 256],
        "seq_len_max": 48,
        "max_batch_size": 4,
        "num_recommendations": 50,
        "source": {"max_batch_size": "server", "codebook_sizes": "server", "seq_len_max": "server"},
    }
    mix = TritonBenchmark(
        cfg.replace(seq_len_distribution="lognormal", seq_len_median=40, protocol="http")
    ).run(server.http_url, "ugt_small_cb", batch_size=1, seq_length=None)
    assert mix.failed_requests == 0 and mix.seq_len_max <= 48  # capped at the server's 48
    # What the model would reject is refused before anything is sent.
    for kw, field in (
        ({"batch_size": 8, "seq_length": 16}, "batch_size"),
        ({"batch_size": 1, "seq_length": 64}, "seq_length"),
    ):
        with pytest.raises(ConfigError) as e:
            TritonBenchmark(cfg).run(server.grpc_url, "ugt_small_cb", **kw)
        assert e.value.field == field and "ugt_small_cb" in str(e.value)
    with pytest.raises(ConfigError) as e:
        TritonBenchmark(cfg.replace(codebook_sizes=CB)).run(server.grpc_url, "ugt_small_cb", 1, 16)
    assert e.value.field == "codebook_sizes" and "(64, 128, 256)" in str(e.value)


# ------------------------------------------------------------------------------ GPU monitoring
@pytest.mark.server
@pytest.mark.timeout(600)
def test_gpu_monitored_benchmark_without_a_gpu_reports_why(server, tmp_path):
    from algorithm.serving import ExtendedBenchmarkResult, GPUMonitoredBenchmark
    from algorithm.serving.bench.report import load_report

    bench = GPUMonitoredBenchmark(BenchmarkConfig(metrics_url=server.metrics_url, **FAST))
    results = bench.run_sweep(
        server.grpc_url, "ugt_ort", batch_sizes=(1,), seq_lengths=(16,), levels=(1, 2)
    )
    assert set(results) == {"bs1_seq16_c1", "bs1_seq16_c2"}
    for r in results.values():
        assert isinstance(r, ExtendedBenchmarkResult) and r.failed_requests == 0
        assert r.gpu_utilization_avg is r.gpu_memory_peak_mb is r.power_consumption_avg_w is None
        # the CPU-only server's metrics page has no nv_gpu_* series, and it says so
        assert "no nv_gpu_* series" in r.gpu_monitor_note and r.gpu_samples == 0
        assert r.host_cpu_utilization is not None  # the plain benchmark's samples still there
    text = bench.generate_report(results, tmp_path / "report.md")
    assert "GPU not measured:" in text and "no nv_gpu_* series" in text
    loaded, _, _ = load_report(tmp_path / "report.json")
    assert all(isinstance(r, ExtendedBenchmarkResult) for r in loaded.values())
    # a local server without metrics_url: this machine's GPUs through NVML, absent here
    local = GPUMonitoredBenchmark(BenchmarkConfig(**FAST)).run(server.grpc_url, "ugt_ort", 1, 16)
    assert "NVML could not start" in local.gpu_monitor_note


@pytest.mark.server
@pytest.mark.timeout(600)
def test_cli_gpu_monitor_flag(server, tmp_path):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    args = ["--json", "benchmark", "--url", server.grpc_url, "--model", "ugt_small_cb",
            "--requests", "20", "--warmup", "5", "--window", "0.3", "--max-trials", "3",
            "--seq-lengths", "16", "--gpu-monitor", "--output", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (r,) = data["results"].values()
    assert r["gpu_utilization_avg"] is None and "NVML" in r["gpu_monitor_note"]
    assert r["request_contract"]["codebook_sizes"] == [64, 128, 256]
    assert "GPU not measured" in (tmp_path / "report.md").read_text()
    plain = CliRunner().invoke(app, args[1:-3] + ["--seq-lengths", "200"])  # longer than served
    assert plain.exit_code == 1 and "200" in plain.output and "48" in plain.output
