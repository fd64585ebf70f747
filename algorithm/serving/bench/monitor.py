"""What the server did while it was measured: statistics deltas and CPU/GPU samples.

``stats_snapshot`` / ``server_breakdown`` turn two reads of Triton's statistics API into the
per-request queue / compute_input / compute_infer / compute_output times and the batch sizes
the dynamic batcher formed. ``ResourceMonitor`` samples the server's metrics endpoint
(nv_cpu_utilization, nv_gpu_utilization, nv_gpu_memory_used_bytes) or, without one, this
machine's GPUs through ``gpu_monitor``'s sources (NVML, else nvidia-smi); on a machine without a
GPU the GPU fields stay None. Power and per-GPU detail are ``gpu_monitor.GPUMonitor``'s.
"""

from __future__ import annotations

import asyncio
import logging

from algorithm.serving.bench.metrics import fetch_metrics, parse_metrics

logger = logging.getLogger(__name__)

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _pair(d: dict | None) -> tuple[int, int]:
    d = d or {}
    return int(d.get("count", 0) or 0), int(d.get("ns", 0) or 0)


def stats_snapshot(stats: dict, model: str) -> dict:
    """Counters of ``model`` (all versions summed) from a statistics answer (JSON form)."""
    snap = {"inference_count": 0, "execution_count": 0, "batch": {}}
    snap.update({k: (0, 0) for k in DURATIONS})
    for ms in (stats or {}).get("model_stats", []):
        if ms.get("name") != model:
            continue
        snap["inference_count"] += int(ms.get("inference_count", 0) or 0)
        snap["execution_count"] += int(ms.get("execution_count", 0) or 0)
        inf = ms.get("inference_stats", {})
        for k in DURATIONS:
            c, ns = _pair(inf.get(k))
            snap[k] = (snap[k][0] + c, snap[k][1] + ns)
        for b in ms.get("batch_stats", []) or []:
            size = int(b.get("batch_size", 0) or 0)
            snap["batch"][size] = snap["batch"].get(size, 0) + _pair(b.get("compute_infer"))[0]
    return snap


def server_breakdown(before: dict, after: dict) -> tuple[dict, dict]:
    """(average server-side times in us per request, {batch size formed: executions}) in the window."""

    def avg_us(k):
        c = after[k][0] - before[k][0]
        return (after[k][1] - before[k][1]) / c / 1e3 if c > 0 else 0.0

    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    server = {
        "request_us": avg_us("success"),
        "queue_us": avg_us("queue"),
        "compute_input_us": avg_us("compute_input"),
        "compute_infer_us": avg_us("compute_infer"),
        "compute_output_us": avg_us("compute_output"),
        "success_count": after["success"][0] - before["success"][0],
        "fail_count": after["fail"][0] - before["fail"][0],
        "inference_count": inferences,
        "execution_count": executions,
        "avg_batch": inferences / executions if executions > 0 else 0.0,
    }
    batches = {}
    for size, count in sorted(after["batch"].items()):
        delta = count - before["batch"].get(size, 0)
        if delta > 0:
            batches[size] = delta
    return server, batches


def sample_metrics(text: str) -> dict:
    """One sample: {"cpu": fraction or None, "gpus": {index: (utilization, memory bytes)}}."""
    m = parse_metrics(text)
    cpu = m.get("nv_cpu_utilization")
    gpus: dict[int, list] = {}
    order: dict[str, int] = {}
    for name, slot in (("nv_gpu_utilization", 0), ("nv_gpu_memory_used_bytes", 1)):
        for labels, value in m.get(name, []):
            uuid = labels.get("gpu_uuid", str(len(order)))
            idx = order.setdefault(uuid, len(order))
            gpus.setdefault(idx, [None, None])[slot] = value
    return {"cpu": cpu[0][1] if cpu else None, "gpus": {i: tuple(v) for i, v in gpus.items()}}


class ResourceMonitor:
    """Samples CPU/GPU use every ``interval`` seconds while a measurement runs (asyncio task)."""

    def __init__(self, metrics_url: str | None = None, interval: float = 0.5):
        self.metrics_url, self.interval = metrics_url, interval
        self.samples: list[dict] = []
        self._task: asyncio.Task | None = None
        self._gpu = None

    def _source(self):
        if self.metrics_url:
            return lambda: sample_metrics(fetch_metrics(self.metrics_url))
        from algorithm.serving.bench.gpu_monitor import open_source

        self._gpu, why = open_source()
        if self._gpu is None:  # no driver / no GPU: GPU fields stay None
            logger.debug("no GPU to sample: %s", why)
            return None

        def sample():
            gpus = self._gpu.sample()
            return {
                "cpu": None,
                "gpus": {
                    i: (u / 100 if u is not None else None, m) for i, (u, m, _) in gpus.items()
                },
            }

        return sample

    def start(self) -> None:
        source = self._source()
        if source is not None:
            self._task = asyncio.ensure_future(self._loop(source))

    async def _loop(self, source):
        while True:
            try:
                self.samples.append(await asyncio.to_thread(source))
            except Exception as e:  # a metrics hiccup must not end the benchmark
                logger.debug("resource sample failed: %s", e)
            await asyncio.sleep(self.interval)

    async def stop(self) -> dict:
        """BenchmarkResult fields: host_cpu_utilization, gpu_utilization, gpu_memory_used_mb, per_gpu."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        return summarize_samples(self.samples)


def summarize_samples(samples: list[dict]) -> dict:
    out: dict = {}
    cpus = [s["cpu"] for s in samples if s.get("cpu") is not None]
    if cpus:
        out["host_cpu_utilization"] = sum(cpus) / len(cpus)
    per_gpu: dict[int, dict] = {}
    for idx in sorted({i for s in samples for i in s.get("gpus", {})}):
        utils = [
            s["gpus"][idx][0] for s in samples if idx in s["gpus"] and s["gpus"][idx][0] is not None
        ]
        mems = [
            s["gpus"][idx][1] for s in samples if idx in s["gpus"] and s["gpus"][idx][1] is not None
        ]
        per_gpu[idx] = {
            "utilization": sum(utils) / len(utils) if utils else None,
            "memory_used_mb": max(mems) / 2**20 if mems else None,
        }
    if per_gpu:
        utils = [g["utilization"] for g in per_gpu.values() if g["utilization"] is not None]
        mems = [g["memory_used_mb"] for g in per_gpu.values() if g["memory_used_mb"] is not None]
        out["per_gpu"] = per_gpu
        out["gpu_utilization"] = sum(utils) / len(utils) if utils else None
        out["gpu_memory_used_mb"] = sum(mems) if mems else None
    return out


class HostCpu:
    """CPU seconds used by the host, a local server's process tree and this process.

    Between two snapshots: ``server`` (tritonserver and its python stubs), ``client`` (this load
    generator) and ``other`` (everything else on the host). With a local server this makes a busy
    host visible, and the server's CPU per request is a cost that does not depend on how much
    CPU the neighbours left (throughput of a CPU-bound server ~ cores / CPU per request).
    """

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid

    def snapshot(self) -> dict | None:
        try:
            import psutil
        except ImportError:  # psutil is a dependency; without it these fields stay None
            return None
        t = psutil.cpu_times()
        busy = (
            t.user
            + t.nice
            + t.system
            + getattr(t, "irq", 0)
            + getattr(t, "softirq", 0)
            + getattr(t, "steal", 0)
        )
        me = psutil.Process()
        own = me.cpu_times()
        snap = {
            "time": _monotonic(),
            "busy": busy,
            "client": own.user + own.system,
            "server": None,
            "pids": {},
        }
        if self.server_pid:
            try:
                root = psutil.Process(self.server_pid)
                for p in [root, *root.children(recursive=True)]:
                    try:
                        c = p.cpu_times()
                        snap["pids"][p.pid] = c.user + c.system
                    except psutil.Error:
                        continue
            except psutil.Error as e:
                logger.debug("server process %s unavailable: %s", self.server_pid, e)
        return snap

    @staticmethod
    def delta(before: dict | None, after: dict | None, requests: int) -> dict:
        """BenchmarkResult fields: server/client/other CPU in % of one core, server CPU ms/request."""
        if not before or not after:
            return {}
        wall = max(after["time"] - before["time"], 1e-9)
        client = after["client"] - before["client"]
        out = {"client_cpu_percent": 100 * client / wall}
        if before["pids"] and after["pids"]:
            server = sum(v - before["pids"].get(pid, 0.0) for pid, v in after["pids"].items())
            other = max(0.0, (after["busy"] - before["busy"]) - server - client)
            out.update(
                server_cpu_percent=100 * server / wall,
                other_cpu_percent=100 * other / wall,
                server_cpu_ms_per_request=1e3 * server / requests if requests else None,
            )
        return out


def local_server_pid(url: str) -> int | None:
    """The pid listening on ``url``'s port when the server runs on this host (else None), so a
    benchmark of a local server measures its CPU without being told its pid."""
    import socket

    host, _, port = url.rpartition(":")
    host = host.strip("[]") or "localhost"
    if not port.isdigit():
        return None
    try:
        local = {"localhost", "0.0.0.0", "::", "::1", socket.gethostname()}
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        if host not in local and not any(a.startswith("127.") or a == "::1" for a in addresses):
            return None
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == int(port) and c.pid:
                return c.pid
    except (OSError, ImportError) as e:
        logger.debug("no local server pid for %s: %s", url, e)
    except Exception as e:  # psutil.AccessDenied where other users' sockets are hidden
        logger.debug("no local server pid for %s: %s", url, e)
    return None


def _monotonic() -> float:
    import time

    return time.monotonic()
