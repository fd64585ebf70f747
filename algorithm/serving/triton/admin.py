"""Administrative calls to a running Triton server over HTTP, and reading its statistics.

``TritonServer`` has the same calls as methods for the server it started; these are for a
server started elsewhere (``ugt-serving versions ... --url``). A server that restricts its admin
APIs needs the key (``security.read_admin_key``).
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

from algorithm.errors import ServerError
from algorithm.serving.config import check_name
from algorithm.serving.security import ADMIN_HEADER, ADMIN_KEY_ENV, admin_headers


def request_model_load(
    http_url: str,
    model_name: str,
    timeout_s: float = 120.0,
    admin_key: str | None = None,
    admin_header: str = ADMIN_HEADER,
) -> None:
    """Ask a running server (explicit model control) to (re)load ``model_name``: it re-reads
    the config and the version folders. ``http_url`` is ``host:port`` or ``http://host:port``;
    ``admin_key`` is sent when the server restricts its model-repository API."""
    check_name("model_name", model_name)
    base = http_url if "://" in http_url else f"http://{http_url}"
    req = urllib.request.Request(
        f"{base}/v2/repository/models/{model_name}/load",
        data=b"",
        method="POST",
        headers=admin_headers(admin_key, "http", admin_header) or {},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError):
            detail = json.loads(detail).get("error", detail)
        restricted = e.code == 403
        raise ServerError(
            f"{base} refused to load {model_name!r}: {detail}",
            hint=f"The server restricts its admin APIs: give the key ({ADMIN_KEY_ENV} or "
            "--admin-key-file)."
            if restricted
            else "The server must run with --model-control-mode=explicit.",
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise ServerError(f"no Triton server answers at {base}: {e}") from e


def model_statistics(stats: dict, model_name: str) -> dict[str, int]:
    """Sum of counts over the versions of ``model_name`` in a statistics() answer."""
    total = {"inference_count": 0, "execution_count": 0, "success": 0, "fail": 0}
    for m in stats.get("model_stats", []):
        if m.get("name") != model_name:
            continue
        total["inference_count"] += int(m.get("inference_count", 0))
        total["execution_count"] += int(m.get("execution_count", 0))
        s = m.get("inference_stats", {})
        total["success"] += int(s.get("success", {}).get("count", 0))
        total["fail"] += int(s.get("fail", {}).get("count", 0))
    return total


__all__ = ["model_statistics", "request_model_load"]
