"""Server faults: a tritonserver killed with SIGKILL is reported (ServerError with the log tail)
instead of hanging anything, and the supervisor behind `ugt-serving serve` restarts it with
exponential back-off on the same ports, saying so each time."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from algorithm.errors import ServerError
from algorithm.serving import TritonServer
from algorithm.serving.tests.reliability_helpers import (
    fire,
    python_model,
    server_processes,
    valid_request,
)
from algorithm.serving.triton.supervisor import RestartPolicy, ServerSupervisor, describe_event

# The CLI as the ugt-serving script runs it (`python -m algorithm.serving.cli` runs cli.py as
# __main__, without the commands of the other cli modules).
CLI = "from algorithm.serving.cli import app; app()"

MODEL = "ugt_fault"


@pytest.fixture(scope="module")
def fault_repo(onnx_model, tmp_path_factory):
    repo = tmp_path_factory.mktemp("fault_repo")
    python_model(repo, onnx_model, MODEL, max_batch_size=8, max_seq_length=1024)
    return repo


def _returns_within(seconds: float, fn, *args):
    """fn(*args) in a thread: (returned value or raised exception); fails if it hangs."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed back to the test
            box["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} hung for {seconds} s on a dead server"
    return box.get("error", box.get("value"))


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.server
def test_a_killed_server_is_reported_with_its_log_instead_of_hanging(fault_repo):
    import tritonclient.grpc as grpcclient

    server = TritonServer(
        fault_repo, http_port=0, grpc_port=0, metrics_port=0, model_control="explicit"
    )
    server.start()
    try:
        pids = [p.pid for p in server_processes(server)]
        assert len(pids) >= 2  # tritonserver + the python stub
        client = grpcclient.InferenceServerClient(server.grpc_url)
        rng = np.random.default_rng(0)
        # Requests in flight when the server dies come back with an error, none hangs.
        requests = [valid_request(rng, 8, 1024, ragged=False) for _ in range(6)]
        answers: dict = {}
        sender = threading.Thread(
            target=lambda: answers.update(r=fire(client, MODEL, requests, 60))
        )
        sender.start()
        time.sleep(0.3)
        os.kill(server.process.pid, signal.SIGKILL)
        sender.join(90)
        assert not sender.is_alive() and "r" in answers
        failed = [e for _, e in answers["r"] if e is not None]
        assert failed and all(
            "UNAVAILABLE" in e.status() or "CANCELLED" in e.status() for e in failed
        )
        client.close()

        deadline = time.monotonic() + 10  # the sockets close a moment before the process ends
        while server.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _returns_within(10, server.is_alive) is False
        assert _returns_within(10, server.is_ready) is False
        assert _returns_within(10, server.model_ready, MODEL) is False
        for call, args in (
            (server.statistics, ()),
            (server.load_model, (MODEL,)),
            (server.model_config, (MODEL,)),
            (server.repository_index, ()),
            (server.metrics, ()),
            (server.wait_for_model, (MODEL, None, 5.0)),
        ):
            err = _returns_within(20, call, *args)
            assert isinstance(err, ServerError), (call.__name__, err)
            assert "not running" in str(err) or "died" in str(err) or "unavailable" in str(err), (
                str(err)
            )
            # The log tail explains the server's last state (here: it had loaded the model).
            assert MODEL in err.log_tail, (call.__name__, err.log_tail)
    finally:
        _returns_within(30, server.stop)
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), "tritonserver or its python stub outlived stop()"


@pytest.mark.server
def test_the_supervisor_restarts_a_killed_server_with_back_off_on_the_same_ports(fault_repo):
    import tritonclient.grpc as grpcclient

    events: list[tuple[str, dict]] = []
    changed = threading.Condition()

    def on_event(event, info):
        with changed:
            events.append((event, info))
            changed.notify_all()

    def wait_for(event: str, count: int, timeout: float = 90.0):
        with changed:
            ok = changed.wait_for(lambda: sum(e == event for e, _ in events) >= count, timeout)
        assert ok, f"no {count}x {event!r} within {timeout} s: {[e for e, _ in events]}"

    policy = RestartPolicy(
        initial_backoff_s=0.2, multiplier=3.0, max_backoff_s=5.0, reset_after_s=600
    )
    sup = ServerSupervisor(fault_repo, policy, on_event, http_port=0, grpc_port=0, metrics_port=0)
    first = sup.start()
    ports = (first.http_port, first.grpc_port, first.metrics_port)
    x = valid_request(np.random.default_rng(1), 2, 16)
    watcher = threading.Thread(target=sup.run, daemon=True)
    watcher.start()
    try:
        pids = [first.process.pid]
        for n in (1, 2):
            os.kill(sup.server.process.pid, signal.SIGKILL)
            wait_for("restarted", n)
            server = sup.server
            assert server.process.pid not in pids and server.is_ready()
            pids.append(server.process.pid)
            assert (server.http_port, server.grpc_port, server.metrics_port) == ports
            client = grpcclient.InferenceServerClient(server.grpc_url)
            ((got, error),) = fire(client, MODEL, [x])
            client.close()
            assert error is None and got["recommendations"].shape == (2, 50, 3)
    finally:
        sup.stop()
        watcher.join(30)
    assert not watcher.is_alive() and not sup.server.is_alive()

    names = [e for e, _ in events]
    assert names == ["died", "restarting", "restarted"] * 2, names
    died = [i for e, i in events if e == "died"]
    assert [d["exit_code"] for d in died] == [-signal.SIGKILL] * 2 and [
        d["pid"] for d in died
    ] == pids[:2]
    assert all(MODEL in d["log_tail"] for d in died)
    backoffs = [i["backoff_s"] for e, i in events if e == "restarting"]
    assert backoffs == [pytest.approx(0.2), pytest.approx(0.6)]  # x3 per failure in a series
    lines = [describe_event(e, i) for e, i in events]
    assert lines[1] == "restarting tritonserver in 0.2 s (attempt 1)"
    assert lines[2].startswith(f"tritonserver restarted (pid {pids[1]}, restart 1)")
    assert lines[0].startswith("tritonserver exited (code -9)")


@pytest.mark.server
def test_the_supervisor_gives_up_with_the_log_when_restarts_keep_failing(fault_repo, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(fault_repo, repo)
    events: list[tuple[str, dict]] = []
    policy = RestartPolicy(initial_backoff_s=0.1, max_restarts=2)
    sup = ServerSupervisor(
        repo, policy, lambda e, i: events.append((e, i)), http_port=0, grpc_port=0, metrics_port=0
    )
    server = sup.start()
    # The repository breaks while serving: every restart fails to load the model.
    (repo / MODEL / "1" / "model.py").write_text("raise RuntimeError('corrupted by the test')\n")
    os.kill(server.process.pid, signal.SIGKILL)
    try:
        err = _returns_within(120, sup.run)
    finally:
        sup.stop()
    assert isinstance(err, ServerError) and "2 restarts in a row did not keep it up" in str(err), (
        err
    )
    assert "corrupted by the test" in err.log_tail and "validate" in err.hint
    assert [n for n, _ in events] == [
        "died",
        "restarting",
        "restart_failed",
        "restarting",
        "restart_failed",
        "gave_up",
    ]
    assert [i["backoff_s"] for n, i in events if n == "restarting"] == [
        pytest.approx(0.1),
        pytest.approx(0.2),
    ]


def test_restart_policy_backs_off_exponentially_up_to_its_cap_and_validates():
    from algorithm.errors import ConfigError

    policy = RestartPolicy(initial_backoff_s=0.5, multiplier=2.0, max_backoff_s=3.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    for field, value in (
        ("multiplier", 0.5),
        ("max_backoff_s", 0.1),
        ("max_restarts", -1),
        ("poll_interval_s", 0.0),
    ):
        with pytest.raises(ConfigError, match=field):
            RestartPolicy(initial_backoff_s=0.5, **{field: value})


@pytest.mark.server
def test_ugt_serving_serve_restarts_a_killed_server_and_says_so(fault_repo):
    """The real CLI in its own process: kill its tritonserver, see the message, the server
    back on the same port, then SIGTERM stops everything (exit 0)."""
    import json
    import subprocess
    import sys
    import urllib.request

    import psutil

    cmd = [
        sys.executable,
        "-c",
        CLI,
        "--json",
        "serve",
        str(fault_repo),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--restart-backoff",
        "0.2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(
        target=lambda: stderr.extend(iter(proc.stderr.readline, "")), daemon=True
    )
    reader.start()

    def wait_line(text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [ln for ln in list(stderr) if text in ln]
            if hits:
                return hits[0]
            assert proc.poll() is None, f"serve exited {proc.returncode}: {''.join(stderr)}"
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} on stderr within {timeout} s: {''.join(stderr)}")

    def ready(http: str) -> bool:
        with urllib.request.urlopen(f"{http}/v2/health/ready", timeout=5) as r:
            return r.status == 200

    try:
        text = ""
        for line in proc.stdout:  # --json: one JSON object once the server is ready
            text += line
            try:
                info = json.loads(text)
                break
            except ValueError:
                continue
        assert ready(info["http"]) and MODEL in info["models"]
        os.kill(info["pid"], signal.SIGKILL)
        wait_line("serve: tritonserver exited (code -9)")
        assert "restarting tritonserver in 0.2 s (attempt 1)" in wait_line(
            "restarting tritonserver"
        )
        restarted = wait_line("tritonserver restarted (pid")
        new_pid = int(restarted.split("(pid ")[1].split(",")[0])
        assert new_pid != info["pid"] and info["http"] in restarted
        assert psutil.Process(new_pid).name() == "tritonserver" and ready(info["http"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(stderr)
        assert (
            not psutil.pid_exists(new_pid)
            or psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
