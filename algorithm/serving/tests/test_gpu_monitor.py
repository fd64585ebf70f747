"""GPUMonitor and ExtendedBenchmarkResult (guide 10.2): the figures, their sources, the report.

This machine has no GPU: NVML (nvidia-ml-py is installed) fails for real and the monitor says
why. The arithmetic over samples is checked with an NVML stand-in in ``sys.modules["pynvml"]``
(guide 7.3's mock import) that answers the calls NvmlSource makes with fixed readings. The
benchmark against the real server is in test_benchmark.py (it shares that file's server).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from algorithm.serving import ExtendedBenchmarkResult, GPUMonitor
from algorithm.serving.bench.gpu_monitor import (
    MetricsSource,
    NvmlSource,
    is_local,
    open_source,
    server_host,
)


class _Util:
    def __init__(self, gpu):
        self.gpu = gpu


class _Mem:
    def __init__(self, used):
        self.used = used


def fake_nvml(readings: dict[int, list[tuple]], names=("NVIDIA H100", "NVIDIA H100")):
    """A pynvml stand-in: GPU i answers readings[i][k] (util %, memory MiB, power W or None)
    on its k-th sample (the last one repeats). Records init/shutdown."""
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("pynvml", None))
    mod.calls = []
    mod.count = {i: 0 for i in readings}

    class NVMLError(Exception):
        pass

    def reading(h):
        rows = readings[h]
        return rows[min(mod.count[h], len(rows) - 1)]

    def util(h):
        return _Util(reading(h)[0])

    def mem(h):
        return _Mem(reading(h)[1] * 2**20)

    def power(h):
        r = reading(h)
        mod.count[h] += 1  # NvmlSource reads power last: the next sample moves on
        if r[2] is None:
            raise NVMLError("Not Supported")
        return int(r[2] * 1000)

    mod.NVMLError = NVMLError
    mod.nvmlInit = lambda: mod.calls.append("init")
    mod.nvmlShutdown = lambda: mod.calls.append("shutdown")
    mod.nvmlDeviceGetCount = lambda: len(readings)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: names[h]
    mod.nvmlDeviceGetUtilizationRates = util
    mod.nvmlDeviceGetMemoryInfo = mem
    mod.nvmlDeviceGetPowerUsage = power
    return mod


def test_without_a_gpu_every_figure_is_none_and_the_note_says_why():
    with GPUMonitor(interval_s=0.05) as mon:
        pass
    assert not mon.available and mon.samples == []
    assert mon.avg_utilization is None and mon.peak_memory_mb is None
    assert mon.avg_power_w is None and mon.energy_j is None
    # nvidia-ml-py is installed here; NVML itself finds no driver
    assert "NVML could not start" in mon.note and "nvidia-smi" in mon.note
    s = mon.summary()
    assert s["gpu_utilization_avg"] is None and s["gpu_monitor_note"] == mon.note
    r = ExtendedBenchmarkResult.extend(_base_result(), s)
    assert "not measured: NVML could not start" in r.summary()


def test_nvml_figures_are_averages_peaks_and_sums(monkeypatch):
    readings = {
        0: [(50, 1000, 200.0), (70, 3000, 300.0), (90, 2000, 250.0)],
        1: [(10, 500, None), (30, 700, None), (20, 600, None)],  # a board without power readings
    }
    nvml = fake_nvml(readings)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    src = NvmlSource()
    assert src.open() is None and src.names == {0: "NVIDIA H100", 1: "NVIDIA H100"}
    mon = GPUMonitor()
    mon.source_name, mon.names = "nvml", src.names
    for t in (0.0, 1.0, 2.0):  # three samples, one second apart
        mon.samples.append((t, src.sample()))
    src.close()
    assert nvml.calls == ["init", "shutdown"]
    gpus = mon.per_gpu()
    assert [g["utilization_avg"] for g in gpus] == [pytest.approx(70), pytest.approx(20)]
    assert [g["memory_peak_mb"] for g in gpus] == [pytest.approx(3000), pytest.approx(700)]
    assert [g["power_avg_w"] for g in gpus] == [pytest.approx(250.0), None]
    assert mon.avg_utilization == pytest.approx(45)  # mean over the GPUs
    assert mon.peak_memory_mb == pytest.approx(3700)  # the largest sample-wise total
    assert mon.avg_power_w == pytest.approx(250.0)  # summed over the GPUs that report power
    assert mon.energy_j == pytest.approx((200 + 300) / 2 + (300 + 250) / 2)  # trapezoids, 1 s each
    s = mon.summary()
    assert s["gpu_indices"] == [0, 1] and s["power_consumption_avg_w_per_gpu"] == [
        pytest.approx(250.0),
        None,
    ]
    r = ExtendedBenchmarkResult.extend(_base_result(successful_requests=100), s)
    assert r.energy_per_request_j == pytest.approx(r.energy_j / 100)
    assert "util 45%" in r.summary() and "power 250 W" in r.summary()


def test_the_sampling_thread_takes_a_first_and_a_last_sample(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: [(40, 100, 100.0), (60, 200, 120.0)]}))
    with GPUMonitor(interval_s=3600) as mon:  # the interval never elapses inside the block
        assert mon._thread is not None and mon._thread.is_alive()
    assert mon._thread is None and len(mon.samples) == 2
    assert mon.source_name == "nvml" and mon.peak_memory_mb == pytest.approx(200)
    assert GPUMonitor(gpus=[3]).start().stop().note.startswith("NVML sees 1 GPU(s), none of [3]")


METRICS = """# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
nv_gpu_utilization{gpu_uuid="GPU-a"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-b"} 0.25
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 2147483648
nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 1073741824
nv_gpu_power_usage{gpu_uuid="GPU-a"} 310.5
nv_gpu_power_usage{gpu_uuid="GPU-b"} 120
nv_cpu_utilization 0.3
"""


def test_a_remote_servers_gpus_come_from_its_nv_gpu_metrics(monkeypatch):
    from algorithm.serving.bench import gpu_monitor

    pages = {
        "http://gpu-host:8002/metrics": METRICS,
        "http://cpu-host:8002/metrics": "nv_cpu_utilization 0.1\n",
    }
    monkeypatch.setattr(gpu_monitor, "fetch_metrics", lambda url, timeout=1.0: pages[url])
    src = MetricsSource("http://gpu-host:8002/metrics")
    assert src.open() is None
    assert src.sample() == {0: (50.0, 2147483648.0, 310.5), 1: (25.0, 1073741824.0, 120.0)}
    assert src.names == {0: "GPU-a", 1: "GPU-b"}
    _, why = open_source("http://cpu-host:8002/metrics")
    assert "no nv_gpu_* series" in why
    # GPUMonitor.for_server: local servers are read through NVML, remote ones through metrics
    mon = GPUMonitor.for_server("gpu-host:8001")
    assert mon.metrics_url == "http://gpu-host:8002/metrics"
    assert GPUMonitor.for_server("localhost:8001").metrics_url is None
    assert (
        GPUMonitor.for_server("gpu-host:8001", "http://m:9/metrics").metrics_url
        == "http://m:9/metrics"
    )
    with GPUMonitor(interval_s=0.01, metrics_url="http://gpu-host:8002/metrics") as mon:
        pass
    assert mon.avg_utilization == pytest.approx(37.5) and mon.peak_memory_mb == pytest.approx(3072)
    assert mon.avg_power_w == pytest.approx(430.5) and mon.source_name.startswith(
        "metrics http://gpu-host"
    )


def test_hosts_are_read_from_every_url_form():
    assert server_host("localhost:8001") == "localhost"
    assert server_host("grpc://10.0.0.2:8001") == "10.0.0.2"
    assert server_host("http://triton.svc:8000/v2") == "triton.svc"
    assert server_host("[::1]:8001") == "::1"
    assert is_local("127.0.0.1:8001") and is_local("[::1]:8001") and is_local("localhost:1")
    assert not is_local("203.0.113.7:8001")  # TEST-NET-3: never this machine


def _base_result(**kw):
    from algorithm.serving import BenchmarkResult

    fields = dict(throughput=10.0, latency_p50=1, latency_p90=2, latency_p95=3, latency_p99=4,
                  latency_avg=2, latency_min=0.5, latency_max=9, total_requests=10,
                  successful_requests=10, failed_requests=0, model_name="m", concurrency=1)  # fmt: skip
    fields.update(kw)
    return BenchmarkResult(**fields)


def test_reports_show_power_and_memory_beside_utilization(tmp_path):
    from algorithm.serving.bench.report import load_report, write_report

    measured = {
        f"bs1_seq64_c{c}": ExtendedBenchmarkResult.extend(
            _base_result(concurrency=c, seq_length=64, throughput=100.0 * c),
            {
                "gpu_utilization_avg": 30.0 * c,
                "gpu_memory_peak_mb": 1000.0 + c,
                "power_consumption_avg_w": 100.0 + 50 * c,
                "energy_j": 20.0 * c,
                "gpu_indices": [0],
                "gpu_names": ["NVIDIA H100"],
                "gpu_utilization_avg_per_gpu": [30.0 * c],
                "gpu_memory_peak_mb_per_gpu": [1000.0 + c],
                "power_consumption_avg_w_per_gpu": [100.0 + 50 * c],
                "gpu_samples": 10,
                "gpu_monitor": "nvml",
            },
        )
        for c in (1, 2)
    }
    text = write_report(measured, tmp_path / "report.md")
    gpu = text.split("## GPU", 1)[1]
    assert "| util % | memory peak MB | power W | mJ/request |" in gpu
    assert "| 60.0 | 1002 | 200.0 | 4000.00 |" in gpu  # c2: 20 J * 2 / 10 requests
    assert "0 NVIDIA H100: 60%, 1002 MB, 200 W" in gpu
    assert (tmp_path / "report_gpu.png").stat().st_size > 0
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert "power_consumption_avg_w" in csv[0] and ",200.0," in csv[2]
    results, _, _ = load_report(tmp_path / "report.json")
    assert isinstance(results["bs1_seq64_c2"], ExtendedBenchmarkResult)
    assert results["bs1_seq64_c2"].power_consumption_avg_w == 200.0
    # No GPU: the report says why, no plot, no crash.
    none = {
        "k": ExtendedBenchmarkResult.extend(_base_result(), {"gpu_monitor_note": "no NVML here"})
    }
    text = write_report(none, tmp_path / "cpu" / "report.md")
    assert "GPU not measured: no NVML here" in text
    assert not (tmp_path / "cpu" / "report_gpu.png").exists()
