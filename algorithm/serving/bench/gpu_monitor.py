"""GPUMonitor: utilization, memory and power of each GPU, sampled while a benchmark measures.

Guide 10.2's ``with GPUMonitor() as monitor: ...``. A background thread samples every
``interval_s`` (one sample at the start and one at the end as well, so even a short window has
two). Where the numbers come from, first that works:

- ``metrics_url`` given (a remote server): Triton's own Prometheus metrics, ``nv_gpu_utilization``
  (0-1), ``nv_gpu_memory_used_bytes`` and ``nv_gpu_power_usage`` (W), one series per GPU.
- NVML through ``nvidia-ml-py`` (``pip install 'ugt-serving[gpu]'``; imported only here, when a
  monitor starts): the GPUs of this machine.
- ``nvidia-smi --query-gpu``, where the driver is installed but nvidia-ml-py is not.

On a machine without a GPU nothing is sampled, every figure is None and ``note`` says why (the
report prints it); nothing raises. Figures: ``avg_utilization`` in percent (as nvidia-smi shows
it), the mean over GPUs and samples; ``peak_memory_mb`` the largest memory in use summed over
the GPUs (MiB); ``avg_power_w`` the mean power drawn summed over the GPUs; ``energy_j`` that power
integrated over the sampled time; and the same per GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import threading
import time

from algorithm.serving.bench.metrics import fetch_metrics, parse_metrics

logger = logging.getLogger(__name__)

GPU_INSTALL = "pip install 'ugt-serving[gpu]' (nvidia-ml-py)"
_SMI_QUERY = "index,name,utilization.gpu,memory.used,power.draw"

# One sample: {gpu index: (utilization %, memory used bytes, power W)}; None where unknown.
Sample = dict[int, tuple]


# ------------------------------------------------------------------------------------ sources
class NvmlSource:
    """This machine's GPUs through NVML (nvidia-ml-py's ``pynvml``)."""

    name = "nvml"

    def __init__(self, gpus=None):
        self.gpus = gpus
        self.nvml = None
        self.handles: dict[int, object] = {}
        self.names: dict[int, str] = {}

    def open(self) -> str | None:
        """None when sampling can start, else why it cannot."""
        if importlib.util.find_spec("pynvml") is None:
            return f"nvidia-ml-py is not installed: {GPU_INSTALL}"
        import pynvml

        try:
            pynvml.nvmlInit()
        except Exception as e:  # pynvml raises NVMLError subclasses, ctypes OSError
            return f"NVML could not start ({e}): no NVIDIA driver or GPU on this machine"
        self.nvml = pynvml
        count = pynvml.nvmlDeviceGetCount()
        wanted = range(count) if self.gpus is None else [g for g in self.gpus if g < count]
        for i in wanted:
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            self.handles[i] = h
            name = pynvml.nvmlDeviceGetName(h)
            self.names[i] = name.decode() if isinstance(name, bytes) else str(name)
        if not self.handles:
            self.close()
            return f"NVML sees {count} GPU(s), none of {list(self.gpus or [])}"
        return None

    def _read(self, fn, h):
        try:
            return fn(h)
        except Exception:  # a GPU without power readings (some boards) or a transient error
            return None

    def sample(self) -> Sample:
        n = self.nvml
        out = {}
        for i, h in self.handles.items():
            util = self._read(n.nvmlDeviceGetUtilizationRates, h)
            mem = self._read(n.nvmlDeviceGetMemoryInfo, h)
            power = self._read(n.nvmlDeviceGetPowerUsage, h)  # milliwatts
            out[i] = (
                float(util.gpu) if util is not None else None,
                float(mem.used) if mem is not None else None,
                power / 1e3 if power is not None else None,
            )
        return out

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # shutting down changes nothing measured
                logger.debug("nvmlShutdown failed", exc_info=True)
            self.nvml = None


class SmiSource:
    """This machine's GPUs through ``nvidia-smi --query-gpu`` (no Python bindings needed)."""

    name = "nvidia-smi"

    def __init__(self, gpus=None):
        self.gpus = gpus
        self.names: dict[int, str] = {}

    def _query(self) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def open(self) -> str | None:
        if shutil.which("nvidia-smi") is None:
            return "nvidia-smi is not on PATH"
        try:
            rows = self._query()
        except (OSError, subprocess.SubprocessError) as e:
            return f"nvidia-smi failed ({e}): no usable NVIDIA driver or GPU"
        for row in rows:
            if len(row) >= 2 and row[0].isdigit():
                i = int(row[0])
                if self.gpus is None or i in self.gpus:
                    self.names[i] = row[1]
        return None if self.names else "nvidia-smi lists no GPU"

    def sample(self) -> Sample:
        def num(v: str):
            try:
                return float(v)
            except ValueError:  # "[N/A]", "[Not Supported]"
                return None

        out = {}
        for row in self._query():
            if len(row) < 5 or not row[0].isdigit() or int(row[0]) not in self.names:
                continue
            mem = num(row[3])
            out[int(row[0])] = (num(row[2]), mem * 2**20 if mem is not None else None, num(row[4]))
        return out

    def close(self) -> None:
        pass


class MetricsSource:
    """A (remote) Triton server's GPUs through its metrics endpoint (``nv_gpu_*``)."""

    name = "metrics"

    def __init__(self, url: str, gpus=None):
        self.url, self.gpus = url, gpus
        self.names: dict[int, str] = {}
        self._order: dict[str, int] = {}

    def _fetch(self) -> dict:
        return parse_metrics(fetch_metrics(self.url))

    def open(self) -> str | None:
        try:
            metrics = self._fetch()
        except OSError as e:
            return f"the metrics endpoint {self.url} did not answer ({e})"
        if not metrics.get("nv_gpu_utilization") and not metrics.get("nv_gpu_memory_used_bytes"):
            return (
                f"the server's metrics ({self.url}) have no nv_gpu_* series: it has no GPU, "
                "or runs with --allow-gpu-metrics=false"
            )
        self._parse(metrics)
        return None

    def _parse(self, metrics: dict) -> Sample:
        values: dict[int, list] = {}
        for name, slot, scale in (
            ("nv_gpu_utilization", 0, 100.0),
            ("nv_gpu_memory_used_bytes", 1, 1.0),
            ("nv_gpu_power_usage", 2, 1.0),
        ):
            for labels, value in metrics.get(name, []):
                uuid = labels.get("gpu_uuid", str(len(self._order)))
                idx = self._order.setdefault(uuid, len(self._order))
                if self.gpus is not None and idx not in self.gpus:
                    continue
                self.names.setdefault(idx, uuid)
                values.setdefault(idx, [None, None, None])[slot] = value * scale
        return {i: tuple(v) for i, v in values.items()}

    def sample(self) -> Sample:
        return self._parse(self._fetch())

    def close(self) -> None:
        pass


def open_source(metrics_url: str | None = None, gpus=None):
    """(source, None) for the first source that works, else (None, why none does)."""
    if metrics_url:
        src = MetricsSource(metrics_url, gpus)
        why = src.open()
        return (src, None) if why is None else (None, why)
    reasons = []
    for src in (NvmlSource(gpus), SmiSource(gpus)):
        why = src.open()
        if why is None:
            return src, None
        reasons.append(why)
    return None, "; ".join(reasons)


def server_host(url: str) -> str:
    """The host of ``host:port``, ``scheme://host:port/...`` or ``[v6]:port``."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def is_local(url: str) -> bool:
    """Whether the server at ``url`` runs on this machine (loopback or this host's name)."""
    import socket

    host = server_host(url)
    if host in ("", "localhost", "::1", "0.0.0.0") or host.startswith("127."):
        return True
    try:
        return host in {socket.gethostname(), socket.getfqdn()} or socket.gethostbyname(
            host
        ).startswith("127.")
    except OSError:
        return False


# ------------------------------------------------------------------------------------ monitor
class GPUMonitor:
    """Samples every GPU's utilization, memory and power in a thread while the block runs.

    ``GPUMonitor(metrics_url=...)`` reads a remote Triton server's GPUs from its metrics page;
    without it, this machine's GPUs through NVML (or nvidia-smi). ``gpus`` limits the indices.
    """

    def __init__(self, interval_s: float = 0.2, gpus=None, metrics_url: str | None = None):
        self.interval_s = max(0.01, float(interval_s))
        self.gpus = None if gpus is None else tuple(int(g) for g in gpus)
        self.metrics_url = metrics_url
        self.samples: list[tuple[float, Sample]] = []
        self.note = ""
        self.source_name = ""
        self.names: dict[int, str] = {}
        self._source = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_server(
        cls, url: str, metrics_url: str | None = None, gpus=None, interval_s: float = 0.2
    ) -> GPUMonitor:
        """The monitor for a Triton server at ``url`` (host:port): ``metrics_url`` if given,
        this machine's GPUs if the server runs here, else the server's metrics page on Triton's
        default port 8002 (remote GPUs cannot be read through NVML)."""
        if metrics_url is None and not is_local(url):
            metrics_url = f"http://{server_host(url)}:8002/metrics"
            logger.info("remote server %s: GPU figures from %s", url, metrics_url)
        return cls(interval_s, gpus, metrics_url)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> GPUMonitor:
        self.samples, self.note = [], ""
        self._source, why = open_source(self.metrics_url, self.gpus)
        if self._source is None:
            self.note = why or "no GPU source"
            logger.info("GPU monitor: nothing to sample (%s)", self.note)
            return self
        self.source_name = self._source.name + (f" {self.metrics_url}" if self.metrics_url else "")
        self.names = dict(self._source.names)
        self._take()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> GPUMonitor:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._take()
        if self._source is not None:
            self._source.close()
            self._source = None
        if self.source_name and not self.samples:
            self.note = f"{self.source_name}: every GPU sample failed (see the debug log)"
        return self

    def __enter__(self) -> GPUMonitor:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def _take(self) -> None:
        try:
            sample = self._source.sample()
        except Exception as e:  # a hiccup of the driver or the endpoint must not end a benchmark
            logger.debug("GPU sample failed: %s", e)
            return
        if sample:
            self.samples.append((time.monotonic(), sample))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    # -- figures -----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return bool(self.samples)

    def indices(self) -> list[int]:
        return sorted({i for _, s in self.samples for i in s})

    def _values(self, idx: int, slot: int) -> list[float]:
        return [s[idx][slot] for _, s in self.samples if idx in s and s[idx][slot] is not None]

    def per_gpu(self) -> list[dict]:
        """[{index, name, utilization_avg (%), memory_peak_mb, power_avg_w}] per sampled GPU."""
        out = []
        for i in self.indices():
            util, mem, power = (self._values(i, k) for k in range(3))
            out.append(
                {
                    "index": i,
                    "name": self.names.get(i, ""),
                    "utilization_avg": sum(util) / len(util) if util else None,
                    "memory_peak_mb": max(mem) / 2**20 if mem else None,
                    "power_avg_w": sum(power) / len(power) if power else None,
                }
            )
        return out

    def _totals(self, slot: int) -> list[tuple[float, float]]:
        """(time, the sample's value summed over GPUs) for samples that have the value."""
        out = []
        for t, s in self.samples:
            vals = [v[slot] for v in s.values() if v[slot] is not None]
            if vals:
                out.append((t, sum(vals)))
        return out

    @property
    def avg_utilization(self) -> float | None:
        utils = [g["utilization_avg"] for g in self.per_gpu() if g["utilization_avg"] is not None]
        return sum(utils) / len(utils) if utils else None

    @property
    def peak_memory_mb(self) -> float | None:
        mems = self._totals(1)
        return max(v for _, v in mems) / 2**20 if mems else None

    @property
    def avg_power_w(self) -> float | None:
        powers = self._totals(2)
        return sum(v for _, v in powers) / len(powers) if powers else None

    @property
    def energy_j(self) -> float | None:
        """The summed power integrated over the sampled time (trapezoids)."""
        powers = self._totals(2)
        if len(powers) < 2:
            return None
        return sum(
            (t1 - t0) * (p0 + p1) / 2
            for (t0, p0), (t1, p1) in zip(powers, powers[1:], strict=False)
        )

    def summary(self) -> dict:
        """The ExtendedBenchmarkResult fields this monitor measured."""
        gpus = self.per_gpu()
        return {
            "gpu_memory_peak_mb": self.peak_memory_mb,
            "gpu_utilization_avg": self.avg_utilization,
            "power_consumption_avg_w": self.avg_power_w,
            "energy_j": self.energy_j,
            "gpu_indices": [g["index"] for g in gpus],
            "gpu_names": [g["name"] for g in gpus],
            "gpu_memory_peak_mb_per_gpu": [g["memory_peak_mb"] for g in gpus],
            "gpu_utilization_avg_per_gpu": [g["utilization_avg"] for g in gpus],
            "power_consumption_avg_w_per_gpu": [g["power_avg_w"] for g in gpus],
            "gpu_samples": len(self.samples),
            "gpu_monitor": self.source_name,
            "gpu_monitor_note": self.note,
        }


__all__ = [
    "GPU_INSTALL",
    "GPUMonitor",
    "MetricsSource",
    "NvmlSource",
    "SmiSource",
    "is_local",
    "open_source",
    "server_host",
]
