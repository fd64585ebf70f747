"""A/B tests and shadow traffic routed inside the real Triton server (issue 18).

The arms are a small untrained UGT (K=8, one encoder layer: ten thousand routed users take
seconds, not minutes, on 2 cores) exported to ONNX, served by model.py. A is that artifact; B
is A with every weight moved by up to 5 % (another artifact: same contract, close but not equal
answers, so the shadow comparison has something to measure). One server (explicit model
control, PYTHONHASHSEED=1) holds them and one router per behaviour under test:

- ugt_a, ugt_b: the two arms;
- ugt_b_short: B that refuses histories longer than 8 items (a broken candidate);
- ugt_b_slow: B whose batcher holds a request up to 10 s (a slow candidate);
- ugt_b_gone: B in the repository but never loaded (a missing candidate).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from algorithm.serving import (
    ABExperiment,
    ABTestingRouter,
    ExportConfig,
    TritonConfig,
    TritonConfigGenerator,
    TritonServer,
    validate_deployment,
)
from algorithm.serving.bench.experiment import router_results
from algorithm.serving.bench.monitor import stats_snapshot
from algorithm.serving.config import ExperimentConfig
from algorithm.serving.tests.reliability_helpers import grpc_inputs, outputs, valid_request
from algorithm.serving.traffic import mirrored
from algorithm.serving.verify.parity import compare_outputs

K, MAX_SEQ = 8, 64
ARMS = ("ugt_a", "ugt_b", "ugt_b_short", "ugt_b_slow", "ugt_b_gone")
# one router instance each (fewer processes on 2 cores), but rt_swap keeps the default (2)
ROUTERS = {
    "rt_ab": {"model_b": "ugt_b", "mode": "ab", "traffic_split": 0.3, "instance_count": 1},
    "rt_shadow": {
        "model_b": "ugt_b",
        "mode": "shadow",
        "shadow_fraction": 0.3,
        "instance_count": 1,
    },
    "rt_broken": {
        "model_b": "ugt_b_short",
        "mode": "shadow",
        "shadow_fraction": 1.0,
        "instance_count": 1,
    },
    "rt_gone": {
        "model_b": "ugt_b_gone",
        "mode": "shadow",
        "shadow_fraction": 1.0,
        "instance_count": 1,
    },
    "rt_slow": {
        "model_b": "ugt_b_slow",
        "mode": "shadow",
        "shadow_fraction": 1.0,
        "shadow_timeout_ms": 200,
        "instance_count": 1,
    },
    "rt_swap": {"model_b": "ugt_b", "mode": "ab", "traffic_split": 0.5},
}


def _artifacts(folder) -> tuple:
    """(A, B): the small model's ONNX export, and a copy with its weights perturbed."""
    import onnx
    import torch
    from onnx import numpy_helper

    from algorithm.serving import export_to_onnx
    from algorithm.ugt import UGTConfig, UGTModel

    torch.manual_seed(0)
    config = UGTConfig.tiny(
        d_model=32, n_heads=2, n_encoder_layers=1, d_ff=64, num_recommendations=K
    )
    ec = ExportConfig(max_batch_size=8, max_seq_length=MAX_SEQ, num_recommendations=K)
    a = export_to_onnx(UGTModel(config).eval(), folder / "a.onnx", ec)
    graph = onnx.load(str(a))
    rng = np.random.default_rng(0)
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        # weights only: not the mask's fill value (the float minimum) or other constants
        if w.dtype == np.float32 and w.size > 1 and np.abs(w).max() < 1e4:
            moved = w * (1 + 0.05 * rng.uniform(-1, 1, w.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(moved, init.name))
    b = folder / "b.onnx"
    onnx.save(graph, str(b))
    shutil.copyfile(f"{a}.json", f"{b}.json")  # the same contract
    return a, b


def _deploy(repo, artifact, name: str, max_seq_length: int = MAX_SEQ, **triton_fields):
    ec = ExportConfig(
        model_name=name,
        max_batch_size=8,
        max_seq_length=max_seq_length,
        opt_seq_length=min(8, max_seq_length),
        num_recommendations=K,
    )
    fields = {
        "platform": "python",
        "instance_kind": "KIND_CPU",
        "instance_count": 1,
        "preferred_batch_sizes": (8,),
        "max_queue_delay_us": 2000,
        "runtime_threads": 1,
        **triton_fields,
    }
    TritonConfigGenerator(ec, TritonConfig(**fields)).generate(repo, model_file=artifact)


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    a, b = _artifacts(tmp_path_factory.mktemp("abtest_artifacts"))
    repo = tmp_path_factory.mktemp("abtest_repo")
    _deploy(repo, a, "ugt_a")
    _deploy(repo, b, "ugt_b")
    _deploy(repo, b, "ugt_b_short", max_seq_length=8)
    # a queue policy lets a request's own timeout (the router's shadow timeout) apply
    _deploy(
        repo, b, "ugt_b_slow", max_queue_delay_us=10_000_000, default_queue_timeout_us=60_000_000
    )
    _deploy(repo, b, "ugt_b_gone")
    for name, fields in ROUTERS.items():
        ABExperiment.create(repo, ExperimentConfig(router_name=name, model_a="ugt_a", **fields))
    check = validate_deployment(repo)
    assert check["valid"], check["errors"]
    assert check["info"]["models"]["rt_ab"]["platform"] == "router"
    loaded = [m for m in (*ARMS, *ROUTERS) if m != "ugt_b_gone"]
    with TritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control="explicit",
        load_models=loaded,
        env={"PYTHONHASHSEED": "1"},
    ) as server:
        yield server, repo


def _client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def _router_inputs(x: dict, users: list) -> list:
    import tritonclient.grpc as grpcclient

    inputs = grpc_inputs(x)
    ids = np.array([[str(u).encode()] for u in users], dtype=np.object_)
    u = grpcclient.InferInput("user_id", list(ids.shape), "BYTES")
    u.set_data_from_numpy(ids)
    return [*inputs, u]


def _fire_routed(client, router: str, requests: list) -> list:
    """[(arms, outputs, error)] of (inputs, users) requests sent at once."""
    results: list = [None] * len(requests)
    done = threading.Semaphore(0)
    for i, (x, users) in enumerate(requests):

        def callback(result, error, i=i):
            if error:
                results[i] = (None, None, error)
            else:
                arms = [a.decode() for a in result.as_numpy("arm")[:, 0]]
                results[i] = (arms, outputs(result), None)
            done.release()

        client.async_infer(router, _router_inputs(x, users), callback, client_timeout=120)
    for _ in requests:
        assert done.acquire(timeout=180), "a routed request got no answer"
    return results


def _counts(server, model: str) -> dict:
    snap = stats_snapshot(server.statistics(model), model)
    return {"rows": snap["inference_count"], "ok": snap["success"][0], "fail": snap["fail"][0]}


def _router(server, name: str) -> dict:
    return router_results(server.metrics(), name)


def _wait(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout_s:.0f} s")
        time.sleep(0.1)


def _shadow(server, router: str, outcome: str) -> int:
    s = _router(server, router)["arms"].get("b", {}).get("shadow", {})
    return s.get("requests", {}).get(outcome, 0)


# ------------------------------------------------------------------------------ the split
@pytest.mark.server
@pytest.mark.slow
def test_10000_users_split_in_the_server_as_the_client_predicts(ab):
    server, repo = ab
    client = _client(server)
    rng = np.random.default_rng(7)
    users = [f"user-{i}" for i in range(10_000)]
    requests = [(valid_request(rng, 8, 4), users[i : i + 8]) for i in range(0, len(users), 8)]
    before = {m: _counts(server, m) for m in ("ugt_a", "ugt_b")}
    results = _fire_routed(client, "rt_ab", requests)
    assert [e for _, _, e in results if e is not None] == []
    arms = [a for r, _, _ in results for a in r]

    predicted = ABTestingRouter.from_repository(repo, "rt_ab")
    assert predicted.traffic_split == 0.3
    assert arms == [predicted.route(u) for u in users]
    n_a = arms.count("ugt_a")
    n, p = len(users), 0.3
    assert abs(n_a - n * p) <= 4 * (n * p * (1 - p)) ** 0.5, n_a  # 4 sigma of the binomial
    # The arms themselves saw exactly those rows.
    after = {m: _counts(server, m) for m in ("ugt_a", "ugt_b")}
    assert after["ugt_a"]["rows"] - before["ugt_a"]["rows"] == n_a
    assert after["ugt_b"]["rows"] - before["ugt_b"]["rows"] == n - n_a
    # Rows of a request split between the arms come back in the request's order.
    for x, ids in requests[:20]:
        served, routed, _ = _fire_routed(client, "rt_ab", [(x, ids)])[0]
        direct = {m: outputs(client.infer(m, grpc_inputs(x))) for m in ("ugt_a", "ugt_b")}
        expected = {k: np.stack([direct[m][k][i] for i, m in enumerate(served)]) for k in routed}
        assert compare_outputs(expected, routed)["recall_overlap"] >= 0.99
    counters = _router(server, "rt_ab")["arms"]
    assert counters["a"]["served"]["users"] >= n_a and counters["b"]["served"]["users"] >= n - n_a


@pytest.mark.server
@pytest.mark.slow
def test_a_users_arm_is_the_same_in_every_process_and_after_a_restart(ab):
    server, repo = ab
    users = [f"member-{i}" for i in range(400)] + list(range(100))
    rng = np.random.default_rng(1)

    def served_arms(srv) -> list[str]:
        reqs = [(valid_request(rng, 4, 4), users[i : i + 4]) for i in range(0, len(users), 4)]
        out = _fire_routed(_client(srv), "rt_ab", reqs)
        assert all(e is None for _, _, e in out)
        return [a for r, _, _ in out for a in r]

    first = served_arms(server)  # stubs started with PYTHONHASHSEED=1
    script = (
        "import json, sys; from algorithm.serving import ABTestingRouter; "
        "r = ABTestingRouter.from_repository(sys.argv[1], 'rt_ab'); "
        "print(json.dumps([r.route(u) for u in json.loads(sys.argv[2])]))"
    )
    for seed in ("3", "4"):
        run = subprocess.run(
            [sys.executable, "-c", script, str(repo), json.dumps([str(u) for u in users])],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert json.loads(run.stdout) == first
    # A second server (a restart: new router processes, another hash seed) routes alike.
    with TritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control="explicit",
        load_models=["ugt_a", "ugt_b", "rt_ab"],
        env={"PYTHONHASHSEED": "2"},
    ) as again:
        assert served_arms(again) == first
    assert 0.2 < first.count("ugt_a") / len(first) < 0.4


# ------------------------------------------------------------------------------ shadow
@pytest.mark.server
@pytest.mark.slow
def test_shadow_answers_are_a_s_and_b_sees_the_mirrored_share(ab, tmp_path):
    server, repo = ab
    client = _client(server)
    rng = np.random.default_rng(3)
    users = [f"shadow-{i}" for i in range(120)]
    exp = ABExperiment(repo, "rt_shadow").config
    want = [u for u in users if mirrored(u, exp.shadow_fraction, exp.hash_salt)]
    sent = {}
    b_before = _counts(server, "ugt_b")
    for u in users:  # one at a time: no batching, so A's direct answer is bit-identical
        x = sent[u] = valid_request(rng, 1, 16)
        routed = client.infer("rt_shadow", _router_inputs(x, [u]))
        direct = outputs(client.infer("ugt_a", grpc_inputs(x)))
        assert routed.as_numpy("arm")[0, 0] == b"ugt_a"
        np.testing.assert_array_equal(routed.as_numpy("recommendations"), direct["recommendations"])
        np.testing.assert_array_equal(routed.as_numpy("scores"), direct["scores"])
    # B received exactly the mirrored users' requests, after A had answered them.
    _wait(lambda: _shadow(server, "rt_shadow", "success") == len(want), "mirrors answered")
    assert _counts(server, "ugt_b")["rows"] - b_before["rows"] == len(want)
    assert 0.15 < len(want) / len(users) < 0.45
    live = _wait(
        lambda: (
            (r := _router(server, "rt_shadow"))["shadow"].get("compared_users") == len(want) and r
        ),
        "comparisons counted",
    )
    assert live["arms"]["a"]["served"]["users"] == len(users)
    # The router's agreement is what comparing the two arms' direct answers gives.
    reports = [
        compare_outputs(
            outputs(client.infer("ugt_a", grpc_inputs(sent[u]))),
            outputs(client.infer("ugt_b", grpc_inputs(sent[u]))),
        )
        for u in want
    ]
    shadow = live["shadow"]
    expected = {k: float(np.mean([r[k] for r in reports])) for k in shadow if k != "compared_users"}
    assert 0.05 < expected["recall_overlap"] < 0.999  # B really differs from A, and not wholly
    for key in ("recall_overlap", "top1_agreement"):
        assert abs(shadow[key] - expected[key]) <= 1.5 / len(want), (key, shadow, expected)
    assert shadow["mean_score_diff"] == pytest.approx(expected["mean_score_diff"], rel=0.1)

    # The report says the same, in markdown, JSON and a plot.
    paths = ABExperiment(
        repo, "rt_shadow", url=server.http_url, metrics_url=server.metrics_url
    ).report(tmp_path / "report")
    with open(paths["json"]) as f:
        data = json.load(f)
    assert data["live"]["shadow"]["compared_users"] == len(want)
    assert data["live"]["arm_statistics"]["b"]["model"] == "ugt_b"
    with open(paths["markdown"]) as f:
        text = f.read()
    assert "Shadow agreement" in text and f"users compared: {len(want)}" in text
    assert os.path.getsize(paths["plot"]) > 1000


@pytest.mark.server
@pytest.mark.slow
def test_a_broken_or_missing_b_fails_no_request(ab):
    server, _ = ab
    client = _client(server)
    rng = np.random.default_rng(5)
    short_before = _counts(server, "ugt_b_short")
    for router in ("rt_broken", "rt_gone"):
        reqs = [(valid_request(rng, 2, 24, ragged=False), [f"{router}-{i}"] * 2) for i in range(40)]
        results = _fire_routed(client, router, reqs)
        assert [e for _, _, e in results if e is not None] == []
        assert {a for arms, _, _ in results for a in arms} == {"ugt_a"}
        # every mirror reached B and failed there (or never reached a B that is not loaded)
        _wait(lambda r=router: _shadow(server, r, "error") == 40, f"{router}: B's failures")
        assert _shadow(server, router, "success") == 0
    # ugt_b_short received every mirror (40 requests of 2 histories) and refused them
    assert _counts(server, "ugt_b_short")["rows"] - short_before["rows"] == 80


@pytest.mark.server
@pytest.mark.slow
def test_a_slow_b_does_not_hold_a_s_answers(ab):
    """B's batcher would hold each mirror up to 10 s: A's answers all come back while B has
    answered none, and B's queue turns the mirrors away at the router's shadow timeout."""
    server, _ = ab
    client = _client(server)
    rng = np.random.default_rng(9)
    slow_before = _counts(server, "ugt_b_slow")
    for i in range(5):
        x = valid_request(rng, 1, 16)
        routed = client.infer("rt_slow", _router_inputs(x, [f"slow-{i}"]))
        assert routed.as_numpy("arm")[0, 0] == b"ugt_a"
    assert _counts(server, "ugt_b_slow")["ok"] == slow_before["ok"]
    _wait(lambda: _shadow(server, "rt_slow", "timeout") == 5, "slow B's mirrors timed out")
    assert _shadow(server, "rt_slow", "success") == 0


# ------------------------------------------------------------------- changes under load
@pytest.mark.server
@pytest.mark.slow
def test_split_change_promote_and_stop_under_load_fail_no_request(ab):
    server, repo = ab
    exp = ABExperiment(repo, "rt_swap", url=server.http_url)
    stop = threading.Event()
    served: list[tuple[str, str]] = []  # (phase, arm)
    failures: list[str] = []
    phase = ["start"]

    def load(seed: int):
        client = _client(server)
        rng = np.random.default_rng(seed)
        i = 0
        while not stop.is_set():
            i += 1
            inputs = _router_inputs(valid_request(rng, 1, 12), [f"load-{seed}-{i}"])
            sent_in = phase[0]
            try:
                r = client.infer("rt_swap", inputs, client_timeout=60)
            except Exception as e:  # every failure is reported by the assertion below
                failures.append(f"{sent_in}: {e}")
                continue
            # A request that spanned a change may be answered by either setting: only those
            # sent and answered within one phase are held to it.
            served.append(
                (sent_in if phase[0] == sent_in else "change", r.as_numpy("arm")[0, 0].decode())
            )
        client.close()

    probe_users = [f"probe-{i}" for i in range(32)]
    probe = _client(server)

    def probe_arms() -> list[str]:
        rows = [
            (valid_request(np.random.default_rng(0), 4, 4), probe_users[i : i + 4])
            for i in range(0, 32, 4)
        ]
        return [a for arms, _, e in _fire_routed(probe, "rt_swap", rows) for a in arms]

    threads = [threading.Thread(target=load, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(served) >= 20, "load running")
        steps = [
            ("split 0.2", lambda: exp.set_split(traffic_split=0.2)),
            ("split 0.8", lambda: exp.set_split(traffic_split=0.8)),
            ("promote", exp.promote),
            ("stop", exp.stop),
        ]
        for name, change in steps:
            n = len(served)
            result = change()
            assert result["server"].startswith("reloaded")
            phase[0] = name
            want = [ABTestingRouter.from_experiment(exp.config).route(u) for u in probe_users]
            assert probe_arms() == want, name
            _wait(lambda n=n: len(served) >= n + 10, f"load after {name}")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert failures == []
    by_phase = {p: {a for q, a in served if q == p} for p in ("promote", "stop")}
    assert by_phase == {"promote": {"ugt_b"}, "stop": {"ugt_a"}}
    assert len(served) > 60
    history = [e["action"] for e in exp.history["events"]]
    assert history == ["created", "split", "split", "promoted", "stopped"]


# ------------------------------------------------------------------------ bad user ids
@pytest.mark.server
def test_a_missing_or_malformed_user_id_is_invalid_arg(ab):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server, _ = ab
    client = _client(server)
    x = valid_request(np.random.default_rng(2), 1, 8)

    def error(inputs) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as e:
            client.infer("rt_ab", inputs)
        return str(e.value.status()), e.value.message()

    def ids(values, dtype="BYTES", shape=None):
        arr = np.array(values, dtype=np.object_ if dtype == "BYTES" else np.int64)
        u = grpcclient.InferInput("user_id", list(shape or arr.shape), dtype)
        u.set_data_from_numpy(arr)
        return [*grpc_inputs(x), u]

    cases = {
        "missing": grpc_inputs(x),
        "int64": ids([[42]], "INT64"),
        "no batch dim": ids([b"u1"]),
        "empty": ids([[b""]]),
        "not utf-8": ids([[b"\xff\xfe"]]),
        "too long": ids([[b"u" * 300]]),
        "two ids for one history": ids([[b"u1"], [b"u2"]]),
    }
    for case, inputs in cases.items():
        status, message = error(inputs)
        assert "INVALID_ARGUMENT" in status, (case, status, message)
        assert "user_id" in message, (case, message)
    # An arm's own input error comes back as INVALID_ARG too, naming the arm and the input.
    bad = dict(x)
    bad["encoder_l1_ids"] = x["encoder_l1_ids"].copy()
    bad["encoder_l1_ids"][0, 0] = 10**6
    status, message = error(_router_inputs(bad, ["u1"]))
    assert "INVALID_ARGUMENT" in status and "encoder_l1_ids" in message
    # more histories in one request than the arms take: refused by the router, named
    big = valid_request(np.random.default_rng(3), 9, 4)
    status, message = error(_router_inputs(big, [f"u{i}" for i in range(9)]))
    assert "INVALID_ARGUMENT" in status and "at most 8" in message
    # the router still answers good requests
    assert client.infer("rt_ab", _router_inputs(x, ["u1"])).as_numpy("scores").shape == (1, K)
