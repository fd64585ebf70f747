"""Overload: at several times the measured capacity, Triton's queue policy (``max_queue_size``,
``default_queue_timeout_us`` from TritonConfig) turns away what it cannot serve in time with an
explicit UNAVAILABLE error, admitted requests keep a bounded latency, no request waits past the
bound, and TritonBenchmark counts the rejections apart from failures.

The bound is derived from the configuration and the capacity measured in the same run, never a
fixed number of milliseconds: queue timeout + a few times the P99 at capacity (one batch being
computed while the admitted request waits) + slack for a shared 2-core machine. Without a queue
policy the same load makes requests wait for seconds (the last test shows it).

Two model instances, as TritonConfig's default: with a single instance, Triton 2.51's dynamic
batcher under ``max_queue_size`` leaves the instance idle much of the time (goodput 15-30 % of
capacity in benchmarks/overload.py), though the policy still holds.
"""

from __future__ import annotations

import numpy as np
import pytest

from algorithm.serving import BenchmarkConfig, TritonServer
from algorithm.serving.benchmark import FAILED, REJECTED, TritonBenchmark, classify_error
from algorithm.serving.tests.reliability_helpers import fire, python_model, valid_request

MODEL, UNBOUNDED = "ugt_load", "ugt_unbounded"
MAX_BS, SEQ, INSTANCES = 8, 64, 2
# What can be served in time: the queue holds two batches; the timeout is the backstop, at
# least 200 ms and at least four times the P99 at capacity (a slow, shared machine must not
# time out requests that a queue of two batches serves in time).
QUEUE_SIZE, MIN_QUEUE_TIMEOUT_US = 2 * MAX_BS, 200_000
OVERLOAD_FACTORS = (3, 6)
REJECT_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


@pytest.fixture(scope="module")
def load_server(onnx_model, tmp_path_factory):
    """Explicit model control: the model without a queue policy first; the policed one is
    written and loaded once the capacity is known."""
    repo = tmp_path_factory.mktemp("overload_repo")
    python_model(repo, onnx_model, UNBOUNDED, max_batch_size=MAX_BS, instance_count=INSTANCES)
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, model_control="explicit"
    ) as server:
        yield server, repo


def _config(server, **fields) -> BenchmarkConfig:
    base = dict(
        triton_url=server.grpc_url,
        num_warmup_requests=2 * MAX_BS,
        num_requests=100,
        measurement_window_s=1.0,
        max_trials=3,
        timeout_s=10.0,
        seed=3,
    )
    return BenchmarkConfig(**{**base, **fields})


@pytest.fixture(scope="module")
def capacity(load_server):
    """Saturated closed loop (a full batch running and one waiting per instance): the
    throughput the model sustains, with no queue policy."""
    server, _ = load_server
    result = TritonBenchmark(_config(server, concurrency=2 * MAX_BS * INSTANCES)).run(
        server.grpc_url, UNBOUNDED, batch_size=1, seq_length=SEQ
    )
    assert result.rejected_requests == 0 and result.failed_requests == 0, result.errors
    return result


@pytest.fixture(scope="module")
def queue_timeout_us(load_server, capacity, onnx_model) -> int:
    """The same model behind TritonConfig(max_queue_size, default_queue_timeout_us)."""
    server, repo = load_server
    timeout_us = max(MIN_QUEUE_TIMEOUT_US, int(4 * capacity.latency_p99 * 1e3) // 10_000 * 10_000)
    python_model(
        repo,
        onnx_model,
        MODEL,
        max_batch_size=MAX_BS,
        instance_count=INSTANCES,
        max_queue_size=QUEUE_SIZE,
        default_queue_timeout_us=timeout_us,
        allow_timeout_override=False,
    )
    server.load_model(MODEL)
    policy = server.model_config(MODEL)["dynamic_batching"]["default_queue_policy"]
    assert int(policy["max_queue_size"]) == QUEUE_SIZE and policy["timeout_action"] == "REJECT"
    return timeout_us


def _bound_ms(capacity, timeout_us: int) -> float:
    return timeout_us / 1e3 + 4 * capacity.latency_p99 + 500.0


@pytest.mark.server
@pytest.mark.parametrize("factor", OVERLOAD_FACTORS)
def test_overload_is_rejected_explicitly_and_admitted_latency_stays_bounded(
    load_server, capacity, queue_timeout_us, factor
):
    server, _ = load_server
    bound_ms = _bound_ms(capacity, queue_timeout_us)
    rate = factor * capacity.throughput
    # The client deadline is the bound: any request, admitted or turned away, that waited longer
    # would be counted as timed out.
    cfg = _config(server, mode="request_rate", request_rates=(rate,), timeout_s=bound_ms / 1e3)
    r = TritonBenchmark(cfg).run(server.grpc_url, MODEL, batch_size=1, seq_length=SEQ)
    print(
        f"\noverload x{factor} (max_queue_size {QUEUE_SIZE}, queue timeout {queue_timeout_us / 1e3:.0f} ms): capacity {capacity.throughput:.1f} req/s (P99 {capacity.latency_p99:.1f} ms) "
        f"-> offered {rate:.0f} req/s (achieved {r.achieved_rate:.0f}): {r.total_requests} sent, "
        f"{r.successful_requests} ok ({r.throughput:.1f} req/s), {r.rejected_requests} rejected, "
        f"{r.failed_requests} failed; admitted P50 {r.latency_p50:.1f} P99 {r.latency_p99:.1f} "
        f"max {r.latency_max:.1f} ms (bound {bound_ms:.0f} ms); server queue {r.server.get('queue_us', 0) / 1e3:.1f} ms "
        f"avg, errors {r.errors}"
    )

    assert r.total_requests == r.successful_requests + r.failed_requests + r.rejected_requests
    assert r.rejected_requests > 0 and r.successful_requests > 0
    assert r.failed_requests == 0 and r.timed_out_requests == 0, r.errors
    assert set(r.errors) and all(any(m in e for m in REJECT_MESSAGES) for e in r.errors), r.errors
    assert all("UNAVAILABLE" in e for e in r.errors), r.errors
    assert r.latency_p99 <= r.latency_max <= bound_ms
    # Admitted requests waited in Triton's queue no longer than the policy allows (the mean over
    # the measured window; a request past the timeout is rejected, not run).
    assert r.server["queue_us"] <= queue_timeout_us


@pytest.mark.server
def test_rejections_and_failures_are_told_apart_from_the_servers_real_answers(
    load_server, queue_timeout_us
):
    """A burst larger than the queue gets real rejections; a malformed request a real failure."""
    import tritonclient.grpc as grpcclient

    server, _ = load_server
    rng = np.random.default_rng(9)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        burst = fire(client, MODEL, [valid_request(rng, 1, SEQ) for _ in range(6 * QUEUE_SIZE)])
        bad = valid_request(rng, 1, SEQ)
        bad["encoder_l1_ids"][0, 0] = -5
        ((_, invalid),) = fire(client, MODEL, [bad])
    finally:
        client.close()
    rejected = [e for _, e in burst if e is not None]
    answered = [r for r, _ in burst if r is not None]
    assert rejected and answered
    assert all(any(m in e.message() for m in REJECT_MESSAGES) for e in rejected)
    assert {classify_error(e) for e in rejected} == {REJECTED}
    assert classify_error(invalid) == FAILED and "encoder_l1_ids" in invalid.message()


@pytest.mark.server
def test_without_a_queue_policy_the_same_overload_waits_past_the_bound(
    load_server, capacity, queue_timeout_us
):
    """The contrast: no max_queue_size/timeout, the largest overload for ~2 s; requests queue
    up and blow through the bound the policy keeps (counted as timed out by the client deadline)."""
    server, _ = load_server
    bound_ms = _bound_ms(capacity, queue_timeout_us)
    cfg = _config(
        server,
        mode="request_rate",
        request_rates=(max(OVERLOAD_FACTORS) * capacity.throughput,),
        timeout_s=bound_ms / 1e3,
        max_trials=2,
        num_warmup_requests=MAX_BS,
    )
    r = TritonBenchmark(cfg).run(server.grpc_url, UNBOUNDED, batch_size=1, seq_length=SEQ)
    print(
        f"\nno queue policy x{max(OVERLOAD_FACTORS)}: {r.total_requests} sent, {r.successful_requests} ok, "
        f"{r.rejected_requests} rejected, {r.timed_out_requests} past the {bound_ms:.0f} ms bound; "
        f"admitted P99 {r.latency_p99:.1f} ms"
    )
    assert r.rejected_requests == 0
    assert r.timed_out_requests > 0
