"""The generated tritonserver command, run for real: the Deployment's command and args (expanded
as the kubelet does) and the Dockerfile's ENTRYPOINT and HEALTHCHECK (executed as Docker would;
the image itself cannot be built here: no Docker engine) start the bundled tritonserver, whose
administrative APIs then refuse requests without the admin key over HTTP and gRPC."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from algorithm.serving.deploy.manifests import ManifestConfig, render_manifests
from algorithm.serving.tests.test_manifests import container, instruction


def _binary_env(tmp_path: Path) -> tuple[Path, dict]:
    from algorithm.serving.triton.server import find_tritonserver

    binary = find_tritonserver()
    env = dict(os.environ)
    # the shared libraries nvidia-pytriton bundles beside its package
    libs = binary.resolve().parents[3] / "nvidia_pytriton.libs"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (env.get("LD_LIBRARY_PATH"), str(libs)) if p
        )
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    if not (shim / "tritonserver").exists():
        (shim / "tritonserver").symlink_to(binary)
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"  # the image has tritonserver on PATH
    return binary, env


def _ports() -> dict:
    from algorithm.serving.triton.server import free_port

    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    return dict(zip(("http_port", "grpc_port", "metrics_port"), sorted(ports), strict=True))


def _get(url: str, headers: dict | None = None, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}, method=method), timeout=5
        ) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_ready(proc, port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tritonserver exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(f"http://127.0.0.1:{port}/v2/health/ready") == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"tritonserver not ready:\n{log.read_text()[-3000:]}")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_restrictions(ports: dict, key: str) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    http = f"http://127.0.0.1:{ports['http_port']}"
    assert _get(f"{http}/v2/health/live") == 200
    index = f"{http}/v2/repository/index"
    assert _get(index, method="POST") == 403  # model control without the key
    assert _get(f"{http}/v2/repository/models/x/load", method="POST") == 403
    assert _get(f"{http}/v2/models/stats") == 403
    assert _get(index, {"admin-key": "wrong"}, "POST") == 403
    assert _get(index, {"admin-key": key}, "POST") == 200
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc_port']}")
    try:
        assert client.is_server_ready()
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("anything")
        # gRPC metadata for a restricted protocol is named triton-grpc-protocol-<header>
        assert (
            client.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": key})
            is not None
        )
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index(headers={"admin-key": key})
    finally:
        client.close()
    with urllib.request.urlopen(
        f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=5
    ) as r:
        assert b"nv_" in r.read()


@pytest.mark.server
def test_deployment_command_runs_the_real_server_with_admin_apis_locked(tmp_path):
    """The Deployment's command and args, expanded as the kubelet does, start tritonserver; the
    volume mount at /models is emulated by pointing the flag at a local (empty) repository."""
    _, env = _binary_env(tmp_path)
    ports = _ports()
    c = container(render_manifests(manifest_config=ManifestConfig(**ports)))
    key = secrets.token_hex(16)
    env["TRITON_ADMIN_KEY"] = key
    repo = tmp_path / "models"
    repo.mkdir()
    argv = [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a)
        for a in c["command"] + c["args"]
    ]
    argv = [
        f"--model-repository={repo}" if a.startswith("--model-repository=") else a for a in argv
    ]
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, ports["http_port"], log)
        _check_restrictions(ports, key)
    finally:
        _stop(proc)


@pytest.mark.server
def test_dockerfile_entrypoint_and_healthcheck_run_for_real(tmp_path):
    """The ENTRYPOINT array is executed as Docker would (sh -c, key from the environment), the
    HEALTHCHECK command reports the server's readiness, and a missing key refuses to start."""
    _, env = _binary_env(tmp_path)
    ports = _ports()
    files = render_manifests(manifest_config=ManifestConfig(**ports))
    entry = json.loads(instruction(files, "ENTRYPOINT")[0])
    repo = tmp_path / "models"
    repo.mkdir()
    entry = [
        f"--model-repository={repo}" if a.startswith("--model-repository=") else a for a in entry
    ]
    health = json.loads(instruction(files, "HEALTHCHECK")[0].split(" CMD ", 1)[1])

    no_key = subprocess.run(entry, env=env, capture_output=True, text=True, timeout=30)
    assert no_key.returncode != 0 and "set TRITON_ADMIN_KEY" in no_key.stderr

    key = secrets.token_hex(16)
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            entry, env={**env, "TRITON_ADMIN_KEY": key}, stdout=f, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(proc, ports["http_port"], log)
        assert subprocess.run(health, env=env, timeout=30).returncode == 0
        _check_restrictions(ports, key)
    finally:
        _stop(proc)
    assert (
        proc.returncode == 0
    )  # `exec`: the signal reached tritonserver itself, which exited cleanly
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0
