"""The served endpoint's security against the real tritonserver (issue 19).

One server is bound to every interface (0.0.0.0) with the admin key from $TRITON_ADMIN_KEY,
the way `ugt-serving serve --host 0.0.0.0` runs it; all traffic goes to 127.0.0.1. Every
administrative API refuses a request without the key (HTTP 403; gRPC UNAVAILABLE "This protocol
is restricted": what Triton 2.51 answers) and works with it, while inference, health and metadata
stay open. The key is in no process's command line, in neither the server's nor its stubs'
environment, and in no log. A second server serves gRPC over mutual TLS (a throwaway CA made
with openssl): a client with a certificate from that CA is served, with the benchmark client
among them, and clients without one, with one from another CA, or without TLS are refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from algorithm.errors import ConfigError
from algorithm.serving import TritonServer
from algorithm.serving.security import GrpcTls
from algorithm.serving.tests.reliability_helpers import (
    grpc_inputs,
    python_model,
    server_processes,
    valid_request,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

KEY = secrets.token_hex(24)
MODEL = "ugt"
LOCAL = "127.0.0.1"
# (method, path) of every administrative HTTP API family Triton restricts
ADMIN_HTTP = [
    ("POST", "/v2/repository/index"),  # model-repository
    ("POST", f"/v2/repository/models/{MODEL}/load"),
    ("GET", f"/v2/models/{MODEL}/config"),  # model-config
    ("GET", "/v2/models/stats"),  # statistics
    ("GET", f"/v2/models/{MODEL}/stats"),
    ("GET", "/v2/trace/setting"),  # trace
    ("GET", f"/v2/models/{MODEL}/trace/setting"),
    ("GET", "/v2/logging"),  # logging
    ("GET", "/v2/systemsharedmemory/status"),  # shared-memory
    ("GET", "/v2/cudasharedmemory/status"),
]
OPEN_HTTP = [
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", f"/v2/models/{MODEL}"),
    ("GET", f"/v2/models/{MODEL}/ready"),
]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def repo(onnx_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("security-repo")
    python_model(path, onnx_model, MODEL, max_batch_size=4, max_seq_length=64)
    return path


@pytest.fixture(scope="module")
def locked(repo, tmp_path_factory):
    """(server, python log lines of its start) on 0.0.0.0, explicit model control, key from
    the environment the way the CLI and the manifests give it."""
    records = _Records()
    log = logging.getLogger("algorithm")
    old_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(records)
    saved = os.environ.get("TRITON_ADMIN_KEY")
    os.environ["TRITON_ADMIN_KEY"] = KEY
    try:
        server = TritonServer(
            repo,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            host="0.0.0.0",
            model_control="explicit",
            log_verbose=1,
            log_dir=tmp_path_factory.mktemp("security-log"),
        )
        server.start()
    finally:
        log.removeHandler(records)
        log.setLevel(old_level)
        if saved is None:
            os.environ.pop("TRITON_ADMIN_KEY", None)
        else:
            os.environ["TRITON_ADMIN_KEY"] = saved
    yield server, records.lines
    server.stop()


def _http(server, method: str, path: str, headers: dict | None = None, body=None) -> int:
    req = urllib.request.Request(
        f"http://{LOCAL}:{server.http_port}{path}",
        data=body if body is not None else (b"" if method == "POST" else None),
        method=method,
        headers=headers or {},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_exposed_server_without_a_key_is_refused_before_it_starts(repo, monkeypatch):
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TRITON_ADMIN_KEY_FILE", raising=False)
    with pytest.raises(ConfigError) as e:
        TritonServer(repo, host="0.0.0.0")
    assert e.value.field == "admin_key" and "openssl rand" in e.value.hint
    assert TritonServer(repo, host=LOCAL).restricted is False  # loopback: optional
    cmd, secret = TritonServer(repo, admin_key=KEY, grpc_request_pool=0)._command(None)
    assert "--grpc-infer-allocation-pool-size=0" in cmd
    assert sorted(cmd[i].split("=", 1)[0] for i in secret) == [
        "--grpc-restricted-protocol",
        "--http-restricted-api",
    ]
    with pytest.raises(ConfigError) as e:
        TritonServer(repo, grpc_request_pool=-1)
    assert e.value.field == "grpc_request_pool"


def test_every_admin_http_api_needs_the_key(locked):
    server, _ = locked
    assert server.host == "0.0.0.0" and server.restricted
    for method, path in ADMIN_HTTP:
        assert _http(server, method, path) == 403, path
        assert _http(server, method, path, {"admin-key": "not-the-key-at-all"}) == 403, path
        assert _http(server, method, path, {"admin-key": KEY}) == 200, path


def test_inference_health_and_metadata_stay_open_over_http(locked):
    import tritonclient.http as httpclient

    server, _ = locked
    for method, path in OPEN_HTTP:
        assert _http(server, method, path) == 200, path
    client = httpclient.InferenceServerClient(f"{LOCAL}:{server.http_port}")
    inputs = []
    for name, a in valid_request(np.random.default_rng(0), 2, 16).items():
        inp = httpclient.InferInput(name, list(a.shape), "INT64")
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    result = client.infer(MODEL, inputs)
    assert result.as_numpy("recommendations").shape == (2, 50, 3)


def test_every_admin_grpc_api_needs_the_key(locked):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server, _ = locked
    client = grpcclient.InferenceServerClient(f"{LOCAL}:{server.grpc_port}")
    admin = {
        "model-repository": lambda h: client.get_model_repository_index(headers=h),
        "model-repository load": lambda h: client.load_model(MODEL, headers=h),
        "model-config": lambda h: client.get_model_config(MODEL, headers=h),
        "statistics": lambda h: client.get_inference_statistics(MODEL, headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
        "logging": lambda h: client.get_log_settings(headers=h),
        "shared-memory": lambda h: client.get_system_shared_memory_status(headers=h),
        "cuda shared-memory": lambda h: client.get_cuda_shared_memory_status(headers=h),
    }
    metadata = {"triton-grpc-protocol-admin-key": KEY}
    for name, call in admin.items():
        for headers in (None, {"triton-grpc-protocol-admin-key": "wrong" * 4}, {"admin-key": KEY}):
            with pytest.raises(InferenceServerException) as e:
                call(headers)
            assert "restricted" in str(e.value), name
            assert e.value.status() == "StatusCode.UNAVAILABLE", name
        call(metadata)  # with the key it works
    assert (
        client.get_model_repository_index(headers=metadata, as_json=True)["models"][0]["name"]
        == MODEL
    )
    # inference, health and metadata without any key
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_model_metadata(MODEL).name == MODEL
    result = client.infer(MODEL, grpc_inputs(valid_request(np.random.default_rng(1), 1, 8)))
    assert result.as_numpy("scores").shape == (1, 50)


def test_the_server_object_and_a_remote_reload_carry_the_key(locked):
    from algorithm.errors import ServerError
    from algorithm.serving.triton.admin import request_model_load

    server, _ = locked
    assert [m["name"] for m in server.repository_index()] == [MODEL]
    assert server.model_config(MODEL)["name"] == MODEL
    assert "model_stats" in server.statistics(MODEL)
    server.load_model(MODEL)
    url = f"{LOCAL}:{server.http_port}"
    request_model_load(url, MODEL, admin_key=KEY)
    with pytest.raises(ServerError) as e:
        request_model_load(url, MODEL)
    assert "key" in e.value.hint
    assert server.model_ready(MODEL)


def test_the_key_is_in_no_command_line_environment_or_log(locked):
    server, start_log = locked
    needle = KEY.encode()
    exposed = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                exposed.append(cmdline)
        except OSError:  # a process that ended meanwhile
            continue
    assert exposed == []
    cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--ugt-secret-argument-" in b" ".join(cmdline)
    assert not [a for a in cmdline if a.startswith(b"--http-restricted-api")]
    procs = server_processes(server)
    assert len(procs) >= 2  # tritonserver and its python stub
    for p in procs:
        environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        assert needle not in environ, p.name()
        assert b"TRITON_ADMIN_KEY=" not in environ, p.name()
    assert KEY not in server.log_path.read_text(errors="replace")  # verbose Triton log
    assert any("starting" in line for line in start_log)
    assert not [line for line in start_log if KEY in line]
    if shutil.which("ps"):
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30)
        assert KEY not in ps.stdout


# ------------------------------------------------------------------------------ mutual TLS
def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}", cwd=d)  # fmt: skip


def _signed(d: Path, ca: str, name: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    ext = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        ext = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", *ext, cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a throwaway CA")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "ca", "server", "DNS:localhost,IP:127.0.0.1")
    _signed(d, "ca", "client")
    _signed(d, "other-ca", "stranger")
    key = d / "admin.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    return d


@pytest.fixture(scope="module")
def mutual(repo, pki):
    tls = GrpcTls(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, grpc_tls=tls, admin_key=KEY
    ) as server:
        yield server


def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(mutual, pki):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = f"{LOCAL}:{mutual.grpc_port}"

    def client(cert: str | None, tls: bool = True):
        kwargs = {}
        if tls:
            kwargs = {"ssl": True, "root_certificates": str(pki / "ca.crt")}
            if cert:
                kwargs.update(
                    private_key=str(pki / f"{cert}.key"),
                    certificate_chain=str(pki / f"{cert}.crt"),
                )
        return grpcclient.InferenceServerClient(url, **kwargs)

    good = client("client")
    assert good.is_server_live(client_timeout=10)
    result = good.infer(MODEL, grpc_inputs(valid_request(np.random.default_rng(2), 1, 8)))
    assert result.as_numpy("recommendations").shape == (1, 50, 3)
    for name, bad in (
        ("no client certificate", client(None)),
        ("a certificate from another CA", client("stranger")),
        ("no TLS", client(None, tls=False)),
    ):
        with pytest.raises(InferenceServerException):
            bad.is_server_live(client_timeout=10)
            pytest.fail(f"served a client with {name}")


def test_the_benchmark_client_speaks_mutual_tls_and_sends_the_key(mutual, pki, monkeypatch):
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TRITON_ADMIN_KEY_FILE", raising=False)
    from algorithm.serving import BenchmarkConfig
    from algorithm.serving.benchmark import TritonBenchmark

    common = {
        "num_warmup_requests": 2,
        "num_requests": 10,
        "measurement_window_s": 0.3,
        "max_trials": 1,
        "tls": True,
        "tls_ca_file": str(pki / "ca.crt"),
        "tls_cert_file": str(pki / "client.crt"),
        "tls_key_file": str(pki / "client.key"),
    }
    url = f"{LOCAL}:{mutual.grpc_port}"
    keyed = TritonBenchmark(BenchmarkConfig(admin_key_file=str(pki / "admin.key"), **common))
    r = keyed.run(url, MODEL, batch_size=1, seq_length=16, concurrency=1)
    assert r.successful_requests >= 10 and r.failed_requests == 0
    assert r.server["success_count"] > 0  # the statistics API answered: the key went along
    plain = TritonBenchmark(BenchmarkConfig(**common))
    r = plain.run(url, MODEL, batch_size=1, seq_length=16, concurrency=1)
    assert r.successful_requests >= 10  # inference needs no key...
    assert r.server["success_count"] == 0  # ...but the statistics stay closed without it


def test_model_control_and_tune_carry_the_key(locked, tmp_path, monkeypatch):
    """tune against a server that restricts its admin APIs: every model-control call (index,
    config, load, unload) sends the key, over gRPC and HTTP; without it the refusal names the
    fix."""
    from algorithm.errors import ServerError
    from algorithm.serving import BenchmarkConfig, ServingTuner, TuneConfig
    from algorithm.serving.triton.control import KEY_HINT, ModelControl

    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TRITON_ADMIN_KEY_FILE", raising=False)
    server, _ = locked
    for protocol, port in (("grpc", server.grpc_port), ("http", server.http_port)):
        url = f"{LOCAL}:{port}"
        keyed = ModelControl(url, protocol, admin_key=KEY)
        assert keyed.config(MODEL)["name"] == MODEL and keyed.state(MODEL) == "READY"
        with pytest.raises(ServerError) as e:
            ModelControl(url, protocol).config(MODEL)
        assert e.value.hint == KEY_HINT, (protocol, str(e.value))
    keyed.load(MODEL)  # HTTP: unload, wait for the instances, load again
    assert keyed.ready(MODEL)
    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    load = BenchmarkConfig(
        concurrency_levels=(1,),
        test_batch_sizes=(1,),
        test_seq_lengths=(16,),
        num_warmup_requests=2,
        num_requests=10,
        measurement_window_s=0.2,
        max_trials=1,
        admin_key_file=str(key_file),
    )
    tc = TuneConfig(
        model_name=MODEL,
        settings=("max_queue_delay_us",),
        max_queue_delays_us=(0,),
        time_budget_s=300,
        compare_rounds=0,
        write_config=False,
        resume=False,
    )
    url = f"{LOCAL}:{server.grpc_port}"
    result = ServingTuner(tc, load).tune(url=url, output=tmp_path / "tune")
    assert result.candidates and all(c.error is None for c in result.candidates)
    assert ModelControl(url, admin_key=KEY).ready(MODEL)  # served again at the end
    with pytest.raises(ServerError, match="restricted") as e:
        ServingTuner(tc, load.replace(admin_key_file=None)).tune(url=url, output=tmp_path / "t2")
    assert e.value.hint == KEY_HINT
