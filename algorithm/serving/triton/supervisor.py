"""Keep tritonserver running: restart it with exponential back-off when it dies.

    supervisor = ServerSupervisor("model_repository", on_event=print_event, http_port=8000)
    supervisor.start()          # the first start fails loudly (a broken repository is not retried)
    supervisor.run()            # blocks; restarts the server whenever it dies; stop() ends it

Every restart is announced through ``on_event(event, info)`` ("died", "restarting",
"restarted", "restart_failed", "gave_up") with the exit code and the tail of the dead server's
log, so the caller (``ugt-serving serve``) can say what happened. The restarted server keeps
the ports the first one bound, so clients reconnect to the same address. The back-off doubles
after each failure up to ``max_backoff_s`` and resets once a server stayed up ``reset_after_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from algorithm.errors import ConfigError, ServerError
from algorithm.serving.config import _Config, _float, _int
from algorithm.serving.triton.server import TritonServer

logger = logging.getLogger(__name__)

EventFn = Callable[[str, dict], None]


@dataclass
class RestartPolicy(_Config):
    """When and how often a dead tritonserver is started again."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    multiplier: float = 2.0
    max_restarts: int = 0  # 0 = keep restarting; n > 0 = give up (ServerError) after n in a row
    reset_after_s: float = 60.0  # a server up this long resets the back-off and the count
    poll_interval_s: float = 0.2  # how often the process is checked

    def validate(self) -> RestartPolicy:
        _float("initial_backoff_s", self.initial_backoff_s, 0.0)
        _float("max_backoff_s", self.max_backoff_s, self.initial_backoff_s)
        _float("multiplier", self.multiplier, 1.0)
        _int("max_restarts", self.max_restarts, 0)
        _float("reset_after_s", self.reset_after_s, 0.0)
        _float("poll_interval_s", self.poll_interval_s, 0.01, 60.0)
        return self

    def backoff(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1-based) of a series."""
        return min(
            self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, failures - 1)
        )


class ServerSupervisor:
    """Runs one TritonServer (``server_options`` are TritonServer's keyword arguments) and
    restarts it with back-off whenever its process exits."""

    def __init__(
        self,
        model_repository,
        policy: RestartPolicy | None = None,
        on_event: EventFn | None = None,
        **server_options,
    ):
        for port in ("http_port", "grpc_port", "metrics_port"):
            if port in server_options and server_options[port] is None:
                raise ConfigError(port, None, "0 (a free port) or a port number")
        self.model_repository = model_repository
        self.policy = (policy or RestartPolicy()).validate()
        self.on_event = on_event
        self.options = dict(server_options)
        self.server: TritonServer | None = None
        self.restarts = 0  # restarts done in total
        self._failures = 0  # restarts in the current series (reset by a long enough run)
        self._started_at = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def _emit(self, event: str, **info) -> None:
        logger.info("supervisor: %s %s", event, {k: v for k, v in info.items() if k != "log_tail"})
        if self.on_event is not None:
            self.on_event(event, info)

    def start(self) -> TritonServer:
        """Start the first server; a failure raises ServerError (nothing is retried)."""
        server = TritonServer(self.model_repository, **self.options)
        server.start()
        # Restarts bind the same ports, also when the first start picked free ones.
        self.options.update(
            http_port=server.http_port, grpc_port=server.grpc_port, metrics_port=server.metrics_port
        )
        with self._lock:
            self.server = server
        self._started_at = time.monotonic()
        return server

    def stop(self) -> None:
        """Stop supervising and stop the server (safe from another thread or a signal handler)."""
        self._stop.set()
        with self._lock:
            server = self.server
        if server is not None:
            server.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> ServerSupervisor:
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    # -- supervision -------------------------------------------------------------------------
    def run(self, duration_s: float | None = None) -> None:
        """Watch the server until stop() (or ``duration_s``); restart it whenever it dies.

        Raises ServerError (with the last log tail) once ``max_restarts`` restarts in a row
        failed to keep a server up."""
        if self.server is None:
            self.start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            if self.server.is_alive():
                if (
                    self._failures
                    and time.monotonic() - self._started_at >= self.policy.reset_after_s
                ):
                    self._failures = 0
                self._stop.wait(self.policy.poll_interval_s)
                continue
            self._recover()

    def _recover(self) -> None:
        dead = self.server
        proc = dead.process
        pid, code = (proc.pid, proc.poll()) if proc is not None else (None, None)
        uptime = time.monotonic() - self._started_at
        tail = dead.error_tail()
        dead.stop()  # reaps it and kills its python stubs (same process group)
        self._emit("died", pid=pid, exit_code=code, uptime_s=uptime, log_tail=tail)
        while not self._stop.is_set():
            self._failures += 1
            if self.policy.max_restarts and self._failures > self.policy.max_restarts:
                self._emit("gave_up", restarts=self._failures - 1, log_tail=tail)
                raise ServerError(
                    f"tritonserver died and {self._failures - 1} restarts in a row did not keep it up",
                    tail,
                    hint="Read the log tail; `ugt-serving validate <repository>` checks the models.",
                )
            delay = self.policy.backoff(self._failures)
            self._emit("restarting", attempt=self._failures, backoff_s=delay, exit_code=code)
            if self._stop.wait(delay):
                return
            try:
                server = self.start()
            except ServerError as e:
                tail = e.log_tail
                self._emit(
                    "restart_failed",
                    attempt=self._failures,
                    error=str(e).splitlines()[0],
                    log_tail=tail,
                )
                continue
            if self._stop.is_set():  # stop() ran while this server was starting
                server.stop()
                return
            self.restarts += 1
            self._emit(
                "restarted",
                attempt=self._failures,
                restarts=self.restarts,
                pid=server.process.pid,
                urls=server.urls(),
                log=str(server.log_path),
            )
            return


def describe_event(event: str, info: dict) -> str:
    """One line for a supervisor event, as ``ugt-serving serve`` prints it."""
    if event == "died":
        return (
            f"tritonserver exited (code {info.get('exit_code')}) after {info.get('uptime_s', 0):.0f} s; "
            f"log tail:\n{info.get('log_tail', '')}"
        )
    if event == "restarting":
        return f"restarting tritonserver in {info['backoff_s']:.1f} s (attempt {info['attempt']})"
    if event == "restarted":
        return (
            f"tritonserver restarted (pid {info['pid']}, restart {info['restarts']}): {info['urls']}, "
            f"log {info.get('log')}"
        )
    if event == "restart_failed":
        return f"restart attempt {info['attempt']} failed: {info['error']}"
    if event == "gave_up":
        return f"giving up after {info['restarts']} failed restarts"
    return f"{event}: {info}"


__all__ = ["RestartPolicy", "ServerSupervisor", "describe_event"]
