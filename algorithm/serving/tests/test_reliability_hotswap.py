"""Hot swap: publishing a new version and rolling back while TritonBenchmark keeps the server
loaded fails no request; verified by counting (successful == total), with the version that
answered checked after every change.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from algorithm.serving import BenchmarkConfig, ModelVersionManager, TritonServer
from algorithm.serving.benchmark import TritonBenchmark
from algorithm.serving.tests.reliability_helpers import grpc_inputs, python_model, valid_request

MODEL = "ugt_swap"


@pytest.fixture(scope="module")
def swap_server(onnx_model, tmp_path_factory):
    repo = tmp_path_factory.mktemp("swap_repo")
    python_model(repo, onnx_model, MODEL, max_batch_size=8)
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, model_control="explicit"
    ) as server:
        yield server, repo


def _served_version(client, x) -> str:
    return client.infer(MODEL, grpc_inputs(x)).get_response().model_version


@pytest.mark.server
def test_deploy_and_rollback_under_load_fail_no_request(swap_server, onnx_model):
    import tritonclient.grpc as grpcclient

    server, repo = swap_server
    manager = ModelVersionManager(repo)
    probe = grpcclient.InferenceServerClient(server.grpc_url)
    x = valid_request(np.random.default_rng(0), 2, 24)
    assert _served_version(probe, x) == "1"

    windows: list[dict] = []
    measuring = threading.Event()

    def progress(event, info):
        if event == "window":
            windows.append(info)
            measuring.set()

    # A 0 % stability rule is never met, so the benchmark runs max_trials windows; it reads
    # max_trials after every window, so the test ends it two windows after the last change.
    cfg = BenchmarkConfig(
        triton_url=server.grpc_url,
        concurrency=4,
        num_warmup_requests=8,
        num_requests=1,
        stability_percent=0.0,
        measurement_window_s=0.5,
        max_trials=240,
        timeout_s=30.0,
    )
    outcome: dict = {}

    def load():
        try:
            outcome["result"] = TritonBenchmark(cfg, progress).run(server.grpc_url, MODEL, 1, 32)
        except BaseException as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        assert measuring.wait(60), "the benchmark never started measuring"
        steps = []
        # Publish v2 and switch to it; roll back to v1; roll forward to the retired v2.
        assert manager.deploy_version(MODEL, onnx_model) == 2
        for expected, change in ((2, None), (1, 1), (2, 2)):
            if change is not None:
                assert manager.rollback(MODEL, change)["served"] == expected
            server.load_model(MODEL)
            assert server.model_ready(MODEL, expected)
            steps.append((expected, _served_version(probe, x), len(windows)))
        swapped_at = len(windows)
    finally:
        cfg.max_trials = len(windows) + 2
        thread.join(120)
        probe.close()
    assert not thread.is_alive(), "the benchmark did not finish"
    assert "error" not in outcome, outcome.get("error")
    r = outcome["result"]
    print(
        f"\nhot swap under load: {r.total_requests} requests ({r.throughput:.1f} req/s), "
        f"{r.successful_requests} ok, {r.failed_requests} failed, {r.rejected_requests} rejected; "
        f"P99 {r.latency_p99:.1f} ms, max {r.latency_max:.1f} ms; swaps done by window {swapped_at} of {len(windows)}"
    )

    assert [(e, served) for e, served, _ in steps] == [(2, "2"), (1, "1"), (2, "2")]
    # The three changes happened while the benchmark measured: windows before and after them.
    assert steps[0][2] >= 1 and swapped_at < len(windows)
    assert r.total_requests > 0 and r.successful_requests == r.total_requests, r.errors
    assert r.failed_requests == 0 and r.rejected_requests == 0 and r.timed_out_requests == 0
    assert manager.list_versions(MODEL) == [1, 2] and manager.retired_versions(MODEL) == []
