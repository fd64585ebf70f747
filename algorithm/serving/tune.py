"""Find the serving settings that hold a P99 budget at the most throughput, on the live server.

    tuner = ServingTuner(
        TuneConfig(model_name="ugt_tiny", time_budget_s=600),
        BenchmarkConfig(concurrency_levels=(16,), test_batch_sizes=(1,), test_seq_lengths=(128,)),
    )
    result = tuner.tune("demo-output/model_repository", output="tune-output")
    print(result.summary())

The server is the embedded tritonserver started on the repository in explicit model-control
mode, or an external one (``url=``, explicit model control required). Each candidate is the
model's own config with the searched settings changed (``tuning.settings``); it is loaded with
the config given inline to Triton's load API, so the repository is not touched while searching;
measured with TritonBenchmark at each load level (warm-up excluded, stability windows), levels
ascending and stopping at the first past the budget; then unloaded. The search itself is
``tuning.search``; every candidate is stored in the output folder as soon as it is measured, so
a rerun resumes. At the end the winner (or, when none met the budget, the candidate that came
closest) and the config it would replace are measured again, alternately, in the same run; if
a winner holds up there it is written into the repository
atomically (the old config kept as config.pbtxt.previous: ``restore_previous_config`` or
``ugt-serving tune --restore`` puts it back), and the server loads it once to prove that it
loads. An interrupted tune leaves the repository's config as it was, and an external server
serving it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

from algorithm.errors import BenchmarkError, ConfigError, RepositoryError, ServerError
from algorithm.serving.benchmark import ProgressFn, TritonBenchmark
from algorithm.serving.config import BenchmarkConfig, TuneConfig, check_name
from algorithm.serving.contract import SIDECAR_NAME
from algorithm.serving.triton.config_file import replace_config, restore_config
from algorithm.serving.triton.control import ModelControl
from algorithm.serving.triton.schema import config_to_text, model_config_pb2, parse_config
from algorithm.serving.triton.validation import validate_deployment
from algorithm.serving.tuning.report import write_tune_report
from algorithm.serving.tuning.result import TuneResult
from algorithm.serving.tuning.search import (
    Candidate,
    CoordinateSearch,
    Judge,
    candidate_values,
    closest,
    winner,
)
from algorithm.serving.tuning.settings import (
    ServingSettings,
    apply_settings,
    config_from_json,
    config_json,
    read_settings,
)
from algorithm.serving.tuning.store import PointStore

logger = logging.getLogger(__name__)

# (url, model, load level) -> one measured load point; the default is TritonBenchmark.run
MeasurePointFn = Callable[[str, str, float], object]
# the CLI's defaults: batch-1 requests of 128 items at 16 in flight
DEFAULT_LOAD = BenchmarkConfig(
    concurrency=16, concurrency_levels=(16,), test_batch_sizes=(1,), test_seq_lengths=(128,)
)
_CHECKED = ("instance_count", "max_batch_size", "preferred_batch_sizes", "max_queue_delay_us")


class ServingTuner:
    """Searches a model's serving settings on a live Triton server (see the module docstring).

    ``progress(event, info)`` gets "plan", "candidate" (before each), "window" (each measurement
    window), "measured" (each candidate), "compare" and "written" events; the library never
    prints. ``measure_point`` replaces the in-process load generator (e.g. several client
    processes for a GPU server).
    """

    def __init__(
        self,
        config: TuneConfig | None = None,
        benchmark_config: BenchmarkConfig | None = None,
        progress: ProgressFn | None = None,
        measure_point: MeasurePointFn | None = None,
    ):
        self.config = (config or TuneConfig()).validate()
        self.bench_config = (benchmark_config or DEFAULT_LOAD.replace()).validate()
        self.progress = progress
        self.measure_point = measure_point
        bc = self.bench_config
        if len(bc.test_batch_sizes) != 1 or (
            bc.seq_len_distribution == "fixed" and len(bc.test_seq_lengths) != 1
        ):
            raise ConfigError(
                "test_batch_sizes/test_seq_lengths",
                (bc.test_batch_sizes, bc.test_seq_lengths),
                "one batch size and one seq_length (or a length distribution): a tune measures "
                "one request shape at every load level",
            )
        self.judge = Judge(bc.slo_p99_ms, self.config.max_rejected_percent)

    def _emit(self, event: str, **info) -> None:
        if self.progress is not None:
            self.progress(event, info)

    # -- entry point ------------------------------------------------------------------------
    def tune(
        self,
        repository=None,
        *,
        url: str | None = None,
        output="tune-output",
        triton_bin=None,
        server_env: dict[str, str] | None = None,
        startup_timeout_s: float = 300.0,
    ) -> TuneResult:
        """Tune ``config.model_name`` of ``repository`` on an embedded server, or on the server
        at ``url`` (then ``repository``, when given, is the one it serves: the winner is written
        there). Returns the TuneResult; the report is in ``output``."""
        t0 = time.monotonic()
        model = self.config.model_name
        if repository is None and url is None:
            raise ConfigError("repository", None, "a model repository, or the url of a server")
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        base_config, limit = (
            self._base_config(repository) if repository is not None else (None, None)
        )
        if url is not None:
            return self._run_external(url, repository, base_config, limit, output, t0)
        from algorithm.serving.triton.server import TritonServer

        server = TritonServer(
            repository,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            triton_bin=triton_bin,
            model_control="explicit",
            load_models=[model],
            startup_timeout_s=startup_timeout_s,
            log_dir=output / "logs",
            env=server_env,
        )
        self._emit("server", state="starting", repository=str(repository))
        with server:
            url = server.grpc_url if self.bench_config.protocol == "grpc" else server.http_url
            self._emit("server", state="ready", url=url)
            control = ModelControl(url, self.bench_config.protocol, self.config.load_timeout_s)
            target = _Target(
                control,
                url,
                "embedded",
                server.is_alive,
                server_pid=server.process.pid,
                metrics_url=server.metrics_url,
            )
            try:
                return self._session(target, repository, base_config, limit, output, t0)
            finally:
                control.close()

    def _run_external(self, url, repository, base_config, limit, output, t0) -> TuneResult:
        model = self.config.model_name
        control = _control(url, self.bench_config, self.config.load_timeout_s)
        try:
            control.require_explicit(model)  # ServerError with the hint when it is off
            if base_config is None:
                base_config = config_from_json(control.config(model))
                limit = base_config.max_batch_size
            target = _Target(
                control, url, url, control.is_live, metrics_url=self.bench_config.metrics_url
            )
            try:
                return self._session(target, repository, base_config, limit, output, t0)
            finally:
                # whatever happened (interrupt included), the server serves the repository's
                # config again: the winner when it was written, else the config as it was
                with contextlib.suppress(ServerError):
                    control.load(model)
        finally:
            control.close()

    # -- inputs -----------------------------------------------------------------------------
    def _base_config(self, repository):
        """The model's config.pbtxt and the largest batch its artifact takes (its sidecar)."""
        model = self.config.model_name
        check = validate_deployment(repository, model)
        if not check["valid"]:
            raise RepositoryError(
                f"{model!r} in {repository} cannot be tuned: " + "; ".join(check["errors"][:3]),
                hint="`ugt-serving validate <repository>` lists every problem.",
            )
        model_dir = Path(repository) / model
        config = parse_config((model_dir / "config.pbtxt").read_text())
        limit = config.max_batch_size
        with contextlib.suppress(OSError, ValueError):
            exported = json.loads((model_dir / SIDECAR_NAME).read_text()).get("max_batch_size")
            if exported:
                limit = int(exported)
        return config, limit

    def _context(self, base_config, server_name: str) -> dict:
        bc = self.bench_config.to_dict()
        for k in ("triton_url", "metrics_url", "slo_p99_ms"):
            bc.pop(k, None)
        return {
            "model": self.config.model_name,
            "config": config_to_text(base_config),
            "load": bc,
            "server": server_name,
            "host": platform.node(),
        }

    # -- the session ------------------------------------------------------------------------
    def _session(
        self, target: _Target, repository, base_config, limit: int, output: Path, t0: float
    ) -> TuneResult:
        cfg, model = self.config, self.config.model_name
        base = read_settings(base_config)
        pb = model_config_pb2()
        gpu = any(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in base_config.instance_group)
        values = candidate_values(base, cfg, self.judge.slo_p99_ms, gpu=gpu, max_batch_limit=limit)
        context = self._context(base_config, target.name)
        store = PointStore(output, context, enabled=cfg.resume)
        bench = TritonBenchmark(
            self.bench_config.replace(metrics_url=target.metrics_url),
            progress=lambda event, info: self._emit(event, **info),
            server_pid=target.server_pid,
        )
        run = _Run(self, target, bench, base_config)
        spent: list[float] = []  # seconds of the candidates measured in this run

        def measure(settings: ServingSettings, step: str) -> Candidate:
            index = len(search.order)
            stored = store.get(settings.key)
            self._emit(
                "candidate", index=index, label=settings.label, step=step, reused=stored is not None
            )
            if stored is not None:
                stored.step = step
                c = stored
            else:
                c = run.measure(settings, step)
                spent.append(c.seconds)
                store.put(c)
            self._emit("measured", index=index, candidate=c, judge=self.judge)
            return c

        def has_time() -> bool:
            each = sum(spent) / len(spent) if spent else 0.0
            reserve = 2 * cfg.compare_rounds * each  # the side-by-side runs after the search
            return time.monotonic() - t0 + each + reserve <= cfg.time_budget_s

        self._emit(
            "plan",
            base=base.label,
            values={k: [str(v) for v in vs] for k, vs in values.items()},
            budget_s=cfg.time_budget_s,
            stored=len(store),
        )
        search = CoordinateSearch(
            base, values, self.judge, measure, cfg.tolerance_percent, has_time
        )
        candidates = search.run()
        best = winner(candidates, self.judge)
        result = TuneResult(
            model_name=model,
            judge=self.judge,
            candidates=candidates,
            winner=best,
            closest=None if best else closest(candidates, self.judge),
            values=values,
            stopped=search.stopped,
            context={k: v for k, v in context.items() if k != "config"},
        )
        tuned = result.tuned
        if tuned is not None and tuned.settings != base:
            # also when none met the budget: how much closer the best came, in the same run
            for i in range(cfg.compare_rounds):
                result.rounds.append(self._round(i, base, tuned.settings, run))
        if best is not None and result.improved:
            result.winner_config = config_to_text(apply_settings(base_config, best.settings))
            sbs = result.side_by_side()
            if sbs is not None and sbs["tuned_throughput"] <= sbs["default_throughput"]:
                # the search's best was luck of the moment: the same-run rounds say it is not
                # better than what is there, so what is there stays
                result.not_written = "it did not beat the current config in the same run"
            elif repository is None:
                result.not_written = "no repository given (the tuned config is in the report)"
            elif not cfg.write_config:
                result.not_written = "writing was turned off"
            else:
                result.written, result.server_config_check = self._write(
                    target.control, repository, result.winner_config, best.settings
                )
        result.seconds = time.monotonic() - t0
        result.paths = write_tune_report(result, output)
        return result

    def _round(self, i: int, base: ServingSettings, tuned: ServingSettings, run: _Run) -> dict:
        """The config as it was and the tuned one, one after the other (the order alternating by
        round), each at every level: both seen by the same machine in the same minutes."""
        order = [("default", base), ("tuned", tuned)]
        if i % 2:
            order.reverse()
        out = {}
        for which, settings in order:
            self._emit("compare", round=i + 1, which=which, label=settings.label)
            out[which] = run.measure(settings, f"compare-{which}", every_level=True)
            self._emit("measured", index=None, candidate=out[which], judge=self.judge)
        return out

    def _write(self, control, repository, text: str, settings: ServingSettings):
        """The winner into the repository; the server loads it once (from the file) to prove it.
        A config the server refuses is taken back at once."""
        model = self.config.model_name
        model_dir = Path(repository) / model
        written = replace_config(model_dir, text)
        try:
            control.load(model)
        except ServerError as e:
            restore_config(model_dir)
            with contextlib.suppress(ServerError):
                control.load(model)
            raise ServerError(
                f"the server refused the tuned config of {model!r}; the previous config is back "
                f"in place: {str(e).splitlines()[0]}",
                hint="Report this: every candidate loaded before it was measured.",
            ) from e
        served = read_settings(config_from_json(control.config(model)))
        diff = {
            k: [getattr(served, k), getattr(settings, k)]
            for k in _CHECKED
            if getattr(served, k) != getattr(settings, k)
        }
        if diff:
            logger.warning("the server serves %s with other settings than written: %s", model, diff)
        self._emit("written", **written, matches=not diff)
        return written, {"loaded": True, "matches": not diff, "differences": diff}


@dataclasses.dataclass
class _Target:
    """The server a tune runs on: how to control it, where to send load, whether it lives."""

    control: ModelControl
    url: str
    name: str  # "embedded" or the url (part of the stored points' context)
    is_alive: Callable[[], bool]
    server_pid: int | None = None  # a local server: its CPU use is measured too
    metrics_url: str | None = None


class _Run:
    """Measures candidates on one server: load the candidate config inline, measure each load
    level (ascending, stopping at the first past the budget unless ``every_level``), unload."""

    def __init__(self, tuner: ServingTuner, target: _Target, bench, base_config):
        self.tuner, self.bench, self.base_config = tuner, bench, base_config
        self.control, self.url, self.is_alive = target.control, target.url, target.is_alive
        self.model = tuner.config.model_name

    def measure(self, settings: ServingSettings, step: str, every_level: bool = False):
        judge, bc = self.tuner.judge, self.tuner.bench_config
        c = Candidate(settings, step)
        t = time.monotonic()
        try:
            # load() unloads the version loaded before: a candidate never shares the machine
            # with it (on a GPU both sets may not fit)
            self.control.load(self.model, config_json(apply_settings(self.base_config, settings)))
        except ServerError as e:
            c.error = str(e).splitlines()[0]
            self._alive_or_raise(e)
            c.seconds = time.monotonic() - t
            return c
        try:
            levels = sorted(bc.levels)
            for i, level in enumerate(levels):
                r = self.point(level)
                c.results.append(r)
                if not every_level and not judge.point_ok(r):
                    c.skipped_levels = list(levels[i + 1 :])  # more load cannot do better
                    break
        except BenchmarkError as e:
            c.error = str(e).splitlines()[0]
            if getattr(e, "result", None) is not None:
                c.results.append(e.result)
            self._alive_or_raise(e)
        finally:
            with contextlib.suppress(ServerError):
                self.control.unload(self.model)
        c.seconds = time.monotonic() - t
        return c

    def point(self, level: float):
        bc = self.tuner.bench_config
        if self.tuner.measure_point is not None:
            return self.tuner.measure_point(self.url, self.model, level)
        seq = bc.test_seq_lengths[0] if bc.seq_len_distribution == "fixed" else None
        load = {"request_rate": level} if bc.mode == "request_rate" else {"concurrency": int(level)}
        return self.bench.run(self.url, self.model, bc.test_batch_sizes[0], seq, **load)

    def _alive_or_raise(self, error: Exception) -> None:
        """A candidate may fail; a dead server ends the tune."""
        if not self.is_alive():
            raise ServerError(
                f"the Triton server at {self.url} died while tuning: {str(error).splitlines()[0]}",
                hint="Read the server log (<output>/logs for the embedded server); the "
                "repository's config is unchanged, and a rerun resumes from the stored points.",
            ) from error


def tune_serving(repository=None, model_name: str = "ugt_recommend", **fields) -> TuneResult:
    """One call: ``fields`` are TuneConfig and BenchmarkConfig fields (the load defaults to
    batch-1 requests of 128 items at concurrency 16), plus ``url``, ``output`` and
    ``triton_bin`` for ``ServingTuner.tune``."""
    run = {k: fields.pop(k) for k in ("url", "output", "triton_bin") if k in fields}
    tune_names = {f.name for f in dataclasses.fields(TuneConfig)}
    tc = TuneConfig(model_name=model_name, **{k: v for k, v in fields.items() if k in tune_names})
    bc = DEFAULT_LOAD.replace(**{k: v for k, v in fields.items() if k not in tune_names})
    return ServingTuner(tc, bc).tune(repository, **run)


def _control(url: str, bench_config: BenchmarkConfig, timeout_s: float = 300.0) -> ModelControl:
    """Model control of an external server with the benchmark client's admin key and TLS."""
    from algorithm.serving.security import read_admin_key

    return ModelControl(
        url,
        bench_config.protocol,
        timeout_s,
        admin_key=read_admin_key(bench_config.admin_key_file),
        tls=bench_config.client_tls(),
    )


def restore_previous_config(
    repository,
    model_name: str,
    url: str | None = None,
    protocol: str = "grpc",
    client: BenchmarkConfig | None = None,
) -> dict:
    """Put back the config a tune replaced (config.pbtxt.previous; the tuned one becomes the
    new .previous). With ``url`` the server there (explicit model control) reloads the model;
    ``client`` brings the admin key and TLS files for it (as for the benchmark)."""
    check_name("model_name", model_name)
    done = restore_config(Path(repository) / model_name)
    done["server"] = "not asked to reload (no url)"
    if url:
        control = _control(url, (client or BenchmarkConfig()).replace(protocol=protocol))
        try:
            control.load(model_name)  # the tuned version goes first (ModelControl.load)
        finally:
            control.close()
        done["server"] = f"reloaded on {url}"
    return done


__all__ = ["ServingTuner", "TuneResult", "restore_previous_config", "tune_serving"]
