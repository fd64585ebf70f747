"""The search: which serving settings to measure, in what order, and which one wins.

A coordinate search from the model's current settings, one setting at a time in the order of
``DIMENSIONS`` (instances first, then the runtime's threads, batching, queue delay, the GPU
engine's batching mode and pipeline depth, the queue policy), each step keeping the best value
found so far for the others. Ordered settings (instances, threads, max batch size, queue delay) are climbed from the
current value: upwards while a step is not clearly worse than the one before it (a step that
breaks the P99 budget after one that met it is clearly worse, so a direction stops there), and
downwards only when going up found nothing better. Categorical settings (preferred batch sizes,
batching mode, queue policy) are each measured. A settings point already measured is never
measured twice.

Judging (``Judge``): a load point meets the budget when its P99 is within it, no request failed
and at most ``max_rejected_percent`` were rejected; a candidate's throughput is the highest of
its points that meet the budget. The winner is the candidate with the highest such throughput;
when none meets the budget there is no winner and ``best_p99`` says how close it came.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from algorithm.errors import ConfigError
from algorithm.serving.bench.result import BenchmarkResult
from algorithm.serving.config import TUNE_SETTINGS
from algorithm.serving.tuning.settings import GPU_BATCHINGS, ServingSettings

logger = logging.getLogger(__name__)

DIMENSIONS = TUNE_SETTINGS  # the order of the search
ORDERED = ("instance_count", "runtime_threads", "max_batch_size", "max_queue_delay_us")
QUEUE_DELAYS_US = (0, 100, 500, 1000, 2000, 5000, 10000)


# ------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One measured settings point: a result per load level (ascending), or the error that
    stopped it (a config the server refused to load, a model that failed under load)."""

    settings: ServingSettings
    step: str  # "baseline", or the setting whose value it tried
    results: list[BenchmarkResult] = field(default_factory=list)
    error: str | None = None
    skipped_levels: list[float] = field(default_factory=list)  # above a level past the budget
    seconds: float = 0.0
    reused: bool = False  # read from an earlier run's stored points

    def to_dict(self) -> dict:
        return {
            "settings": self.settings.to_dict(),
            "label": self.settings.label,
            "step": self.step,
            "results": [r.to_dict() for r in self.results],
            "error": self.error,
            "skipped_levels": list(self.skipped_levels),
            "seconds": round(self.seconds, 2),
            "reused": self.reused,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(
            settings=ServingSettings.from_dict(data["settings"]),
            step=data.get("step", ""),
            results=[BenchmarkResult.from_dict(r) for r in data.get("results", [])],
            error=data.get("error"),
            skipped_levels=list(data.get("skipped_levels", [])),
            seconds=float(data.get("seconds", 0.0)),
        )


@dataclass(frozen=True)
class Judge:
    """The P99 budget and what else a load point must do to meet it."""

    slo_p99_ms: float
    max_rejected_percent: float = 0.0

    def point_ok(self, r: BenchmarkResult) -> bool:
        if not r.successful_requests or r.failed_requests or not math.isfinite(r.latency_p99):
            return False
        rejected = 100.0 * r.rejected_requests / max(r.total_requests, 1)
        return r.latency_p99 <= self.slo_p99_ms and rejected <= self.max_rejected_percent

    def throughput(self, c: Candidate) -> float | None:
        """The highest throughput among the candidate's points within the budget (None: none)."""
        ok = [r.throughput for r in c.results if self.point_ok(r)]
        return max(ok) if ok else None

    def best_point(self, c: Candidate) -> BenchmarkResult | None:
        ok = [r for r in c.results if self.point_ok(r)]
        return max(ok, key=lambda r: r.throughput) if ok else None

    def best_p99(self, c: Candidate) -> float | None:
        p99 = [r.latency_p99 for r in c.results if r.successful_requests]
        p99 = [p for p in p99 if math.isfinite(p)]
        return min(p99) if p99 else None

    def score(self, c: Candidate) -> tuple[int, float]:
        """Orders candidates: within the budget by throughput, above all that are not; those by
        their best P99 (lower is better); errors last."""
        thr = self.throughput(c)
        if thr is not None:
            return (2, thr)
        p99 = self.best_p99(c)
        return (1, -p99) if p99 is not None else (0, 0.0)

    def clearly_worse(self, a: Candidate, b: Candidate, tolerance_percent: float) -> bool:
        """``a`` is worse than ``b`` by more than the measurement noise (``tolerance_percent``)."""
        sa, sb = self.score(a), self.score(b)
        if sa[0] != sb[0]:
            return sa[0] < sb[0]
        if sa[0] == 2:
            return sa[1] < sb[1] * (1 - tolerance_percent / 100)
        if sa[0] == 1:  # both past the budget: compare their P99 (stored negated)
            return -sa[1] > -sb[1] * (1 + tolerance_percent / 100)
        return False


# ------------------------------------------------------------------------------ the space
def _get(s: ServingSettings, dim: str):
    if dim == "queue_policy":
        return (s.max_queue_size, s.queue_timeout_us)
    return getattr(s, dim)


def _with(s: ServingSettings, dim: str, value) -> ServingSettings:
    if dim == "queue_policy":
        new = s.replace(max_queue_size=value[0], queue_timeout_us=value[1])
    else:
        new = s.replace(**{dim: value})
    if new.preferred_batch_sizes:
        # preferred sizes above the max batch mean nothing (apply_settings drops them too):
        # without them two candidates that serve alike are one candidate, measured once
        pref = tuple(sorted({b for b in new.preferred_batch_sizes if b <= new.max_batch_size}))
        new = new.replace(preferred_batch_sizes=pref)
    return new


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out


def candidate_values(
    base: ServingSettings,
    config,
    slo_p99_ms: float,
    gpu: bool = False,
    max_batch_limit: int | None = None,
    cpu_count: int | None = None,
) -> dict[str, list]:
    """The values each setting is searched over (``config`` a TuneConfig): what the user listed,
    else a default from the model's current settings and the machine. The current value is
    always one of them; settings the model does not have get none."""
    cpus = cpu_count or os.cpu_count() or 1
    limit = max_batch_limit or base.max_batch_size
    wanted = set(config.settings)
    values: dict[str, list] = {}

    def put(dim: str, given, default, ordered: bool):
        if dim not in wanted:
            return
        vals = list(given) if given else list(default)
        current = _get(base, dim)
        if current not in vals:
            vals.append(current)
        vals = list(dict.fromkeys(vals))  # de-duplicated, first occurrence kept
        values[dim] = sorted(vals) if ordered else vals

    top_instances = 4 if gpu else max(2, min(2 * cpus, 8))
    put("instance_count", config.instance_counts, range(1, top_instances + 1), True)
    if base.runtime_threads is not None:
        put("runtime_threads", config.runtime_threads, range(1, cpus + 1), True)
    bad = [b for b in config.max_batch_sizes if b > limit]
    if bad:
        raise ConfigError(
            "max_batch_sizes",
            config.max_batch_sizes,
            f"sizes <= {limit}, the model's largest batch",
        )
    put("max_batch_size", config.max_batch_sizes, _powers_of_two(8, limit), True)
    if base.preferred_batch_sizes is not None or config.preferred_batch_sizes:
        top = base.max_batch_size
        default = [(), tuple(_powers_of_two(2, top))] if top >= 2 else [()]
        put("preferred_batch_sizes", config.preferred_batch_sizes, default, False)
    if base.preferred_batch_sizes is not None:
        cap = slo_p99_ms * 1000 / 4  # waiting longer than a quarter of the budget cannot pay
        put(
            "max_queue_delay_us",
            config.max_queue_delays_us,
            [d for d in QUEUE_DELAYS_US if d <= cap],
            True,
        )
    if base.gpu_batching is not None:
        put("gpu_batching", config.gpu_batchings, GPU_BATCHINGS, False)
    if base.pipeline_depth is not None and gpu:
        put("pipeline_depth", config.pipeline_depths, (0, 2), False)
    if base.preferred_batch_sizes is not None and (
        config.queue_policies or config.max_rejected_percent > 0
    ):
        # Rejecting requests that wait past half the budget keeps the P99 of the rest; a bounded
        # queue (2 full batches per instance) also turns a burst away at once.
        timeout = int(slo_p99_ms * 1000 / 2)
        size = 2 * base.max_batch_size * base.instance_count
        put("queue_policy", config.queue_policies, [(0, 0), (0, timeout), (size, timeout)], False)
    return {d: values[d] for d in DIMENSIONS if d in values and len(values[d]) > 1}


# ------------------------------------------------------------------------------ the search
class OutOfTime(Exception):
    """The time budget does not hold another candidate."""


MeasureFn = Callable[[ServingSettings, str], Candidate]


class CoordinateSearch:
    """Runs the search over ``values`` from ``base``; ``measure(settings, step)`` measures one
    candidate; ``has_time()`` says whether the budget holds one more."""

    def __init__(
        self,
        base: ServingSettings,
        values: dict[str, list],
        judge: Judge,
        measure: MeasureFn,
        tolerance_percent: float = 5.0,
        has_time: Callable[[], bool] = lambda: True,
    ):
        self.base, self.values, self.judge = base, values, judge
        self.measure, self.tolerance, self.has_time = measure, tolerance_percent, has_time
        self.seen: dict[str, Candidate] = {}
        self.order: list[Candidate] = []
        self.stopped: str | None = None

    def _try(self, settings: ServingSettings, step: str) -> Candidate:
        found = self.seen.get(settings.key)
        if found is not None:
            return found
        if self.order and not self.has_time():
            raise OutOfTime
        c = self.measure(settings, step)
        self.seen[settings.key] = c
        self.order.append(c)
        return c

    def run(self) -> list[Candidate]:
        """Every candidate measured, in order (the first is the baseline)."""
        best = self._try(self.base, "baseline")
        try:
            for dim, vals in self.values.items():
                best = self._search(dim, vals, best)
        except OutOfTime:
            self.stopped = "time budget"
            logger.info("time budget reached after %d candidates", len(self.order))
        return self.order

    def _search(self, dim: str, vals: list, best: Candidate) -> Candidate:
        if dim in ORDERED:
            tried = self._climb(dim, vals, best)
        else:
            tried = [best] + [self._try(_with(best.settings, dim, v), dim) for v in vals]
        top = max(tried, key=self.judge.score)
        # a tie keeps what was there: noise is no reason to change a setting
        return best if self.judge.score(top) <= self.judge.score(best) else top

    def _climb(self, dim: str, vals: list, start: Candidate) -> list[Candidate]:
        i0 = vals.index(_get(start.settings, dim))
        tried = [start]
        improved = False
        for direction in (1, -1):
            if direction == -1 and improved:
                break  # one side got better: the other side of the optimum is not worth a look
            prev, i = start, i0 + direction
            while 0 <= i < len(vals):
                c = self._try(_with(start.settings, dim, vals[i]), dim)
                tried.append(c)
                if self.judge.score(c) > self.judge.score(start):
                    improved = True
                if self.judge.clearly_worse(c, prev, self.tolerance):
                    break  # past the budget or past the optimum in this direction
                prev, i = c, i + direction
        return tried


def winner(candidates: list[Candidate], judge: Judge) -> Candidate | None:
    """The candidate with the highest throughput within the budget (the earliest on a tie)."""
    ok = [c for c in candidates if judge.throughput(c) is not None]
    return max(ok, key=judge.throughput) if ok else None


def closest(candidates: list[Candidate], judge: Judge) -> Candidate | None:
    """When none met the budget: the candidate whose P99 came nearest to it."""
    measured = [c for c in candidates if judge.best_p99(c) is not None]
    return min(measured, key=judge.best_p99) if measured else None


__all__ = [
    "DIMENSIONS",
    "Candidate",
    "CoordinateSearch",
    "Judge",
    "OutOfTime",
    "candidate_values",
    "closest",
    "winner",
]
