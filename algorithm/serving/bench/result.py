"""BenchmarkResult (one measured load point), ExtendedBenchmarkResult (the same with the GPU's
utilization, memory and power, guide 10.2) and the statistics they are built from.

Latencies in ms, throughput in requests/s. ``percentiles`` covers every measured request;
``is_stable`` is perf_analyzer's rule (the last 3 windows within ``stability_percent`` of their
mean, for throughput and P99); ``histogram`` keeps a log-binned latency histogram in the JSON.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BenchmarkResult:
    """One load point. Latencies in ms; throughput in requests/s (x batch_size = samples/s).

    total = successful + failed + rejected; timed-out requests are part of ``failed_requests``.
    """

    throughput: float
    latency_p50: float
    latency_p90: float
    latency_p95: float
    latency_p99: float
    latency_avg: float
    latency_min: float
    latency_max: float
    total_requests: int
    successful_requests: int
    failed_requests: int
    rejected_requests: int = 0
    timed_out_requests: int = 0
    model_name: str = ""
    url: str = ""
    protocol: str = "grpc"
    batch_size: int = 1
    seq_length: int | None = None  # fixed length; None with another distribution
    seq_len_distribution: str = "fixed"
    seq_len_mean: float = 0.0
    seq_len_max: int = 0
    mode: str = "concurrency"
    concurrency: int | None = None  # target in-flight requests (concurrency mode)
    achieved_concurrency: float = 0.0  # sum of latencies / duration (Little's law)
    request_rate: float | None = None  # target requests/s (request_rate mode)
    achieved_rate: float = 0.0  # requests sent / sending time
    duration_s: float = 0.0
    trials: int = 0
    stable: bool = False
    window_throughputs: list[float] = field(default_factory=list)
    window_p99s: list[float] = field(default_factory=list)
    # client side: what the load generator itself costs, so it is not read as server latency
    client_overhead_ms: float = 0.0  # build + serialize a request and deserialize its answer
    rpc_floor_ms: float = 0.0  # median round trip of a health RPC (network + RPC stack)
    client_cpu_percent: float = 0.0  # load generator process, % of one core
    # with a local server (server_pid): its process tree's CPU, and what everything else used
    server_cpu_percent: float | None = None  # % of one core
    server_cpu_ms_per_request: float | None = None  # CPU cost of a request, neighbours aside
    other_cpu_percent: float | None = None  # other processes on the host, % of one core
    # server side (Triton statistics deltas over the measured window)
    server: dict = field(
        default_factory=dict
    )  # queue/compute_input/compute_infer/compute_output/request _us
    batch_sizes_formed: dict = field(default_factory=dict)  # batch size -> executions
    host_cpu_utilization: float | None = None  # server metrics nv_cpu_utilization (0-1), mean
    host_load_average: float | None = None  # 1-minute load average when measuring began
    gpu_utilization: float | None = None  # mean over GPUs and samples (0-1); None without a GPU
    gpu_memory_used_mb: float | None = None  # peak over samples, summed over GPUs
    per_gpu: dict = field(default_factory=dict)  # {index: {"utilization", "memory_used_mb"}}
    errors: dict = field(default_factory=dict)  # first distinct error messages -> count
    # what the generated requests used and where it came from (served model config, the
    # BenchmarkConfig, or the default): codebook_sizes, seq_len_max, max_batch_size, source
    request_contract: dict = field(default_factory=dict)
    latency_histogram: dict = field(default_factory=dict)  # {"edges_ms": [...], "counts": [...]}
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # every measured success

    @property
    def load(self) -> float:
        """The load level: target concurrency, or target rate in request_rate mode."""
        return float(self.request_rate if self.mode == "request_rate" else self.concurrency or 0)

    @property
    def key(self) -> str:
        return result_key(
            self.batch_size, self.seq_length, self.seq_len_distribution, self.mode, self.load
        )

    def summary(self) -> str:
        load = (
            f"concurrency {self.concurrency} (achieved {self.achieved_concurrency:.1f})"
            if self.mode == "concurrency"
            else f"rate {self.request_rate:g}/s (achieved {self.achieved_rate:.1f}/s)"
        )
        seq = (
            self.seq_length
            if self.seq_length is not None
            else (
                f"{self.seq_len_distribution} (mean {self.seq_len_mean:.0f}, max {self.seq_len_max})"
            )
        )
        lines = [
            f"{self.model_name} @ {self.url} [{self.protocol}]: batch {self.batch_size}, seq_len {seq}, {load}",
            f"  throughput  {self.throughput:.1f} req/s ({self.throughput * self.batch_size:.1f} samples/s)",
            f"  latency ms  p50 {self.latency_p50:.2f}  p90 {self.latency_p90:.2f}  p95 {self.latency_p95:.2f}"
            f"  p99 {self.latency_p99:.2f}  avg {self.latency_avg:.2f}  min {self.latency_min:.2f}"
            f"  max {self.latency_max:.2f}",
            f"  requests    {self.total_requests} total, {self.successful_requests} ok, {self.failed_requests}"
            f" failed ({self.timed_out_requests} timed out), {self.rejected_requests} rejected",
            f"  measured    {self.duration_s:.1f} s in {self.trials} windows, "
            f"{'stable' if self.stable else 'NOT stable'}",
            f"  client      overhead {self.client_overhead_ms:.3f} ms/request, RPC floor "
            f"{self.rpc_floor_ms:.3f} ms, CPU {self.client_cpu_percent:.0f}% of a core",
        ]
        if self.server:
            s = self.server
            lines.append(
                f"  server us   queue {s.get('queue_us', 0):.0f}  input {s.get('compute_input_us', 0):.0f}"
                f"  infer {s.get('compute_infer_us', 0):.0f}  output {s.get('compute_output_us', 0):.0f}"
                f"  (request {s.get('request_us', 0):.0f}, avg batch {s.get('avg_batch', 0):.2f})"
            )
        if self.host_cpu_utilization is not None:
            lines.append(
                f"  host CPU    {self.host_cpu_utilization * 100:.0f}% busy (server metrics)"
            )
        if self.gpu_utilization is not None:
            lines.append(
                f"  gpu         util {self.gpu_utilization * 100:.0f}%  memory {self.gpu_memory_used_mb:.0f} MB"
            )
        return "\n".join(lines)

    def to_dict(self, latencies: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not latencies:
            d.pop("latencies_ms")
        d["key"] = self.key
        d["batch_sizes_formed"] = {str(k): v for k, v in self.batch_sizes_formed.items()}
        d["per_gpu"] = {str(k): v for k, v in self.per_gpu.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict) -> BenchmarkResult:
        """The result a ``to_dict`` wrote; an ExtendedBenchmarkResult where the data has its
        GPU fields (whichever class it is called on)."""
        if cls is BenchmarkResult and "gpu_utilization_avg" in data:
            cls = ExtendedBenchmarkResult
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in data.items() if k in names}
        d["batch_sizes_formed"] = {int(k): v for k, v in d.get("batch_sizes_formed", {}).items()}
        d["per_gpu"] = {int(k): v for k, v in d.get("per_gpu", {}).items()}
        return cls(**d)


@dataclass
class ExtendedBenchmarkResult(BenchmarkResult):
    """A BenchmarkResult with what the GPUs did while it was measured (guide 10.2).

    None where nothing was measured (no GPU, no NVML/nvidia-smi, a server whose metrics have no
    GPU series); ``gpu_monitor_note`` then says why. Per-GPU lists follow ``gpu_indices``.
    """

    gpu_memory_peak_mb: float | None = None  # largest memory in use, summed over GPUs (MiB)
    gpu_utilization_avg: float | None = None  # percent (0-100), mean over GPUs and samples
    power_consumption_avg_w: float | None = None  # mean power drawn, summed over GPUs (W)
    energy_j: float | None = None  # that power integrated over the measured window (J)
    gpu_indices: list[int] = field(default_factory=list)
    gpu_names: list[str] = field(default_factory=list)
    gpu_memory_peak_mb_per_gpu: list = field(default_factory=list)
    gpu_utilization_avg_per_gpu: list = field(default_factory=list)
    power_consumption_avg_w_per_gpu: list = field(default_factory=list)
    gpu_samples: int = 0
    gpu_monitor: str = ""  # where the numbers come from: nvml, nvidia-smi, metrics <url>
    gpu_monitor_note: str = ""  # why the GPU fields are None

    @classmethod
    def extend(cls, result: BenchmarkResult, gpu: dict) -> ExtendedBenchmarkResult:
        """``result`` with the GPU fields of ``gpu`` (``GPUMonitor.summary()``)."""
        base = {f.name: getattr(result, f.name) for f in dataclasses.fields(BenchmarkResult)}
        return cls(**base, **gpu)

    @property
    def energy_per_request_j(self) -> float | None:
        if self.energy_j is None or not self.successful_requests:
            return None
        return self.energy_j / self.successful_requests

    def summary(self) -> str:
        lines = [super().summary()]
        if self.gpu_utilization_avg is None and self.gpu_memory_peak_mb is None:
            lines.append(f"  gpu         not measured: {self.gpu_monitor_note or 'no GPU'}")
            return "\n".join(lines)
        parts = [f"util {_num(self.gpu_utilization_avg, '.0f')}%"]
        parts.append(f"memory peak {_num(self.gpu_memory_peak_mb, '.0f')} MB")
        parts.append(f"power {_num(self.power_consumption_avg_w, '.0f')} W")
        if self.energy_per_request_j is not None:
            parts.append(f"{self.energy_per_request_j * 1e3:.1f} mJ/request")
        lines.append(
            f"  gpu         {', '.join(parts)} ({len(self.gpu_indices)} GPU(s), {self.gpu_monitor})"
        )
        return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def result_key(batch_size: int, seq_length, distribution: str, mode: str, load: float) -> str:
    seq = f"seq{seq_length}" if seq_length is not None else distribution
    lvl = f"c{int(load)}" if mode == "concurrency" else f"r{load:g}"
    return f"bs{batch_size}_{seq}_{lvl}"


# --------------------------------------------------------------------------------- statistics
def percentiles(lat_ms: np.ndarray) -> dict[str, float]:
    if not len(lat_ms):
        return {k: float("nan") for k in ("p50", "p90", "p95", "p99", "avg", "min", "max")}
    p50, p90, p95, p99 = np.percentile(lat_ms, [50, 90, 95, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "avg": float(lat_ms.mean()),
        "min": float(lat_ms.min()),
        "max": float(lat_ms.max()),
    }


def is_stable(throughputs: list[float], p99s: list[float], percent: float, count: int = 3) -> bool:
    """perf_analyzer's rule: the last ``count`` windows each within ``percent`` of their mean."""
    if len(throughputs) < count:
        return False
    for values in (throughputs[-count:], p99s[-count:]):
        arr = np.asarray(values, dtype=float)
        mean = arr.mean()
        if (
            not np.isfinite(arr).all()
            or mean <= 0
            or np.abs(arr - mean).max() > mean * percent / 100
        ):
            return False
    return True


def histogram(lat_ms: np.ndarray, bins: int = 40) -> dict:
    if not len(lat_ms):
        return {"edges_ms": [], "counts": []}
    lo, hi = max(float(lat_ms.min()), 1e-3), max(float(lat_ms.max()), 1e-3)
    edges = (
        np.geomspace(lo, hi * 1.0001, bins + 1)
        if hi > lo * 1.01
        else np.linspace(lo * 0.99, hi * 1.01, bins + 1)
    )
    counts, edges = np.histogram(lat_ms, edges)
    return {"edges_ms": [float(e) for e in edges], "counts": [int(c) for c in counts]}


BREAKDOWN = (
    ("queue_us", "queue"),
    ("compute_input_us", "compute input"),
    ("compute_infer_us", "compute infer"),
    ("compute_output_us", "compute output"),
)


# ---------------------------------------------------------------------------------- analysis
def group_key(r: BenchmarkResult) -> tuple:
    return (
        r.batch_size,
        r.seq_length if r.seq_length is not None else r.seq_len_distribution,
        r.mode,
    )


def group_label(g: tuple) -> str:
    return f"batch {g[0]}, seq_len {g[1]}"


def groups(results: dict[str, BenchmarkResult]) -> dict[tuple, list[BenchmarkResult]]:
    """Results by (batch, seq_len, mode), each list sorted by load."""
    out: dict[tuple, list[BenchmarkResult]] = defaultdict(list)
    for r in results.values():
        out[group_key(r)].append(r)
    return {g: sorted(rs, key=lambda r: r.load) for g, rs in sorted(out.items(), key=_group_order)}


def _group_order(item) -> tuple:
    """Numeric order (batch 8 before batch 16); named distributions after fixed lengths."""
    (batch, seq, mode), _ = item
    return (batch, (0, seq, "") if isinstance(seq, (int, float)) else (1, 0, str(seq)), mode)
