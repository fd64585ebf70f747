"""The real tritonserver on generated repositories: answers, dynamic batching, bad requests,
live version changes, start/stop behaviour. One server is shared by the module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from algorithm.errors import DependencyError, InputFileNotFoundError, ServerError
from algorithm.serving import (
    ExportConfig,
    ModelVersionManager,
    TritonConfig,
    TritonConfigGenerator,
    TritonServer,
    validate_deployment,
)
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.triton.schema import config_to_text
from algorithm.serving.triton.server import find_tritonserver, model_statistics
from algorithm.serving.verify.parity import compare_outputs
from algorithm.ugt.data import random_inputs

CODEBOOKS = (1024, 4096, 16384)
EC = ExportConfig(model_name="ugt", max_batch_size=16, opt_seq_length=32)
# A long queue delay lets concurrent requests meet in one batch on a 2-core machine.
TC = TritonConfig(
    platform="python",
    instance_kind="KIND_CPU",
    instance_count=1,
    preferred_batch_sizes=(16,),
    max_queue_delay_us=100_000,
)


def _close(ref, got, what=""):
    m = compare_outputs(ref, got)
    assert m["recall_overlap"] >= 0.99 and m["max_common_item_score_diff"] < 1e-3, (what, m)


@pytest.fixture(scope="module")
def served(trained, onnx_model, tmp_path_factory):
    """(server, repository, reference runner): "ugt" runs the ONNX export on ONNX Runtime;
    "ugt_versions" runs checkpoints with the torch runner and takes new versions live."""
    model, _, checkpoint = trained
    repo = tmp_path_factory.mktemp("repo")
    TritonConfigGenerator(EC, TC).generate(repo, model_file=onnx_model)
    TritonConfigGenerator(
        EC.replace(model_name="ugt_versions"),
        TC.replace(python_runtime="torch", max_queue_delay_us=0),
    ).generate(repo, model_file=checkpoint)
    # Pipelined: execute() returns once the batch is queued, a second thread answers through
    # the response senders (on CPU the batch is done by then; the answering path is the same).
    TritonConfigGenerator(
        EC.replace(model_name="ugt_pipelined"),
        TC.replace(python_runtime="torch", pipeline_depth=2),
    ).generate(repo, model_file=checkpoint)
    # Continuous batching: execute() returns at once, the pipeline merges what it was left.
    TritonConfigGenerator(
        EC.replace(model_name="ugt_continuous"),
        TC.replace(python_runtime="torch", pipeline_depth=1, continuous_batching=True),
    ).generate(repo, model_file=checkpoint)
    # Tensors through DLPack (what numpy 2 environments use) and the response cache.
    gen = TritonConfigGenerator(
        EC.replace(model_name="ugt_dlpack"), TC.replace(response_cache=True)
    )
    gen.generate(repo, model_file=onnx_model)
    cfg = gen.build_config("model.onnx")
    cfg.parameters["tensor_transport"].string_value = "dlpack"
    (repo / "ugt_dlpack" / "config.pbtxt").write_text(config_to_text(cfg))
    assert validate_deployment(repo)["valid"]
    with TritonServer(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control="explicit",
        response_cache_bytes=1 << 20,
    ) as server:
        yield server, repo, TorchRunner(model)


def _grpc_inputs(x):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name in INPUT_NAMES:
        i = grpcclient.InferInput(name, list(x[name].shape), "INT64")
        i.set_data_from_numpy(x[name])
        inputs.append(i)
    return inputs


def _grpc_infer(url, x, model="ugt"):
    import tritonclient.grpc as grpcclient

    r = grpcclient.InferenceServerClient(url).infer(model, _grpc_inputs(x))
    return {"recommendations": r.as_numpy("recommendations"), "scores": r.as_numpy("scores")}


@pytest.mark.server
def test_grpc_and_http_answers_equal_pytorch(served):
    import tritonclient.http as httpclient

    server, _, ref = served
    rng = np.random.default_rng(7)
    cases = [
        random_inputs(1, 1, CODEBOOKS, rng),
        random_inputs(3, 40, CODEBOOKS, rng, ragged=True),
        random_inputs(2, 300, CODEBOOKS, rng),
    ]
    http = httpclient.InferenceServerClient(server.http_url)
    for x in cases:
        expected = ref.infer(x)
        got = _grpc_infer(server.grpc_url, x)
        assert got["recommendations"].shape == expected["recommendations"].shape
        assert got["recommendations"].dtype == np.int64 and got["scores"].dtype == np.float32
        _close(expected, got, "grpc")
        inputs = []
        for name in INPUT_NAMES:
            i = httpclient.InferInput(name, list(x[name].shape), "INT64")
            i.set_data_from_numpy(x[name], binary_data=True)
            inputs.append(i)
        r = http.infer("ugt", inputs)
        _close(
            expected,
            {"recommendations": r.as_numpy("recommendations"), "scores": r.as_numpy("scores")},
            "http",
        )


def _fire(url, requests, model="ugt"):
    """Send all requests at once (async gRPC); returns [(result dict | None, error | None)]."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    results: list = [None] * len(requests)
    pending = []
    for i, x in enumerate(requests):

        def done(result, error, i=i):
            results[i] = (
                (None, error)
                if error
                else (
                    {
                        "recommendations": result.as_numpy("recommendations"),
                        "scores": result.as_numpy("scores"),
                    },
                    None,
                )
            )

        pending.append(client.async_infer(model, _grpc_inputs(x), done))
    deadline = time.monotonic() + 60
    while any(r is None for r in results) and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close()
    assert all(r is not None for r in results), "requests timed out"
    return results


def _stats_after(server, before: dict, count: int, model="ugt", timeout=10.0) -> dict:
    """The model's statistics once they count ``count`` more inferences than ``before`` (or at
    the timeout): Triton may update them a moment after the client has its answers."""
    deadline = time.monotonic() + timeout
    while True:
        after = model_statistics(server.statistics(model), model)
        done = after["inference_count"] - before["inference_count"] >= count
        if done or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


@pytest.mark.server
def test_concurrent_requests_of_different_lengths_are_batched_and_each_answered(served):
    server, _, ref = served
    rng = np.random.default_rng(11)
    lengths = [1, 5, 17, 64, 3, 40, 9, 128, 2, 33, 70, 12]
    requests = [random_inputs(1, n, CODEBOOKS, rng) for n in lengths]
    before = model_statistics(server.statistics("ugt"), "ugt")
    results = _fire(server.grpc_url, requests)
    after = _stats_after(server, before, len(requests))
    for x, (got, error) in zip(requests, results, strict=True):
        assert error is None
        _close(ref.infer(x), got, f"seq {x['attention_mask'].shape[1]}")
    assert after["inference_count"] - before["inference_count"] == len(requests)
    executions = after["execution_count"] - before["execution_count"]
    assert 1 <= executions < len(requests), (executions, len(requests))


@pytest.mark.server
def test_a_bad_request_fails_alone_with_a_clear_message(served):
    server, _, ref = served
    rng = np.random.default_rng(3)
    good = [random_inputs(1, n, CODEBOOKS, rng) for n in (8, 20, 50)]
    bad_id = random_inputs(1, 10, CODEBOOKS, rng)
    bad_id["encoder_l3_ids"][0, 4] = 16384
    bad_mask = random_inputs(1, 6, CODEBOOKS, rng)
    bad_mask["attention_mask"][0, 2] = 2
    too_long = random_inputs(1, 1025, CODEBOOKS, rng)
    requests = [good[0], bad_id, good[1], bad_mask, too_long, good[2]]
    before = model_statistics(server.statistics("ugt"), "ugt")
    results = _fire(server.grpc_url, requests)
    after = _stats_after(server, before, len(requests))
    messages = {i: str(results[i][1]) for i in (1, 3, 4)}
    assert "encoder_l3_ids: id 16384 at [0, 4] is outside its codebook [0, 16384)" in messages[1]
    assert "attention_mask: value 2 at [0, 2]" in messages[3]
    assert "sequence length 1025 outside [1, 1024]" in messages[4]
    assert all("INVALID_ARG" in m for m in messages.values()), messages
    for i, x in zip((0, 2, 5), good, strict=True):
        assert results[i][1] is None
        _close(ref.infer(x), results[i][0])
    # All six reached the model and shared executions, yet only the three bad ones failed.
    assert after["inference_count"] - before["inference_count"] == len(requests)
    assert after["execution_count"] - before["execution_count"] < len(requests)


@pytest.mark.server
@pytest.mark.parametrize("name", ["ugt_pipelined", "ugt_continuous"])
def test_a_pipelined_model_answers_every_request_through_its_response_sender(served, name):
    """pipeline_depth: good requests answered later by the second thread, bad ones at once in
    the same batch, over gRPC and HTTP (a default, non-decoupled model: any client works);
    with continuous_batching the pipeline merges the batches execute() leaves with it."""
    import tritonclient.http as httpclient

    server, repo, ref = served
    params = server.model_config(name)["parameters"]
    assert params["pipeline_depth"]["string_value"] == ("2" if name == "ugt_pipelined" else "1")
    merged = params.get("continuous_batching", {}).get("string_value")
    assert merged == (None if name == "ugt_pipelined" else "true")
    rng = np.random.default_rng(5)
    good = [random_inputs(1, n, CODEBOOKS, rng) for n in (3, 40, 17, 128, 1, 64, 9, 33)]
    bad = random_inputs(1, 10, CODEBOOKS, rng)
    bad["encoder_l1_ids"][0, 2] = -1
    requests = good[:4] + [bad] + good[4:]
    before = model_statistics(server.statistics(name), name)
    results = _fire(server.grpc_url, requests, name)
    after = _stats_after(server, before, len(requests), name)
    assert "encoder_l1_ids: id -1 at [0, 2]" in str(results[4][1])
    for x, (got, error) in zip(good, results[:4] + results[5:], strict=True):
        assert error is None, error
        _close(ref.infer(x), got, f"pipelined seq {x['attention_mask'].shape[1]}")
    assert after["inference_count"] - before["inference_count"] == len(requests)
    assert after["execution_count"] - before["execution_count"] < len(requests)
    x = random_inputs(2, 21, CODEBOOKS, rng, ragged=True)
    inputs = []
    for input_name in INPUT_NAMES:
        i = httpclient.InferInput(input_name, list(x[input_name].shape), "INT64")
        i.set_data_from_numpy(x[input_name], binary_data=True)
        inputs.append(i)
    r = httpclient.InferenceServerClient(server.http_url).infer(name, inputs)
    _close(ref.infer(x), {k: r.as_numpy(k) for k in ("recommendations", "scores")}, "http")


@pytest.mark.server
def test_dlpack_transport_and_the_response_cache(served):
    server, _, ref = served
    x = random_inputs(2, 12, CODEBOOKS, np.random.default_rng(9), ragged=True)
    first = _grpc_infer(server.grpc_url, x, "ugt_dlpack")
    again = _grpc_infer(server.grpc_url, x, "ugt_dlpack")
    _close(ref.infer(x), first, "dlpack")
    np.testing.assert_array_equal(first["recommendations"], again["recommendations"])
    stats = server.statistics("ugt_dlpack")["model_stats"][0]["inference_stats"]
    assert stats["cache_hit"]["count"] == 1 and stats["cache_miss"]["count"] >= 1


@pytest.mark.server
def test_a_version_deployed_while_serving_is_picked_up_and_rollback_restores(served, tmp_path):
    from algorithm.ugt import UGTConfig, UGTModel

    server, repo, ref = served
    x = random_inputs(2, 24, CODEBOOKS, np.random.default_rng(5), ragged=True)
    v1 = _grpc_infer(server.grpc_url, x, "ugt_versions")
    _close(ref.infer(x), v1, "v1")

    import torch

    torch.manual_seed(123)
    other = UGTModel(UGTConfig.tiny()).eval()
    other_ckpt = other.save(tmp_path / "other.safetensors")
    mgr = ModelVersionManager(repo)
    assert mgr.deploy_version("ugt_versions", other_ckpt) == 2
    server.load_model("ugt_versions")  # explicit control: Triton re-reads the versions
    assert server.model_ready("ugt_versions", 2) and not server.model_ready("ugt_versions", 1)
    v2 = _grpc_infer(server.grpc_url, x, "ugt_versions")
    _close(TorchRunner(other).infer(x), v2, "v2")
    assert compare_outputs(v1, v2)["recall_overlap"] < 0.5  # a different model really answers

    assert mgr.rollback("ugt_versions", 1)["served"] == 1
    server.load_model("ugt_versions")
    assert server.model_ready("ugt_versions", 1) and not server.model_ready("ugt_versions", 2)
    back = _grpc_infer(server.grpc_url, x, "ugt_versions")
    np.testing.assert_array_equal(back["recommendations"], v1["recommendations"])
    np.testing.assert_allclose(back["scores"], v1["scores"], atol=1e-5)


@pytest.mark.server
def test_a_model_that_fails_to_load_raises_with_the_reason(served):
    server, repo, _ = served
    TritonConfigGenerator(EC.replace(model_name="broken"), TC).generate(repo)
    (repo / "broken" / "1").mkdir()
    (repo / "broken" / "1" / "model.py").write_text("raise ImportError('no such runtime here')\n")
    with pytest.raises(ServerError, match="broken") as e:
        server.load_model("broken")
    assert "no such runtime here" in str(e.value)
    assert server.is_alive() and server.model_ready("ugt")  # the others keep serving
    states = {m["name"]: m.get("state") for m in server.repository_index()}
    assert states["ugt"] == "READY" and states["broken"] == "UNAVAILABLE"
    assert "nv_inference_request_success" in server.metrics()


@pytest.mark.server
def test_start_up_failure_raises_server_error_with_the_log(tmp_path):
    TritonConfigGenerator(EC.replace(model_name="bad"), TC).generate(tmp_path)
    (tmp_path / "bad" / "1").mkdir()
    (tmp_path / "bad" / "1" / "model.py").write_text("raise RuntimeError('boom at import')\n")
    server = TritonServer(tmp_path, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServerError, match="exited with code") as e:
        server.start()
    assert "boom at import" in e.value.log_tail and "validate" in e.value.hint
    assert not server.is_alive()


@pytest.mark.server
def test_stop_and_dying_with_the_parent(tmp_path):
    (tmp_path / "repo").mkdir()
    with TritonServer(tmp_path / "repo", http_port=0, grpc_port=0, metrics_port=0) as server:
        assert server.is_ready() and server.http_url.startswith("127.0.0.1:")
        pid = server.process.pid
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
    assert not server.is_alive() and not _alive(pid)

    # A parent killed with SIGKILL (no cleanup runs) still takes its server down.
    script = textwrap.dedent(f"""
        import time
        from algorithm.serving.triton.server import TritonServer
        s = TritonServer({str(tmp_path / "repo")!r}, http_port=0, grpc_port=0, metrics_port=0).start()
        print(s.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_find_tritonserver_honours_the_environment_and_says_how_to_install(monkeypatch, tmp_path):
    from algorithm.serving.triton import server as server_mod

    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("TRITONSERVER_BIN", str(fake))
    with pytest.raises(InputFileNotFoundError, match="not executable"):
        find_tritonserver()
    os.chmod(fake, 0o755)
    assert find_tritonserver() == fake
    assert find_tritonserver(triton_bin=str(fake)) == fake
    monkeypatch.delenv("TRITONSERVER_BIN")
    # Nothing installed: neither the wheel nor a binary on PATH.
    monkeypatch.setattr(server_mod, "_pytriton_dist", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DependencyError) as e:
        find_tritonserver()
    assert "nvidia-pytriton" in e.value.hint


@pytest.mark.server
def test_export_script_deploys_validates_and_serves_until_interrupted(trained, tmp_path):
    """scripts/export.sh --skip-trt --start-server: checkpoint -> optimized ONNX Runtime
    artifact -> repository -> validated -> the real server answers like PyTorch; Ctrl-C stops it."""
    from pathlib import Path

    from algorithm.serving.triton.server import free_port

    model, _, checkpoint = trained
    script = Path(__file__).resolve().parents[1] / "scripts" / "export.sh"
    ports = {"HTTP_PORT": free_port(), "GRPC_PORT": free_port(), "METRICS_PORT": free_port()}
    env = {
        **os.environ, **{k: str(v) for k, v in ports.items()},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MODEL_NAME": "ugt_script", "PRECISION": "fp32", "MAX_BATCH_SIZE": "8",
        "CHECKPOINT_PATH": str(checkpoint), "MODEL_REPOSITORY": str(tmp_path / "repo"),
    }  # fmt: skip
    log = open(tmp_path / "script.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        ["bash", str(script), "--skip-trt", "--start-server", "--", "--instance-kind", "KIND_CPU"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"127.0.0.1:{ports['GRPC_PORT']}"
        deadline = time.monotonic() + 400
        import tritonclient.grpc as grpcclient

        while True:
            assert proc.poll() is None, (tmp_path / "script.log").read_text()[-3000:]
            try:
                if grpcclient.InferenceServerClient(url).is_model_ready("ugt_script"):
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, (tmp_path / "script.log").read_text()[-3000:]
            time.sleep(0.5)
        x = random_inputs(2, 30, CODEBOOKS, np.random.default_rng(2), ragged=True)
        _close(TorchRunner(model).infer(x), _grpc_infer(url, x, "ugt_script"), "export.sh")
        result = validate_deployment(tmp_path / "repo", "ugt_script")
        assert result["valid"] and result["info"]["versions"] == [1]
        assert (
            json_of(tmp_path / "repo" / "ugt_script" / "1" / "ugt_model.json")["backend"]
            == "onnxruntime"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "script.log").read_text()[-3000:]
    with pytest.raises(Exception):  # noqa: B017 (the port is closed: any client error)
        grpcclient.InferenceServerClient(url).is_server_live()


def json_of(path):
    import json

    return json.loads(path.read_text())
