"""Model control of a running Triton server over its own client API (gRPC or HTTP): load a model
(optionally with a whole config given inline, which Triton uses instead of config.pbtxt, so a
candidate config is served without touching the repository), unload it, read its config.

These calls need the server in explicit model-control mode; ``require_explicit`` says so clearly
when it is not. The embedded ``TritonServer`` and an external server (``--url``) go through the
same calls.
"""

from __future__ import annotations

import contextlib
import logging
import time

from algorithm.errors import ConfigError, ServerError
from algorithm.serving.config import check_name
from algorithm.serving.security import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, admin_headers

logger = logging.getLogger(__name__)

EXPLICIT_HINT = (
    "Start tritonserver with --model-control-mode=explicit (`ugt-serving serve --model-control "
    "explicit`), or leave out --url to let tune start its own server on the repository."
)


KEY_HINT = (
    f"The server restricts its admin APIs: give its key with --admin-key-file (or "
    f"${ADMIN_KEY_FILE_ENV} / ${ADMIN_KEY_ENV}; Python: BenchmarkConfig.admin_key_file)."
)


class ModelControl:
    """Load/unload/config of one server at ``url`` (``host:port``, the ``protocol``'s port).

    ``admin_key`` goes with every call (they are all admin calls: a server started with an
    admin key refuses them without it); ``tls`` (``security.ClientTls``) for a server that
    speaks TLS."""

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout_s: float = 300.0,
        admin_key: str | None = None,
        tls=None,
    ):
        if protocol not in ("grpc", "http"):
            raise ConfigError("protocol", protocol, "grpc or http")
        self.url, self.protocol, self.timeout_s = url, protocol, float(timeout_s)
        self.headers = admin_headers(admin_key, protocol)
        self.tls = tls
        self._client = None

    @property
    def client(self):
        if self._client is None:
            tls = self.tls
            if self.protocol == "grpc":
                import tritonclient.grpc as tc

                self._client = tc.InferenceServerClient(
                    self.url, **(tls.grpc_kwargs() if tls else {})
                )
            else:
                import tritonclient.http as tc

                self._client = tc.InferenceServerClient(
                    self.url,
                    connection_timeout=self.timeout_s,
                    network_timeout=self.timeout_s,
                    ssl=tls is not None,
                    # geventhttpclient calls it with cafile=...: the context has its own
                    ssl_context_factory=(lambda *a, **k: tls.ssl_context()) if tls else None,
                )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # InferenceServerException, connection errors
            text = str(e)
            hint = EXPLICIT_HINT if "not allowed" in text else None
            if "restricted" in text or "403" in text:
                hint = KEY_HINT
            raise ServerError(
                f"{what} at {self.url} ({self.protocol}) failed: {text}", hint=hint
            ) from e

    def is_live(self) -> bool:
        try:
            return bool(self.client.is_server_live())
        except Exception:  # unreachable counts as not live
            return False

    def ready(self, model: str) -> bool:
        try:
            name = check_name("model_name", model)
            return bool(self.client.is_model_ready(name, headers=self.headers))
        except Exception:
            return False

    def config(self, model: str) -> dict:
        """The config the server serves ``model`` with (JSON form)."""
        check_name("model_name", model)
        got = self._call(
            f"reading the config of {model!r}",
            self.client.get_model_config,
            model,
            headers=self.headers,
            **({"as_json": True} if self.protocol == "grpc" else {}),
        )
        return got.get("config", got) if self.protocol == "grpc" else got

    def load(self, model: str, config_json: str | None = None) -> None:
        """(Re)load ``model``: from the repository's config.pbtxt, or with ``config_json``.

        A version that is loaded is unloaded first, and its instances are gone before the new
        ones start: Triton's own reload starts the new instances beside the old ones (to keep
        serving), and on a GPU both sets may not fit (an H100 ran out of memory that way:
        benchmarks/results/tune_h100_attempt_oom.log). The model is unavailable in between."""
        check_name("model_name", model)
        if self.state(model) in ("READY", "LOADING"):
            self.unload(model)
        kwargs = {"config": config_json} if config_json else {}
        kwargs["headers"] = self.headers
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        what = f"loading {model!r}" + (" with a candidate config" if config_json else "")
        self._call(what, self.client.load_model, model, **kwargs)
        if not self.ready(model):
            raise ServerError(f"{model!r} is not ready after loading it at {self.url}")

    def unload(self, model: str, wait_s: float = 60.0) -> None:
        """Unload ``model`` and wait until its instances are gone (Triton answers at once and
        unloads in the background; the next candidate must not share the machine with them)."""
        check_name("model_name", model)
        self._call(f"unloading {model!r}", self.client.unload_model, model, headers=self.headers)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.state(model) not in ("UNLOADING", "READY", "LOADING"):
                return
            time.sleep(0.05)
        logger.warning("%s still unloading after %.0f s", model, wait_s)

    def state(self, model: str) -> str:
        """The model's state in the repository index ("" when the server names none)."""
        index = self._call("reading the repository index", self._index)
        for m in index:
            if m.get("name") == model:
                return m.get("state", "")
        return ""

    def _index(self) -> list[dict]:
        if self.protocol == "grpc":
            got = self.client.get_model_repository_index(headers=self.headers, as_json=True)
        else:
            got = self.client.get_model_repository_index(headers=self.headers)
        return got.get("models", []) if isinstance(got, dict) else list(got)

    def require_explicit(self, model: str) -> None:
        """Reload ``model`` from its repository config (unloaded first, see ``load``): proves
        that the server takes load requests (explicit model control) and that the model loads;
        ServerError with the hint otherwise."""
        if not self.is_live():
            raise ServerError(
                f"no Triton server answers at {self.url} ({self.protocol})",
                hint="Check --url and --protocol (gRPC is usually 8001, HTTP 8000).",
            )
        self.load(model)


__all__ = ["EXPLICIT_HINT", "KEY_HINT", "ModelControl"]
