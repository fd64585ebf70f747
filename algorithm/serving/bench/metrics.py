"""Prometheus text from a metrics page (Triton's /metrics): fetch and parse. Read by the server
monitor, the GPU monitor (nv_gpu_* of a remote server) and the A/B results (ugt_router_*)."""

from __future__ import annotations

import re
import urllib.request

_METRIC_RE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")


_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text -> {metric: [(labels, value), ...]} in the order they appear."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_RE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL_RE.findall(m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def fetch_metrics(url: str, timeout: float = 1.0) -> str:
    """The text of a Prometheus metrics page (Triton's, usually port 8002)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (the user's own server)
        return r.read().decode("utf-8", "replace")
