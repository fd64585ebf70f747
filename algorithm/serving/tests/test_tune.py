"""`tune` against the real tritonserver on CPU: a small search finishes, writes a config the
server loads, and its winner meets the budget at the highest throughput measured; an impossible
budget is a clear answer; an interrupted tune leaves the repository's config as it was; a rerun
resumes from the stored points; the explicit model-control requirement is said clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from algorithm.errors import ServerError
from algorithm.serving.config import BenchmarkConfig, ExportConfig, TritonConfig, TuneConfig
from algorithm.serving.triton.config_file import PREVIOUS_FILE
from algorithm.serving.triton.schema import parse_config
from algorithm.serving.tune import ServingTuner
from algorithm.serving.tuning.settings import read_settings

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "ugt_tune"
# Short windows: these tests check behaviour, not speed (no number here is a threshold).
LOAD = dict(
    concurrency_levels=(2,),
    test_batch_sizes=(1,),
    test_seq_lengths=(32,),
    num_warmup_requests=10,
    num_requests=30,
    measurement_window_s=0.3,
    max_trials=3,
)
# A batcher that waits 20 ms for a batch of 8 that 2 clients never fill: every request waits
# the whole delay, so taking the delay away is a clear win on any machine, however busy.
SLOW = TritonConfig(
    platform="python",
    python_runtime="onnxruntime",
    instance_kind="KIND_CPU",
    gpus=(),
    instance_count=1,
    runtime_threads=1,
    preferred_batch_sizes=(8,),
    max_queue_delay_us=20_000,
    model_warmup=False,
)


def _publish(repo: Path, onnx_model, name: str = MODEL) -> Path:
    from algorithm.serving.triton_config import TritonConfigGenerator

    ec = ExportConfig(model_name=name, precision="fp32", max_batch_size=16, max_seq_length=256)
    TritonConfigGenerator(ec, SLOW).generate(repo, model_file=onnx_model)
    return repo


@pytest.fixture
def repo(onnx_model, tmp_path):
    return _publish(tmp_path / "repo", onnx_model)


@pytest.fixture(scope="module")
def external(onnx_model, tmp_path_factory):
    """An external server in explicit model control on its own repository (one model per test)."""
    from algorithm.serving.triton.server import TritonServer

    repo = tmp_path_factory.mktemp("tune_repo")
    for name in ("tune_search", "tune_interrupt"):
        _publish(repo, onnx_model, name)
    with TritonServer(repo, 0, 0, 0, model_control="explicit") as server:
        yield repo, server


def _config_text(repo: Path, model: str = MODEL) -> str:
    return (repo / model / "config.pbtxt").read_text()


def _cli(*args: str, **kw) -> list[str]:
    exe = Path(sys.executable).with_name("ugt-serving")
    return [str(exe), *args]


def _env() -> dict:
    # the python-backend stub finds its environment through PATH
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_a_small_search_writes_a_config_the_server_loads_and_a_rerun_resumes(external, tmp_path):
    repo, server = external
    model = "tune_search"
    original = _config_text(repo, model)
    tc = TuneConfig(
        model_name=model,
        time_budget_s=600,
        settings=("instance_count", "max_queue_delay_us"),
        instance_counts=(1, 2),
        max_queue_delays_us=(0, 20_000),
    )
    events = []
    bc = BenchmarkConfig(slo_p99_ms=1000.0, **LOAD)
    tuner = ServingTuner(tc, bc, progress=lambda e, i: events.append(e))
    result = tuner.tune(repo, url=server.grpc_url, output=tmp_path / "out")
    j = result.judge
    assert result.met_budget and result.improved
    # the winner meets the budget at the highest throughput among the measured candidates
    measured = [j.throughput(c) for c in result.candidates if j.throughput(c) is not None]
    assert j.throughput(result.winner) == max(measured)
    assert result.winner.settings.max_queue_delay_us == 0  # the 20 ms wait was the problem
    assert len({c.settings.key for c in result.candidates}) == len(result.candidates)
    # side by side in the same run, each at every level
    (rnd,) = result.rounds
    assert rnd["default"].settings == result.baseline.settings
    assert rnd["tuned"].settings == result.winner.settings
    assert all(len(c.results) == len(LOAD["concurrency_levels"]) for c in rnd.values())
    # written atomically with the old one kept; the server reloaded it from the file
    assert (repo / model / PREVIOUS_FILE).read_text() == original
    written = read_settings(parse_config(_config_text(repo, model)))
    assert written == result.winner.settings
    assert result.server_config_check == {"loaded": True, "matches": True, "differences": {}}
    assert result.not_written is None
    served = server.model_config(model)
    assert int(served["dynamic_batching"].get("max_queue_delay_microseconds", 0)) == 0
    assert served["instance_group"][0]["count"] == written.instance_count
    # the report: markdown, JSON with every candidate, plots, the winner's config
    report = json.loads((tmp_path / "out" / "tune_report.json").read_text())
    rows = report["candidates"]
    assert report["winner"] == result.candidates.index(result.winner)
    assert rows[report["winner"]]["throughput_within_budget"] == max(
        r["throughput_within_budget"] or 0 for r in rows
    )
    assert report["side_by_side"]["speedup"] > 1
    assert {Path(p).name for p in result.paths["plots"]} == {
        "tune_candidates.png",
        "tune_side_by_side.png",
    }
    md = (tmp_path / "out" / "tune_report.md").read_text()
    assert "same run" in md and result.winner.settings.label in md
    assert parse_config((tmp_path / "out" / "tuned_config.pbtxt").read_text())
    assert {"plan", "candidate", "window", "measured", "compare", "written"} <= set(events)
    # one command restores the old config, and the server serves it again
    run = subprocess.run(
        _cli("--json", "tune", str(repo), "-m", model, "--restore", "--url", server.grpc_url),
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr
    assert _config_text(repo, model) == original
    delay = server.model_config(model)["dynamic_batching"]["max_queue_delay_microseconds"]
    assert int(delay) == 20_000
    # a rerun on the restored config reuses every stored point of the search
    events.clear()
    again = ServingTuner(
        tc.replace(compare_rounds=0, write_config=False), bc, lambda e, i: events.append(e)
    ).tune(repo, url=server.grpc_url, output=tmp_path / "out")
    assert [c.settings for c in again.candidates] == [c.settings for c in result.candidates]
    assert all(c.reused for c in again.candidates) and "window" not in events
    assert _config_text(repo, model) == original


def test_an_impossible_budget_is_a_clear_answer_not_a_crash(repo, tmp_path):
    original = _config_text(repo)
    run = subprocess.run(
        _cli(
            "--json",
            "tune",
            str(repo),
            "-m",
            MODEL,
            "--slo",
            "0.01",
            "-c",
            "2",
            "--seq-length",
            "32",
            "--settings",
            "instance_count",
            "--instances",
            "1,2",
            "--requests",
            "30",
            "--warmup",
            "10",
            "--window",
            "0.3",
            "--max-trials",
            "3",
            "-o",
            str(tmp_path / "out"),
        ),
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert run.returncode == 1, run.stderr[-2000:]
    answer = json.loads(run.stdout)
    assert "met_budget" in answer, run.stdout[-3000:] + run.stderr[-3000:]
    assert answer["met_budget"] is False and answer["winner"] is None
    closest = answer["candidates"][answer["closest"]]
    assert answer["summary"].startswith(
        f"no setting met P99 <= 0.01 ms: the best P99 was {closest['best_p99_ms']:.1f} ms, "
        f"at {closest['label']}"
    )
    # when the closest is not the current config, the two were also measured in the same run
    assert (answer["side_by_side"] is None) == (answer["closest"] == 0)
    assert closest["best_p99_ms"] == min(c["best_p99_ms"] for c in answer["candidates"])
    assert "no setting met the budget" in run.stderr and "Traceback" not in run.stderr
    assert _config_text(repo) == original and not (repo / MODEL / PREVIOUS_FILE).exists()


def test_an_interrupted_tune_leaves_the_config_and_the_external_server_as_they_were(
    external, tmp_path
):
    repo, server = external
    model = "tune_interrupt"
    original = _config_text(repo, model)
    started = []

    def interrupt_mid_second(event, info):
        if event == "candidate":
            started.append(info["label"])
        if event == "window" and len(started) == 2:
            raise KeyboardInterrupt  # while the 2-instance candidate is loaded and measured

    tc = TuneConfig(model_name=model, settings=("instance_count",), instance_counts=(1, 2, 3))
    tuner = ServingTuner(tc, BenchmarkConfig(slo_p99_ms=1000.0, **LOAD), interrupt_mid_second)
    with pytest.raises(KeyboardInterrupt):
        tuner.tune(repo, url=server.grpc_url, output=tmp_path / "out")
    assert started[1].startswith("i2 ")
    assert _config_text(repo, model) == original
    assert not (repo / model / PREVIOUS_FILE).exists()
    # the server serves the repository's config again, not the candidate's
    assert server.model_ready(model)
    assert server.model_config(model)["instance_group"][0]["count"] == 1
    stored = json.loads((tmp_path / "out" / "tune_points.json").read_text())
    (ctx,) = stored["contexts"].values()
    assert len(ctx["candidates"]) == 1  # the finished candidate is kept for a rerun

    # the command line: SIGTERM mid-search, exit 130, the config and the server as they were
    proc = subprocess.Popen(
        _cli(
            "tune",
            str(repo),
            "-m",
            model,
            "--url",
            server.grpc_url,
            "--slo",
            "1000",
            "-c",
            "2",
            "--seq-length",
            "32",
            "--settings",
            "instance_count",
            "--instances",
            "1,2,3",
            "--requests",
            "30",
            "--warmup",
            "10",
            "--window",
            "0.3",
            "--max-trials",
            "3",
            "-o",
            str(tmp_path / "cli"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 300
        for line in proc.stderr:  # a line per measured candidate
            if line.startswith("#0") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert "config is unchanged" in rest
    assert _config_text(repo, model) == original
    assert not (repo / model / PREVIOUS_FILE).exists()
    assert server.model_config(model)["instance_group"][0]["count"] == 1


def test_a_server_without_explicit_model_control_is_refused_with_the_fix(repo, tmp_path):
    from algorithm.serving.triton.server import TritonServer

    with TritonServer(repo, 0, 0, 0) as server:
        tuner = ServingTuner(TuneConfig(model_name=MODEL), BenchmarkConfig(**LOAD))
        with pytest.raises(ServerError, match="not allowed") as e:
            tuner.tune(repo, url=server.grpc_url, output=tmp_path / "out")
        assert "--model-control-mode=explicit" in e.value.hint
    assert not (tmp_path / "out" / "tune_points.json").exists()


def _stubs(server_pid: int, model: str) -> int:
    """The server's python-backend stubs of ``model`` alive now (their arguments name the
    instance, ``<model>_<group>_<n>``)."""
    count = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (p / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and any(a.startswith(f"{model}_".encode()) for a in args):
            count += 1
    return count


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_reload_never_runs_the_old_and_new_instances_side_by_side(repo):
    """Triton's own reload starts the new instances beside the old ones; on a GPU both sets
    did not fit (tune_h100_attempt_oom.log). ModelControl.load unloads first."""
    import threading

    from algorithm.serving.triton.control import ModelControl
    from algorithm.serving.triton.server import TritonServer

    with TritonServer(repo, 0, 0, 0, model_control="explicit") as server:
        pid, control = server.process.pid, ModelControl(server.grpc_url)
        try:
            two = server.model_config(MODEL)
            two["instance_group"][0]["count"] = 2
            control.load(MODEL, json.dumps(two))
            assert _stubs(pid, MODEL) == 2
            seen, done = [], threading.Event()

            def watch():
                while not done.is_set():
                    seen.append(_stubs(pid, MODEL))
                    time.sleep(0.01)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                control.load(MODEL, json.dumps(two))
            finally:
                done.set()
                watcher.join()
            assert control.ready(MODEL)
            assert max(seen) == 2 and 0 in seen, seen[:50]
        finally:
            control.close()
