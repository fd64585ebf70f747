"""Load a live Triton server and measure it: TritonBenchmark, BenchmarkResult, run_benchmark.

The load generator is one asyncio loop over the asynchronous tritonclient (gRPC by default):
``concurrency`` mode keeps exactly N requests in flight (closed loop), ``request_rate`` mode
sends Poisson arrivals at a target rate (open loop), never a thread per request. Histories
hold valid ids drawn from the codebooks, with lengths from the configured distribution.

Warm-up is excluded and drained before measuring. Measurement runs in windows of
``measurement_window_s`` until at least ``num_requests`` were measured and either the last 3
windows agree on throughput and P99 within ``stability_percent`` (as perf_analyzer) or
``max_trials`` windows have run (then ``stable`` is False): ``num_requests`` is a floor, so a
large one on a slow server runs for ``num_requests / throughput`` seconds. Every measured request is counted as
successful, failed (timed-out ones included) or rejected by the server's queue policy;
percentiles are over every measured request. The server-side breakdown is the delta of Triton's
statistics API over the measured window.

Requests follow the served model's contract: the codebooks, the longest history and the largest
batch come from its config on the server (``config.pbtxt``) wherever the BenchmarkConfig leaves
them unset, and a setting the model would reject is refused before anything is sent (the
result's ``request_contract`` says what was used and where it came from).
``GPUMonitoredBenchmark`` adds the GPUs' utilization, memory and power (guide 10.2).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from algorithm.errors import BenchmarkError, ConfigError
from algorithm.serving.bench.gpu_monitor import GPUMonitor
from algorithm.serving.bench.loadgen import (  # noqa: F401  (re-exported: the load generator's public helpers)
    FAILED,
    OK,
    REJECTED,
    TIMED_OUT,
    Client,
    Records,
    classify_error,
    load_histogram,
    make_requests,
    request_contract,
    sample_seq_lengths,
    served_contract,
)
from algorithm.serving.bench.monitor import (
    HostCpu,
    ResourceMonitor,
    local_server_pid,
    server_breakdown,
    stats_snapshot,
)
from algorithm.serving.bench.result import (  # noqa: F401  (BenchmarkResult is public here, as in the guide)
    BenchmarkResult,
    ExtendedBenchmarkResult,
    histogram,
    is_stable,
    percentiles,
)
from algorithm.serving.config import BenchmarkConfig

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict], None]


# ---------------------------------------------------------------------------------- benchmark
class TritonBenchmark:
    """Measures one model on a live Triton server (guide 3.5).

    ``progress(event, info)`` receives "window" events (each measurement window), a "sweep"
    event before a sweep (its plan: points, at least how many seconds) and "point" events (each
    finished load point, with the time left); the library itself never prints. A server on this
    host has its CPU use measured (found by the port of the URL) unless ``server_pid`` names it.
    """

    def __init__(
        self,
        config: BenchmarkConfig | None = None,
        progress: ProgressFn | None = None,
        server_pid: int | None = None,
    ):
        self.config = (config or BenchmarkConfig()).validate()
        self.progress = progress
        self.server_pid = server_pid  # a local tritonserver: its CPU use is measured too

    def _emit(self, event: str, **info):
        if self.progress is not None:
            self.progress(event, info)

    # -- guide API ---------------------------------------------------------------------------
    def run(
        self,
        triton_url: str | None = None,
        model_name: str = "ugt_recommend",
        batch_size: int = 1,
        seq_length: int | None = 100,
        *,
        concurrency: int | None = None,
        request_rate: float | None = None,
    ) -> BenchmarkResult:
        """Warm up, then measure one load point. ``seq_length`` is used by the fixed distribution."""
        cfg = self.config
        url = triton_url or cfg.triton_url
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "an integer >= 1")
        if cfg.seq_len_distribution == "fixed" and (
            not isinstance(seq_length, int) or seq_length < 1
        ):
            raise ConfigError(
                "seq_length", seq_length, "an integer >= 1 with the fixed distribution"
            )
        mode = cfg.mode
        if mode == "request_rate":
            rate = float(request_rate if request_rate is not None else cfg.request_rates[0])
            if rate <= 0:
                raise ConfigError("request_rate", rate, "a positive number of requests/s")
            level = None
        else:
            level = int(concurrency if concurrency is not None else cfg.levels[0])
            if level < 1:
                raise ConfigError("concurrency", level, "an integer >= 1")
            rate = None
        seq_fixed = seq_length if cfg.seq_len_distribution == "fixed" else None
        try:
            return _run_coroutine(self._run(url, model_name, batch_size, seq_fixed, level, rate))
        except (BenchmarkError, ConfigError):
            raise
        except Exception as e:  # an unexpected client failure still names the server
            raise BenchmarkError(
                f"benchmark of {model_name!r} at {url} failed: {type(e).__name__}: {e}"
            ) from e

    def plan_sweep(self, batch_sizes=None, seq_lengths=None, levels=None) -> dict:
        """The points a sweep will measure and how long it takes at least, before it starts.

        Each point warms up, then measures windows of ``measurement_window_s`` until at least
        ``num_requests`` are measured and the last 3 windows agree (or ``max_trials`` windows ran),
        so a point takes at least min(3, max_trials) windows, and ``num_requests / throughput``
        when that is longer: the sweep's lower bound is the first; ``run_sweep`` refines it with
        each point it measures."""
        cfg = self.config
        batch_sizes = tuple(batch_sizes or cfg.test_batch_sizes)
        seq_lengths = (
            tuple(seq_lengths or cfg.test_seq_lengths)
            if cfg.seq_len_distribution == "fixed"
            else (None,)
        )
        levels = tuple(levels or cfg.levels)
        points = [(b, s, lv) for b in batch_sizes for s in seq_lengths for lv in levels]
        per_point = min(3, cfg.max_trials) * cfg.measurement_window_s
        return {
            "points": points,
            "shape": f"{len(batch_sizes)} batch sizes x {len(seq_lengths)} seq_lens x "
            f"{len(levels)} {'rates' if cfg.mode == 'request_rate' else 'concurrency levels'}",
            "min_seconds": len(points) * per_point,
            "requests_per_point": cfg.num_requests,
        }

    def run_sweep(
        self,
        triton_url: str | None = None,
        model_name: str = "ugt_recommend",
        *,
        batch_sizes=None,
        seq_lengths=None,
        levels=None,
        progress: ProgressFn | None = None,
    ) -> dict[str, BenchmarkResult]:
        """Every batch size x seq_len x load level (concurrency or rate); keys from result.result_key().

        Before it starts, the plan (``plan_sweep``) is logged and sent as a "sweep" event; after
        each point, a "point" event carries ``done``, ``total``, ``elapsed_s`` and ``eta_s`` (the
        mean point time so far x the points left). ``progress`` (or the constructor's) receives
        them. A failure keeps the points already measured on the error (``.results``).
        """
        cfg = self.config
        plan = self.plan_sweep(batch_sizes, seq_lengths, levels)
        points = plan["points"]
        notify = progress or self.progress
        logger.log(
            logging.WARNING if plan["min_seconds"] > 600 else logging.INFO,
            "benchmark sweep of %s on %s: %d points (%s), each >= %d requests; at least %.0f s",
            model_name,
            triton_url or cfg.triton_url,
            len(points),
            plan["shape"],
            cfg.num_requests,
            plan["min_seconds"],
        )
        if notify is not None:
            notify("sweep", {"model": model_name, **plan, "total": len(points)})
        results: dict[str, BenchmarkResult] = {}
        t0 = time.monotonic()
        for i, (b, s, lv) in enumerate(points):
            kw = {"request_rate": lv} if cfg.mode == "request_rate" else {"concurrency": int(lv)}
            try:
                r = self.run(triton_url, model_name, b, s, **kw)
            except BenchmarkError as e:
                e.results = dict(results)  # what was measured before the failure
                raise
            results[r.key] = r
            elapsed = time.monotonic() - t0
            eta = elapsed / (i + 1) * (len(points) - i - 1)
            logger.info(
                "point %d/%d %s: %.1f req/s, p99 %.2f ms; about %.0f s left",
                i + 1,
                len(points),
                r.key,
                r.throughput,
                r.latency_p99,
                eta,
            )
            info = {
                "model": model_name,
                "key": r.key,
                "done": i + 1,
                "total": len(points),
                "result": r,
                "elapsed_s": elapsed,
                "eta_s": eta,
            }
            if notify is not None:
                notify("point", info)
        return results

    def generate_report(
        self, results: dict[str, BenchmarkResult], path, baseline=None, **kw
    ) -> str:
        """Markdown report at ``path`` plus .json, .csv and PNG plots beside it; returns the text."""
        from algorithm.serving.bench.report import write_report

        return write_report(results, path, baseline=baseline, config=self.config, **kw)

    # -- the measurement -----------------------------------------------------------------------
    async def _run(self, url, model, batch_size, seq_fixed, level, rate) -> BenchmarkResult:
        cfg = self.config
        client = Client(url, cfg.protocol, level or 64, cfg.timeout_s, cfg)
        try:
            await self._check_server(client, model, url)
            # The requests follow the served model's own contract where the config is silent.
            contract = request_contract(
                cfg,
                served_contract(await client.model_config(model)),
                batch_size,
                seq_fixed,
                repr(model),
            )
            logger.info(
                "%s: codebooks %s (%s), longest history %d (%s)",
                model,
                contract["codebook_sizes"],
                contract["source"]["codebook_sizes"],
                contract["seq_len_max"],
                contract["source"]["seq_len_max"],
            )
            rng = np.random.default_rng(cfg.seed)
            pool_rows = batch_size * (16 if cfg.seq_len_distribution == "fixed" else 256)
            lengths = sample_seq_lengths(
                cfg.replace(seq_len_max=contract["seq_len_max"]), pool_rows, rng, fixed=seq_fixed
            )
            pool_arrays = make_requests(
                batch_size, lengths, contract["codebook_sizes"], rng, cfg.user_ids
            )
            pool = [client.inputs(a) for a in pool_arrays]
            rpc_floor = await self._rpc_floor(client)
            first = await self._warmup(client, model, pool, level or 2, batch_size, url)
            overhead = self._client_overhead(client, model, pool_arrays[0], first)
            before = stats_snapshot(await client.statistics(model), model)
            load_avg = _load_average()
            monitor = ResourceMonitor(cfg.metrics_url)
            monitor.start()
            host = HostCpu(self.server_pid or local_server_pid(url))
            cpu_before = host.snapshot()
            try:
                rec, t0, t_stop, windows, aborted = await self._measure(
                    client, model, pool, level, rate, url
                )
            finally:
                samples = await monitor.stop()
            cpu_after = host.snapshot()
            after = None if aborted else stats_snapshot(await client.statistics(model), model)
        finally:
            await client.close()
        result = self._result(
            rec, t0, t_stop, windows, model, url, batch_size, seq_fixed, lengths, level, rate
        )
        result.client_overhead_ms, result.rpc_floor_ms, result.host_load_average = (
            overhead,
            rpc_floor,
            load_avg,
        )
        result.request_contract = contract
        for k, v in HostCpu.delta(cpu_before, cpu_after, result.successful_requests).items():
            setattr(result, k, v)
        if after is not None and after["success"][0] >= before["success"][0]:
            result.server, result.batch_sizes_formed = server_breakdown(before, after)
        for k, v in samples.items():
            setattr(result, k, v)
        if aborted:
            err = BenchmarkError(
                f"every request to {model!r} at {url} in the last {self.config.measurement_window_s:g} s "
                f"window failed ({windows[-1]['completed']} requests): {next(iter(rec.errors), 'no answer')}",
                hint="The server stopped or the model failed; read its log. Nothing was dropped: "
                "the partial result is on this error (.result).",
            )
            err.result = result
            raise err
        if result.successful_requests == 0:
            err = BenchmarkError(
                f"no request to {model!r} at {url} succeeded ({result.total_requests} sent): "
                f"{next(iter(result.errors), 'no answer')}"
            )
            err.result = result
            raise err
        return result

    async def _check_server(self, client: Client, model: str, url: str):
        try:
            live = await client.call("is_server_live")
        except Exception as e:
            raise BenchmarkError(
                f"Triton server at {url} ({client.protocol}) is not reachable: {type(e).__name__}: {e}",
                hint="Start the server or pass the right --url/--protocol; "
                "the gRPC port is usually 8001, HTTP 8000.",
            ) from e
        if not live:
            raise BenchmarkError(f"Triton server at {url} is not live")
        try:
            ready = await client.call("is_model_ready", model)
        except Exception as e:
            raise BenchmarkError(f"cannot ask {url} whether model {model!r} is ready: {e}") from e
        if not ready:
            raise BenchmarkError(
                f"model {model!r} is not ready on the Triton server at {url}",
                hint="Check the model name (`curl <http-url>/v2/models/<name>/ready`) and the server log.",
            )

    async def _rpc_floor(self, client: Client, n: int = 20) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await client.call("is_server_live")
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e3)

    async def _warmup(self, client, model, pool, concurrency, batch_size, url):
        """num_warmup_requests (at least one, to check the answer's shape), then drain."""
        n = max(1, self.config.num_warmup_requests)
        counter = iter(range(n))
        first: list = []
        errors: list[BaseException] = []

        async def worker():
            for i in counter:
                try:
                    res = await client.infer(model, pool[i % len(pool)])
                    if not first:
                        first.append(res)
                except Exception as e:  # counted below; warm-up results are not measured
                    errors.append(e)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        if not first:
            raise BenchmarkError(f"every warm-up request to {model!r} at {url} failed: {errors[0]}")
        try:
            recs = first[0].as_numpy("recommendations")
            scores = first[0].as_numpy("scores")
        except Exception as e:
            raise BenchmarkError(
                f"model {model!r} at {url} answered without readable outputs: {e}"
            ) from e
        if (
            recs is None
            or scores is None
            or recs.ndim != 3
            or recs.shape[0] != batch_size
            or recs.shape[2] != 3
            or scores.shape != recs.shape[:2]
        ):
            raise BenchmarkError(
                f"model {model!r} at {url} answered shapes recommendations "
                f"{None if recs is None else recs.shape}, scores {None if scores is None else scores.shape}; "
                f"expected [{batch_size}, K, 3] and [{batch_size}, K]"
            )
        if errors:
            logger.warning("%d of %d warm-up requests failed: %s", len(errors), n, errors[0])
        return first[0]

    def _client_overhead(
        self, client: Client, model: str, arrays: dict, response, n: int = 30
    ) -> float:
        """Median cost of building + serializing one request and reading its answer (ms)."""
        build = None
        if client.protocol == "grpc":
            try:
                from tritonclient.grpc._utils import _get_inference_request

                def build(inputs):
                    return _get_inference_request(
                        model_name=model,
                        inputs=inputs,
                        model_version="",
                        request_id="",
                        outputs=None,
                        sequence_id=0,
                        sequence_start=False,
                        sequence_end=False,
                        priority=0,
                        timeout=None,
                        parameters=None,
                    ).SerializeToString()
            except (ImportError, TypeError):  # private helper moved: time InferInput only
                build = None
        times = []
        for _ in range(n):
            t = time.perf_counter()
            inputs = client.inputs(arrays)
            if build is not None:
                build(inputs)
            response.as_numpy("recommendations")
            response.as_numpy("scores")
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e3)

    async def _measure(self, client, model, pool, level, rate, url):
        cfg = self.config
        rec = Records()
        stop = asyncio.Event()
        clock = time.perf_counter
        t0 = clock()
        pending: set[asyncio.Task] = set()
        counter = [0]

        async def one(inputs) -> int:
            t = clock()
            try:
                await client.infer(model, inputs)
                rec.add(t, clock(), OK)
                return OK
            except Exception as e:  # every failure is counted, by kind
                outcome = classify_error(e)
                rec.add(t, clock(), outcome, e)
                return outcome

        async def closed_loop():
            while not stop.is_set():
                i = counter[0]
                counter[0] += 1
                if await one(pool[i % len(pool)]) == FAILED:
                    await asyncio.sleep(0.005)  # a dead server fails at once: don't spin

        async def open_loop():
            gen = np.random.default_rng(cfg.seed + 1)
            next_t = t0
            i = 0
            while not stop.is_set():
                next_t += gen.exponential(1.0 / rate)
                delay = next_t - clock()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                task = asyncio.ensure_future(one(pool[i % len(pool)]))
                i += 1
                pending.add(task)
                task.add_done_callback(pending.discard)

        workers = (
            [asyncio.ensure_future(closed_loop()) for _ in range(level)]
            if rate is None
            else [asyncio.ensure_future(open_loop())]
        )
        windows: list[dict] = []
        try:
            w_start = t0
            while True:
                await asyncio.sleep(max(0.0, w_start + cfg.measurement_window_s - clock()))
                w_end = clock()
                win = self._window(rec, w_start, w_end)
                windows.append(win)
                measured = len(rec.outcome)
                stable = is_stable(
                    [w["throughput"] for w in windows],
                    [w["p99"] for w in windows],
                    cfg.stability_percent,
                )
                self._emit(
                    "window",
                    model=model,
                    trial=len(windows),
                    max_trials=cfg.max_trials,
                    stable=stable,
                    measured=measured,
                    **win,
                )
                if win["completed"] and win["ok"] == 0 and win["rejected"] < win["completed"]:
                    stop.set()
                    break
                if measured >= cfg.num_requests and (stable or len(windows) >= cfg.max_trials):
                    break
                w_start = w_end
        finally:
            stop.set()
            t_stop = clock()
            # in-flight requests finish or time out (bounded by timeout_s); none is dropped
            await asyncio.gather(*workers, *list(pending), return_exceptions=True)
        last = windows[-1] if windows else {}
        aborted = (
            bool(last.get("completed")) and last["ok"] == 0 and last["rejected"] < last["completed"]
        )
        return rec, t0, t_stop, windows, aborted

    def _window(self, rec: Records, start: float, end: float) -> dict:
        n = len(rec.outcome)  # workers append concurrently: read a consistent prefix
        sent, done, outcome = (
            np.asarray(rec.sent[:n]),
            np.asarray(rec.done[:n]),
            np.asarray(rec.outcome[:n], dtype=np.int64),
        )
        sel = (done >= start) & (done < end)
        ok = sel & (outcome == OK)
        lat = (done[ok] - sent[ok]) * 1e3
        dur = max(end - start, 1e-9)
        return {
            "start": start,
            "end": end,
            "completed": int(sel.sum()),
            "ok": int(ok.sum()),
            "rejected": int((sel & (outcome == REJECTED)).sum()),
            "throughput": float(ok.sum() / dur),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        }

    def _result(
        self, rec, t0, t_stop, windows, model, url, batch_size, seq_fixed, lengths, level, rate
    ):
        cfg = self.config
        sent, done, outcome = rec.arrays()
        if len(sent):
            ok = outcome == OK
            lat = (done[ok] - sent[ok]) * 1e3
            t_end = float(done.max())
        else:
            ok, lat, t_end = np.zeros(0, bool), np.zeros(0), t_stop
        duration = max(t_end - t0, 1e-9)
        pct = percentiles(lat)
        all_lat = (done - sent).sum() if len(sent) else 0.0
        throughputs = [w["throughput"] for w in windows]
        p99s = [w["p99"] for w in windows]
        return BenchmarkResult(
            throughput=float(ok.sum() / duration) if len(sent) else 0.0,
            latency_p50=pct["p50"],
            latency_p90=pct["p90"],
            latency_p95=pct["p95"],
            latency_p99=pct["p99"],
            latency_avg=pct["avg"],
            latency_min=pct["min"],
            latency_max=pct["max"],
            total_requests=int(len(outcome)),
            successful_requests=int(ok.sum()),
            failed_requests=int(((outcome == FAILED) | (outcome == TIMED_OUT)).sum()),
            rejected_requests=int((outcome == REJECTED).sum()),
            timed_out_requests=int((outcome == TIMED_OUT).sum()),
            model_name=model,
            url=url,
            protocol=cfg.protocol,
            batch_size=batch_size,
            seq_length=seq_fixed,
            seq_len_distribution=cfg.seq_len_distribution,
            seq_len_mean=float(np.mean(lengths)),
            seq_len_max=int(np.max(lengths)),
            mode=cfg.mode,
            concurrency=level,
            achieved_concurrency=float(all_lat / duration),
            request_rate=rate,
            achieved_rate=float(len(sent) / max(t_stop - t0, 1e-9)),
            duration_s=duration,
            trials=len(windows),
            stable=is_stable(throughputs, p99s, cfg.stability_percent),
            window_throughputs=throughputs,
            window_p99s=p99s,
            errors=dict(rec.errors),
            latency_histogram=histogram(lat),
            latencies_ms=[float(x) for x in lat],
        )


class GPUMonitoredBenchmark(TritonBenchmark):
    """TritonBenchmark that samples the GPUs while each load point is measured (guide 10.2).

    ``run`` and ``run_sweep`` return ExtendedBenchmarkResult: utilization, peak memory and power
    (plus per-GPU lists) over the measured window, warm-up excluded. GPUs are read through NVML
    (nvidia-ml-py, else nvidia-smi) for a server on this machine, and through the server's
    ``nv_gpu_*`` metrics for a remote one: ``config.metrics_url``, else Triton's default metrics
    port 8002 on the server's host. Without a GPU the fields are None and the result's
    ``gpu_monitor_note`` says why; nothing fails.
    """

    def __init__(
        self,
        config: BenchmarkConfig | None = None,
        progress: ProgressFn | None = None,
        server_pid: int | None = None,
        *,
        gpus=None,
        interval_s: float = 0.2,
    ):
        super().__init__(config, progress, server_pid)
        self.gpus, self.interval_s = gpus, interval_s
        self._gpu: dict | None = None

    def monitor_for(self, url: str) -> GPUMonitor:
        """The GPUMonitor for a server at ``url``: NVML here, its metrics page when remote."""
        return GPUMonitor.for_server(url, self.config.metrics_url, self.gpus, self.interval_s)

    def run(self, triton_url=None, model_name="ugt_recommend", batch_size=1, seq_length=100, **kw):
        self._gpu = None
        try:
            result = super().run(triton_url, model_name, batch_size, seq_length, **kw)
        except BenchmarkError as e:
            if getattr(e, "result", None) is not None:
                e.result = self._extend(e.result)
            raise
        return self._extend(result)

    def run_sweep(self, *args, **kwargs) -> dict[str, ExtendedBenchmarkResult]:
        return super().run_sweep(*args, **kwargs)

    async def _measure(self, client, model, pool, level, rate, url):
        with self.monitor_for(url) as monitor:
            try:
                return await super()._measure(client, model, pool, level, rate, url)
            finally:
                self._gpu = monitor.stop().summary()

    def _extend(self, result: BenchmarkResult) -> ExtendedBenchmarkResult:
        gpu = self._gpu or {"gpu_monitor_note": "the benchmark stopped before measuring"}
        return ExtendedBenchmarkResult.extend(result, gpu)


def _run_coroutine(coro):
    """asyncio.run, also from inside a running event loop (a notebook): then in a new thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on every OS
        return None


def run_benchmark(
    triton_url: str, model_name: str, num_requests: int = 10000, **config_fields
) -> dict:
    """Guide 4.3: one load point (batch 1, first test seq_len, first level); the result as a dict.

    ``config_fields`` are BenchmarkConfig fields plus optional ``batch_size`` and ``seq_length``.
    """
    batch_size = config_fields.pop("batch_size", 1)
    seq_length = config_fields.pop("seq_length", None)
    cfg = BenchmarkConfig(triton_url=triton_url, num_requests=num_requests, **config_fields)
    seq = seq_length if seq_length is not None else cfg.test_seq_lengths[0]
    return (
        TritonBenchmark(cfg)
        .run(triton_url, model_name, batch_size=batch_size, seq_length=seq)
        .to_dict()
    )
