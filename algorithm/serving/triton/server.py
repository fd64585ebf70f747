"""The embedded Triton Inference Server: the real ``tritonserver`` binary as a child process.

The binary comes from the ``nvidia-pytriton`` wheel (or ``--triton-bin`` / ``TRITONSERVER_BIN``,
e.g. ``/opt/tritonserver/bin/tritonserver`` in NVIDIA's container). The wheel ships one python
backend stub per Python version; the stub of the running interpreter is installed into a
private backend directory, and the virtualenv's ``bin`` goes first on the server's PATH because
the stub finds its Python environment through PATH, not PYTHONPATH.

    with TritonServer("model_repository", http_port=0, grpc_port=0, metrics_port=0) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

Off loopback the administrative APIs (repository, model config, statistics, trace, logging,
shared memory) need the admin key (``admin_key``, else $TRITON_ADMIN_KEY_FILE or
$TRITON_ADMIN_KEY); on loopback the key is optional. tritonserver only takes the key inside a
command-line flag, so the flag is handed over out of sight of ``ps`` (``secret_argv.py``), and the
key is taken out of the environment the server and its python stubs see. ``grpc_tls`` serves
gRPC over TLS (mutual with a client CA).

The server dies with the thread that started it (``PR_SET_PDEATHSIG`` fires when that *thread*
ends, so start it from a thread that lives as long as the server, e.g. the main thread), stops
with SIGINT then SIGKILL, and every failure raises ServerError carrying the tail of the log.
The project must be installed in the environment the stub finds (it ignores PYTHONPATH: seen).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from algorithm.errors import ConfigError, DependencyError, InputFileNotFoundError, ServerError
from algorithm.serving.config import check_name
from algorithm.serving.security import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    DEFAULT_RESTRICTED,
    GrpcTls,
    ServerSecurity,
)
from algorithm.serving.triton.admin import model_statistics, request_model_load
from algorithm.serving.triton.secret_argv import (
    PLACEHOLDER,
    popen_with_secret_args,
    scrub_secret_args,
)

logger = logging.getLogger(__name__)

TRITON_BIN_ENV = "TRITONSERVER_BIN"
INSTALL_HINT = "pip install 'ugt-serving[server]' (nvidia-pytriton), or set TRITONSERVER_BIN"
MODEL_CONTROL_MODES = ("none", "explicit", "poll")
_PR_SET_PDEATHSIG = 1
_ERROR_LINE = re.compile(r"^E\d{4} ")


def _pytriton_dist() -> Path | None:
    """``site-packages/pytriton/tritonserver`` without importing pytriton (it is heavy)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").is_file() else None


def find_tritonserver(triton_bin=None) -> Path:
    """The tritonserver binary: ``triton_bin``, then $TRITONSERVER_BIN, the nvidia-pytriton
    wheel, then ``tritonserver`` on PATH. Raises DependencyError with the install command."""
    named = triton_bin or os.environ.get(TRITON_BIN_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise InputFileNotFoundError(
                f"tritonserver binary not found or not executable: {path}",
                hint=f"Point --triton-bin / {TRITON_BIN_ENV} at an executable tritonserver, or unset it.",
            )
        return path
    dist = _pytriton_dist()
    if dist is not None:
        return dist / "bin" / "tritonserver"
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    raise DependencyError(
        "tritonserver", INSTALL_HINT, purpose="running the Triton Inference Server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stub_for_running_python(dist: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").glob("*"))
        raise DependencyError(
            f"triton_python_backend_stub for Python {version}",
            f"use a Python the nvidia-pytriton wheel ships stubs for ({', '.join(have)})",
            purpose="the Triton python backend",
        )
    return stub


def prepare_backend_directory(binary: Path, workdir: Path) -> Path | None:
    """A backend directory whose python backend runs the running Python's stub.

    For the nvidia-pytriton layout (``python_backend_stubs/<ver>/``) the python backend is
    copied into ``workdir/backends/python`` with the matching stub beside it (the backend looks
    for the stub in its own directory). Other installations keep their own backends (None).
    """
    dist = binary.resolve().parent.parent
    if not (dist / "python_backend_stubs").is_dir():
        return None
    src = dist / "backends" / "python"
    dst = workdir / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(src / f, dst / f)
    shutil.copy2(_stub_for_running_python(dist), dst / "triton_python_backend_stub")
    return workdir / "backends"


def _libs_dir(binary: Path) -> Path | None:
    libs = binary.resolve().parent.parent.parent.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonServer:
    """The real tritonserver on ``model_repository`` as a context manager.

    Ports 0 pick free ports. ``model_control="explicit"`` starts with ``load_models`` (default:
    all) and enables ``load_model``/``unload_model``. ``extra_args`` go to tritonserver as is.
    ``admin_key`` (else the environment's, see ``security.read_admin_key``) restricts
    ``restricted_apis`` to requests carrying it in ``admin_header``; it is required when ``host``
    is not a loopback address. ``grpc_tls`` serves gRPC over TLS. ``grpc_request_pool`` is how
    many gRPC request objects Triton keeps for reuse (None: its default, 8); each keeps the input
    buffer of the largest request it carried, so 0 stops an oversized request's memory from
    staying (measured: benchmarks/RESULTS.md, which also says its throughput cost is unsettled).
    """

    def __init__(
        self,
        model_repository,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        triton_bin=None,
        model_control: str = "none",
        load_models: Sequence[str] | None = None,
        log_verbose: int = 0,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 15.0,
        log_dir=None,
        host: str = "127.0.0.1",
        response_cache_bytes: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        admin_key: str | None = None,
        restricted_apis: Sequence[str] = DEFAULT_RESTRICTED,
        admin_header: str = ADMIN_HEADER,
        grpc_tls: GrpcTls | None = None,
        grpc_request_pool: int | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise InputFileNotFoundError(
                f"model repository not found: {self.model_repository}",
                hint="Create one with `ugt-serving deploy` or `ugt-serving config`.",
            )
        if model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                "model_control", model_control, f"one of {', '.join(MODEL_CONTROL_MODES)}"
            )
        for name, port in (
            ("http_port", http_port),
            ("grpc_port", grpc_port),
            ("metrics_port", metrics_port),
        ):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(name, port, "0 (pick a free port) or a port in [1, 65535]")
        self.security = ServerSecurity.resolve(
            host, admin_key, restricted_apis, admin_header, grpc_tls
        )
        if grpc_request_pool is not None and (
            isinstance(grpc_request_pool, bool)
            or not isinstance(grpc_request_pool, int)
            or grpc_request_pool < 0
        ):
            raise ConfigError("grpc_request_pool", grpc_request_pool, "None or an integer >= 0")
        self.grpc_request_pool = grpc_request_pool
        self.binary = find_tritonserver(triton_bin)
        self.requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_control = model_control
        self.load_models = [check_name("load_models", m) for m in (load_models or [])]
        self.log_verbose = int(log_verbose)
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.host = host
        self.response_cache_bytes = int(response_cache_bytes)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        # absolute: the server runs in its work folder, where a relative path breaks the backend
        self._given_log_dir = Path(log_dir).resolve() if log_dir else None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def restricted(self) -> bool:
        """Whether the administrative APIs need the admin key."""
        return self.security.restricted

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient.http's ``url`` form)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (tritonclient.grpc's ``url`` form)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def _command(self, backend_dir: Path | None) -> tuple[list[str], dict[int, str]]:
        """The command line and, by position, the flags that must stay out of the process list."""
        cmd = [
            str(self.binary),
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--model-control-mode={self.model_control}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 2)}",
        ]
        if self.model_control == "explicit":
            cmd += [f"--load-model={m}" for m in self.load_models] or ["--load-model=*"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        if self.response_cache_bytes > 0:
            cmd.append(f"--cache-config=local,size={self.response_cache_bytes}")
            caches = self.binary.resolve().parent.parent / "caches"
            if caches.is_dir():
                cmd.append(f"--cache-directory={caches}")
        cmd += self.security.public_args()
        if self.grpc_request_pool is not None:
            cmd.append(f"--grpc-infer-allocation-pool-size={self.grpc_request_pool}")
        secret = {}
        for flag in self.security.secret_args():
            secret[len(cmd)] = flag
            cmd.append(flag)
        return cmd + self.extra_args, secret

    def _environment(self) -> dict[str, str]:
        env = os.environ.copy()
        # The python backend stub finds its environment through PATH: this venv's bin first.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        # The stub ignores PYTHONPATH (seen): the project must be installed in that environment.
        libs = _libs_dir(self.binary)
        if libs is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (env.get("LD_LIBRARY_PATH", ""), str(libs)) if p
            )
        # The key reaches tritonserver through secret_argv only: its python stubs (and whatever
        # the model's code runs) inherit this environment.
        for name in (ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV):
            env.pop(name, None)
        env.update(self.extra_env)
        return env

    def start(self) -> TritonServer:
        """Start tritonserver and wait until it (and every model it loads) is ready."""
        if self.process is not None:
            raise ServerError(
                "this TritonServer is already started", hint="Use one instance per server."
            )
        if self._given_log_dir is not None:
            self._given_log_dir.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="tritonserver-", dir=self._given_log_dir))
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="ugt-tritonserver-"))
        backend_dir = prepare_backend_directory(self.binary, self.workdir)
        auto_ports = 0 in self.requested_ports
        for attempt in range(3):
            self._pick_ports()
            try:
                self._launch(backend_dir, attempt)
                self._wait_ready()
                return self
            except ServerError:
                busy = "address already in use" in self.log_tail(200).lower()
                self._terminate()
                if not (auto_ports and busy and attempt < 2):
                    self._cleanup(keep_log=True)
                    raise
                logger.info("a picked port was taken meanwhile; retrying with new ports")
        raise AssertionError("unreachable")  # pragma: no cover

    def _pick_ports(self) -> None:
        taken = {p for p in self.requested_ports if p}
        ports = []
        for p in self.requested_ports:
            while p == 0 or (p in taken and p not in self.requested_ports):
                p = free_port(self.host)
            taken.add(p)
            ports.append(p)
        self.http_port, self.grpc_port, self.metrics_port = ports

    def _launch(self, backend_dir: Path | None, attempt: int) -> None:
        self.log_path = self.workdir / f"tritonserver{'' if attempt == 0 else f'.{attempt}'}.log"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in _terminate)
        cmd, secret = self._command(backend_dir)
        visible = [PLACEHOLDER.format(i) if i in secret else a for i, a in enumerate(cmd)]
        logger.info("starting %s", " ".join(visible))
        popen_args = {
            "stdout": self._log_file,
            "stderr": subprocess.STDOUT,
            "stdin": subprocess.DEVNULL,
            "env": self._environment(),
            "cwd": self.workdir,
            # Own process group: stop() signals the server and its python stubs together.
            "start_new_session": True,
            "preexec_fn": _die_with_parent,
        }
        try:
            if secret:
                self.process = popen_with_secret_args(cmd, secret, **popen_args)
            else:
                self.process = subprocess.Popen(cmd, **popen_args)  # noqa: PLW1509
        except OSError as e:
            raise ServerError(f"could not execute {self.binary}: {e}") from e

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with code {code} during start-up "
                    f"(repository {self.model_repository}; full log {self.log_path})",
                    self.error_tail(),
                    hint=self._failure_hint(),
                )
            if self._get("/v2/health/ready", quiet=True) is not None:
                scrub_secret_args(self.process)  # read at start-up, before the endpoints opened
                logger.info("tritonserver ready: http %s grpc %s", self.http_url, self.grpc_url)
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"tritonserver not ready after {self.startup_timeout_s:.0f} s (full log {self.log_path})",
                    self.error_tail(),
                    hint="Raise startup_timeout_s for slow model loads, or read the log tail.",
                )
            time.sleep(0.1)

    def _failure_hint(self) -> str:
        tail = self.log_tail(200).lower()
        # HTTP says "address already in use", gRPC "Socket '...' already in use" (with
        # "Unavailable", which must not read as a model that failed to load).
        if "already in use" in tail:
            return "A port is taken: pass other ports (0 picks free ones) or stop the other server."
        if "failed to load" in tail or "unavailable" in tail:
            return "A model failed to load: `ugt-serving validate <repository>` checks it."
        return ServerError.default_hint

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGINT)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "tritonserver ignored SIGINT for %.0f s; killing it", self.stop_timeout_s
                )
                self._signal_group(signal.SIGKILL)
                self.process.wait(10)
        if self.process is not None:
            # Stubs left behind by a crashed server share its process group.
            self._signal_group(signal.SIGKILL)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup(self, keep_log: bool) -> None:
        if self.workdir is None:
            return
        if keep_log or self._given_log_dir is not None:  # keep the log, not the 3 MB backend copy
            shutil.rmtree(self.workdir / "backends", ignore_errors=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop(self) -> None:
        """SIGINT (Triton finishes in-flight requests), then SIGKILL after ``stop_timeout_s``."""
        if self.process is None:
            return
        self._terminate()
        self._cleanup(keep_log=False)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server log ('' before start)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def error_tail(self, lines: int = 12) -> str:
        """What explains a failure: the log's error lines, then its last lines without the
        start-up tables (CPU-only noise about CUDA/NVML left out)."""
        text = self.log_tail(400).splitlines()
        noise = ("CudaDriverHelper", "NVML", "GPU metrics", "cuda")
        errors = [ln for ln in text if _ERROR_LINE.match(ln) and not any(n in ln for n in noise)]
        plain = [ln for ln in text if ln.strip() and not ln.lstrip().startswith(("|", "+"))]
        tail = [ln for ln in plain[-lines:] if ln not in errors]
        return "\n".join(errors[-lines:] + tail)

    # -- HTTP API ----------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        timeout: float = 5.0,
        headers: dict | None = None,
    ):
        url = f"http://{self.host}:{self.http_port}{path}"
        data = (
            json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        )
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read()
        return json.loads(payload) if payload else {}

    def _get(self, path: str, quiet: bool = False):
        try:
            return self._request("GET", path, timeout=2.0)
        except (urllib.error.URLError, OSError, ValueError):
            if quiet:
                return None
            raise

    def _api(
        self, method: str, path: str, what: str, body: dict | None = None, timeout: float = 10.0
    ):
        if not self.is_alive():
            raise ServerError(f"tritonserver is not running ({what})", self.error_tail())
        headers = self.security.client_headers("http")
        try:
            return self._request(method, path, body, timeout, headers)
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("error", detail)
            raise ServerError(f"{what} failed: {detail}", self.error_tail()) from e
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{what} failed: {e}", self.error_tail()) from e

    def is_ready(self) -> bool:
        return self.is_alive() and self._get("/v2/health/ready", quiet=True) is not None

    def model_ready(self, model_name: str, version: int | None = None) -> bool:
        check_name("model_name", model_name)
        path = (
            f"/v2/models/{model_name}" + (f"/versions/{int(version)}" if version else "") + "/ready"
        )
        return self.is_alive() and self._get(path, quiet=True) is not None

    def repository_index(self) -> list[dict]:
        """Every model of the repository with its state (name, version, state, reason)."""
        return self._api("POST", "/v2/repository/index", "repository index") or []

    def load_model(self, model_name: str, timeout_s: float | None = None) -> None:
        """(Re)load a model (explicit model control); raises ServerError with Triton's reason."""
        check_name("model_name", model_name)
        timeout = timeout_s or self.startup_timeout_s
        self._api(
            "POST",
            f"/v2/repository/models/{model_name}/load",
            f"loading model {model_name!r}",
            timeout=timeout,
        )

    def unload_model(self, model_name: str, timeout_s: float | None = None) -> None:
        check_name("model_name", model_name)
        timeout = timeout_s or self.startup_timeout_s
        self._api(
            "POST",
            f"/v2/repository/models/{model_name}/unload",
            f"unloading model {model_name!r}",
            timeout=timeout,
        )

    def model_config(self, model_name: str) -> dict:
        """The configuration Triton loaded (JSON form)."""
        check_name("model_name", model_name)
        return self._api("GET", f"/v2/models/{model_name}/config", f"config of {model_name!r}")

    def statistics(self, model_name: str | None = None) -> dict:
        """Triton's statistics API (``/v2/models[/name]/stats``): inference/execution counts, queue time."""
        path = (
            "/v2/models/stats"
            if model_name is None
            else f"/v2/models/{check_name('model_name', model_name)}/stats"
        )
        return self._api("GET", path, "statistics")

    def metrics(self) -> str:
        """The Prometheus metrics page as text."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5.0) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(
                f"metrics unavailable at {self.metrics_url}: {e}", self.error_tail()
            ) from e

    def wait_for_model(
        self, model_name: str, version: int | None = None, timeout_s: float = 60.0
    ) -> None:
        """Block until ``model_name`` (``version``) is ready; ServerError on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while not self.model_ready(model_name, version):
            if not self.is_alive():
                raise ServerError(
                    f"tritonserver died while waiting for {model_name!r}", self.error_tail()
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"model {model_name!r} version {version} not ready after {timeout_s:.0f} s",
                    self.error_tail(),
                )
            time.sleep(0.1)

    def urls(self) -> dict[str, str]:
        return {
            "http": f"http://{self.http_url}",
            "grpc": self.grpc_url,
            "metrics": self.metrics_url,
        }

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, http={self.http_url}, grpc={self.grpc_url}, {state})"


__all__ = [
    "TritonServer",
    "find_tritonserver",
    "free_port",
    "model_statistics",
    "prepare_backend_directory",
    "request_model_load",
]
