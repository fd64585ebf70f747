"""The served endpoint's security facts, in one place: the admin key (its names, where it comes
from, how a client sends it), which APIs it guards, the gRPC TLS files of the server and of a
client, and the largest request a deployment should accept.

The embedded server (``triton/server.py``), the Dockerfile and Kubernetes manifests (``deploy/``)
and the benchmark client (``bench/``) all read these names, so a key made for one works for the
others. Light on purpose: only the standard library.

Triton's rule, measured on tritonserver 2.51: an API restricted with ``<header>=<key>`` answers
HTTP 403 without the ``<header>`` request header, and gRPC ``UNAVAILABLE`` ("This protocol is
restricted") without the metadata ``triton-grpc-protocol-<header>``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from algorithm.errors import ConfigError, InputFileNotFoundError

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"  # the key itself (the manifests fill it from a Secret)
ADMIN_KEY_FILE_ENV = "TRITON_ADMIN_KEY_FILE"  # or a file holding it
ADMIN_SECRET_KEY = "admin-key"  # the key's name inside the Kubernetes Secret
ADMIN_HEADER = "admin-key"  # HTTP header; gRPC metadata is GRPC_HEADER_PREFIX + this
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
# Triton's names, in its order; the first three are what clients need.
RESTRICTABLE_APIS = ("health", "metadata", "inference", "model-repository", "model-config")
RESTRICTABLE_APIS += ("shared-memory", "statistics", "trace", "logging")
DEFAULT_RESTRICTED = RESTRICTABLE_APIS[3:]  # clients keep health, metadata and inference
MIN_KEY_LENGTH = 16
KEY_HINT = f"Make one: export {ADMIN_KEY_ENV}=$(openssl rand -hex 32)"
# The key sits inside tritonserver's flag value (<apis>:<header>=<key>) and in a header: no
# separators, no spaces.
_KEY = re.compile(r"^[A-Za-z0-9._~+/-]+$")
_HEADER = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # gRPC metadata keys must be lowercase
# A request is 4 int64 inputs of [batch, seq_len]; the rest (JSON or protobuf framing, tensor
# names, headers) stays far below this.
REQUEST_INPUTS = 4
INPUT_ITEM_BYTES = 8
REQUEST_OVERHEAD_BYTES = 64 << 10


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def check_admin_key(key, source: str = "admin_key") -> str:
    """``key`` if it can serve as an admin key; ConfigError (without echoing it) otherwise."""
    if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH or not _KEY.match(key):
        raise ConfigError(
            source,
            "<hidden>",
            f"at least {MIN_KEY_LENGTH} characters from letters, digits and . _ ~ + / -",
            hint=KEY_HINT,
        )
    return key


def check_header(field: str, value) -> str:
    if not isinstance(value, str) or not _HEADER.match(value):
        raise ConfigError(field, value, "a lowercase header name: letters, digits, '-'")
    return value


def check_apis(field: str, apis) -> tuple[str, ...]:
    """Restricted APIs in Triton's order; 'health' stays open (probes carry no key) and
    'model-repository' (load/unload) is always restricted."""
    if not isinstance(apis, (tuple, list)) or any(a not in RESTRICTABLE_APIS for a in apis):
        raise ConfigError(field, apis, f"names from {', '.join(RESTRICTABLE_APIS)}")
    if "model-repository" not in apis:
        raise ConfigError(field, apis, "a list including 'model-repository' (model load/unload)")
    if "health" in apis:
        raise ConfigError(field, apis, "a list without 'health' (health probes carry no key)")
    return tuple(a for a in RESTRICTABLE_APIS if a in apis)


def read_key_file(path) -> str:
    """The key in ``path`` (surrounding whitespace dropped); warns when others may read it."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except FileNotFoundError:
        raise InputFileNotFoundError(
            f"admin key file not found: {p}", hint=f"Write one: openssl rand -hex 32 > {p}"
        ) from None
    except OSError as e:
        raise InputFileNotFoundError(f"admin key file unreadable: {p}: {e}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("admin key file %s is readable by others: chmod 600 it", p)
    return check_admin_key(text.strip(), f"admin key file {p}")


def read_admin_key(key_file=None, environ=None) -> str | None:
    """The admin key from ``key_file``, else $TRITON_ADMIN_KEY_FILE, else $TRITON_ADMIN_KEY;
    None when none is set. Never from a command-line argument: ``ps`` shows those."""
    env = os.environ if environ is None else environ
    if key_file:
        return read_key_file(key_file)
    if env.get(ADMIN_KEY_FILE_ENV):
        return read_key_file(env[ADMIN_KEY_FILE_ENV])
    if env.get(ADMIN_KEY_ENV):
        return check_admin_key(env[ADMIN_KEY_ENV].strip(), f"${ADMIN_KEY_ENV}")
    return None


def admin_headers(key: str | None, protocol: str, header: str = ADMIN_HEADER) -> dict | None:
    """What a client sends on an admin call: the HTTP header, or the gRPC metadata."""
    if not key:
        return None
    return {(GRPC_HEADER_PREFIX + header) if protocol == "grpc" else header: key}


def restriction_args(apis, header: str, key: str) -> list[str]:
    """tritonserver's two flags that put ``apis`` behind ``header: key`` on HTTP and gRPC.
    (``key`` may be a reference such as ``$(TRITON_ADMIN_KEY)`` in a manifest.)"""
    spec = f"{','.join(apis)}:{header}={key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def _file(field: str, value) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(field, value, "the path of a PEM file")
    p = Path(value).expanduser()
    if not p.is_file():
        raise InputFileNotFoundError(f"{field}: PEM file not found: {p}")
    return str(p.resolve())


@dataclass(frozen=True)
class GrpcTls:
    """TLS of tritonserver's gRPC endpoint: its certificate and key, and with ``client_ca`` the
    CA whose certificates clients must present (mutual TLS). HTTP TLS is the ingress's job."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def validate(self) -> GrpcTls:
        object.__setattr__(self, "cert_file", _file("cert_file", self.cert_file))
        object.__setattr__(self, "key_file", _file("key_file", self.key_file))
        if self.client_ca_file is not None:
            object.__setattr__(self, "client_ca_file", _file("client_ca_file", self.client_ca_file))
        return self

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def server_args(self) -> list[str]:
        return tls_args(self.cert_file, self.key_file, self.client_ca_file)


def tls_args(cert: str, key: str, client_ca: str | None = None) -> list[str]:
    """tritonserver's gRPC TLS flags (shared by the embedded server and the manifests)."""
    args = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
    if client_ca is not None:
        args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={client_ca}"]
    return args


@dataclass(frozen=True)
class ClientTls:
    """A client's side of TLS: the CA that signed the server's certificate (None: the system's
    roots) and, for mutual TLS, the client's own certificate and key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def validate(self) -> ClientTls:
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _file(name, getattr(self, name)))
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                "cert_file" if self.cert_file is None else "key_file",
                None,
                "both a client certificate and its key for mutual TLS, or neither",
            )
        return self

    def grpc_kwargs(self) -> dict:
        """Keyword arguments of tritonclient.grpc(.aio).InferenceServerClient."""
        return {
            "ssl": True,
            "root_certificates": self.ca_file,
            "private_key": self.key_file,
            "certificate_chain": self.cert_file,
        }

    def ssl_context(self):
        """An ``ssl.SSLContext`` for the HTTP client (an https ingress)."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@dataclass(frozen=True)
class ServerSecurity:
    """What a tritonserver enforces, resolved and checked: the admin key (None: the admin APIs
    are open, allowed on loopback only), which APIs it guards, and gRPC TLS."""

    admin_key: str | None = field(default=None, repr=False)
    restricted_apis: tuple[str, ...] = DEFAULT_RESTRICTED
    admin_header: str = ADMIN_HEADER
    grpc_tls: GrpcTls | None = None

    @classmethod
    def resolve(
        cls,
        host: str,
        admin_key: str | None = None,
        restricted_apis=DEFAULT_RESTRICTED,
        admin_header: str = ADMIN_HEADER,
        grpc_tls: GrpcTls | None = None,
    ) -> ServerSecurity:
        """``admin_key``, else the environment's (``read_admin_key``); a server bound off
        loopback without one is refused: its admin APIs would answer anyone reaching the port."""
        key = check_admin_key(admin_key) if admin_key is not None else read_admin_key()
        if key is None and not is_loopback(host):
            raise ConfigError(
                "admin_key",
                None,
                f"a key whenever host is not a loopback address (host={host!r}): the "
                "administrative APIs would answer anyone who reaches the port",
                hint=f"{KEY_HINT} (or --admin-key-file), or bind 127.0.0.1.",
            )
        if grpc_tls is not None and not isinstance(grpc_tls, GrpcTls):
            raise ConfigError("grpc_tls", grpc_tls, "a security.GrpcTls or None")
        return cls(
            key,
            check_apis("restricted_apis", list(restricted_apis)),
            check_header("admin_header", admin_header),
            grpc_tls.validate() if grpc_tls is not None else None,
        )

    @property
    def restricted(self) -> bool:
        return self.admin_key is not None

    def public_args(self) -> list[str]:
        """Flags that may show in the process list (TLS file paths)."""
        return self.grpc_tls.server_args() if self.grpc_tls is not None else []

    def secret_args(self) -> list[str]:
        """Flags that carry the key: they must stay out of the process list."""
        if self.admin_key is None:
            return []
        return restriction_args(self.restricted_apis, self.admin_header, self.admin_key)

    def client_headers(self, protocol: str) -> dict | None:
        return admin_headers(self.admin_key, protocol, self.admin_header)


def max_request_bytes(max_batch_size: int, max_seq_length: int) -> int:
    """The largest valid request on the wire: 4 int64 inputs of [max_batch, max_seq] plus
    framing. A proxy in front of the server refuses anything larger."""
    return max_batch_size * max_seq_length * REQUEST_INPUTS * INPUT_ITEM_BYTES + (
        REQUEST_OVERHEAD_BYTES
    )


__all__ = [
    "ADMIN_HEADER",
    "ADMIN_KEY_ENV",
    "ADMIN_KEY_FILE_ENV",
    "ADMIN_SECRET_KEY",
    "DEFAULT_RESTRICTED",
    "GRPC_HEADER_PREFIX",
    "RESTRICTABLE_APIS",
    "ClientTls",
    "GrpcTls",
    "ServerSecurity",
    "admin_headers",
    "check_admin_key",
    "check_apis",
    "is_loopback",
    "max_request_bytes",
    "read_admin_key",
    "restriction_args",
    "tls_args",
]
