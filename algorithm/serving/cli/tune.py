"""`ugt-serving tune`: search the serving settings for the most throughput within a P99 budget.
Registered on ``cli.app`` on import."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer
from rich.table import Table

from algorithm.serving.cli.app import (
    ADMIN_KEY_FILE_OPT,
    STATE,
    TLS_CA_OPT,
    TLS_CERT_OPT,
    TLS_KEY_OPT,
    app,
    console,
    emit,
    handle_errors,
    out,
    progress,
)
from algorithm.serving.cli.bench import _numbers, load_config, load_options
from algorithm.serving.cli.repository import DEFAULT_REPOSITORY


def _preferred(text: str | None) -> tuple:
    """ "4,8,16;none;8,16" -> ((4, 8, 16), (), (8, 16)): candidate sets, ';' between them."""
    if not text:
        return ()
    sets = []
    for part in text.split(";"):
        part = part.strip()
        sets.append(() if part.lower() in ("", "none", "any") else _numbers("preferred", [part]))
    return tuple(sets)


def _policies(text: str | None) -> tuple:
    """ "0/0;64/15000" -> ((0, 0), (64, 15000)): max_queue_size/timeout_us pairs."""
    from algorithm.errors import ConfigError

    if not text:
        return ()
    pairs = []
    for part in text.split(";"):
        size, _, timeout = part.strip().partition("/")
        try:
            pairs.append((int(size), int(timeout or 0)))
        except ValueError:
            raise ConfigError(
                "queue_policies", text, "size/timeout_us pairs separated by ';', e.g. 0/0;64/15000"
            ) from None
    return tuple(pairs)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


class _Display:
    """A bar over the time budget (seconds used / budget), and a line per measured candidate."""

    def __init__(self, p, budget: float):
        self.p = p
        self.total = int(budget)
        self.task = p.add_task("Tuning", total=self.total)
        self.t0 = time.monotonic()
        self.what = "Tuning"  # the candidate being measured; windows add their numbers

    def __call__(self, event: str, info: dict) -> None:
        p, task = self.p, self.task
        p.update(task, completed=min(int(time.monotonic() - self.t0), self.total))
        if event == "server":
            p.update(task, description=f"tritonserver {info['state']}")
        elif event == "plan":
            stored = f", {info['stored']} stored points" if info["stored"] else ""
            p.console.print(
                f"tuning from [bold]{info['base']}[/] within {info['budget_s']:.0f} s{stored}; "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in info["values"].items()),
                highlight=False,
            )
        elif event == "candidate":
            self.what = f"#{info['index']} {info['label']} ({info['step']})"
            p.update(task, description=self.what)
        elif event == "compare":
            self.what = f"same run, round {info['round']}: {info['which']} {info['label']}"
            p.update(task, description=self.what)
        elif event == "window":
            p.update(
                task,
                description=f"{self.what} | {info['throughput']:.0f} req/s, "
                f"p99 {info['p99']:.1f} ms",
            )
        elif event == "measured":
            self._measured(info)
        elif event == "written":
            p.console.print(
                f"wrote {info['config']} (previous: {info['previous']})", highlight=False
            )

    def _measured(self, info: dict) -> None:
        c, judge = info["candidate"], info["judge"]
        thr, p99 = judge.throughput(c), judge.best_p99(c)
        verdict = (
            f"[green]{thr:.0f} req/s within budget[/]"
            if thr is not None
            else (
                f"[red]error: {c.error}[/]" if c.error and p99 is None else "[yellow]past budget[/]"
            )
        )
        where = f"#{info['index']}" if info["index"] is not None else "  same run:"
        reused = " (stored)" if c.reused else ""
        self.p.console.print(
            f"{where} {c.settings.label}{reused}: {verdict}, best p99 "
            f"{'-' if p99 is None else f'{p99:.1f}'} ms",
            highlight=False,
        )


@app.command()
@handle_errors
def tune(
    repository: Path | None = typer.Argument(
        None,
        help=f"Model repository (default {DEFAULT_REPOSITORY}; with --url: the one that server "
        "serves, if this machine has it: the winner is written there).",
        show_default=False,
    ),
    model: str = typer.Option("ugt_recommend", "--model", "-m", help="Model to tune."),
    url: str | None = typer.Option(
        None,
        "--url",
        "-u",
        help="An external server (explicit model control) instead of starting one.",
    ),
    protocol: str = typer.Option("grpc", help="grpc or http (match the --url port)."),
    slo: float = typer.Option(30.0, min=0.001, help="P99 budget in ms."),
    time_budget: float = typer.Option(
        900.0, min=1.0, help="Seconds for the search and the side-by-side comparison."
    ),
    output: Path = typer.Option(
        Path("tune-output"), "--output", "-o", help="Report, stored points, tuned config, logs."
    ),
    concurrency: list[str] = typer.Option(
        ["16"], "--concurrency", "-c", help="Closed-loop load levels (comma list)."
    ),
    mode: str = typer.Option("concurrency", help="concurrency or request_rate (Poisson arrivals)."),
    rates: str | None = typer.Option(None, help="Requests/s for --mode request_rate, comma list."),
    batch_size: int = typer.Option(1, min=1, help="Histories per request."),
    seq_length: int = typer.Option(128, min=1, help="History length (fixed distribution)."),
    seq_dist: str = typer.Option("fixed", help="fixed, uniform, lognormal or histogram."),
    seq_median: int = typer.Option(200, min=1, help="lognormal median length."),
    seq_sigma: float = typer.Option(0.8, min=0.0, help="lognormal sigma."),
    seq_max: int | None = typer.Option(
        None, min=1, help="Longest history (not fixed); default: the served model's."
    ),
    seq_hist: Path | None = typer.Option(
        None, help="JSON lengths/counts for --seq-dist histogram."
    ),
    instances: str | None = typer.Option(
        None, help="Instance counts to try (default: from the machine)."
    ),
    threads: str | None = typer.Option(
        None, help="Runtime intra-op threads to try (CPU runtimes)."
    ),
    max_batch: str | None = typer.Option(None, help="Max batch sizes to try."),
    preferred: str | None = typer.Option(
        None, help="Preferred batch size sets, ';' between sets: '4,8,16;none;8,16,32'."
    ),
    delays: str | None = typer.Option(None, help="Max queue delays to try, in us."),
    batching: str | None = typer.Option(None, help="GPU engine batching modes: length_aware,pad."),
    pipeline_depths: str | None = typer.Option(
        None,
        "--pipeline-depths",
        help="GPU torch runner: batches queued on the GPU per instance to try, e.g. 0,2 (0 = off).",
    ),
    queue_policies: str | None = typer.Option(
        None, help="Queue policies size/timeout_us: '0/0;0/15000;128/15000'."
    ),
    max_rejected: float = typer.Option(
        0.0,
        min=0.0,
        max=100.0,
        help="Rejected requests a point may have (%); > 0 searches the queue policy.",
    ),
    settings: str | None = typer.Option(
        None, help="Which settings to search, in order (default: all the model has)."
    ),
    tolerance: float = typer.Option(
        5.0, min=0.0, help="A step worse by more than this % ends a direction."
    ),
    rounds: int = typer.Option(
        1, min=0, max=10, help="Side-by-side rounds of winner and current config."
    ),
    requests: int = typer.Option(200, min=1, help="Minimum measured requests per load point."),
    warmup: int = typer.Option(50, min=0, help="Warm-up requests per load point (not measured)."),
    window: float = typer.Option(1.0, min=0.05, help="Measurement window in seconds."),
    max_trials: int = typer.Option(5, min=1, help="Most windows per load point."),
    timeout: float = typer.Option(10.0, min=0.001, help="Per-request timeout in seconds."),
    write: bool = typer.Option(
        True, help="Write the winner into the repository (--no-write: report only)."
    ),
    fresh: bool = typer.Option(False, help="Measure every candidate again (ignore stored points)."),
    restore: bool = typer.Option(
        False, "--restore", help="Put back the config the last tune replaced, and exit."
    ),
    triton_bin: Path | None = typer.Option(
        None, help="tritonserver binary for the embedded server."
    ),
    admin_key_file: Path | None = ADMIN_KEY_FILE_OPT,
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
) -> None:
    """Find the serving settings that hold a P99 budget at the most throughput, on the live server.

    Searches instances, runtime threads, max/preferred batch sizes, queue delay, the GPU engine's
    batching and pipeline depth, and (with --max-rejected > 0) the queue policy, one at a time
    from the current config; writes the winner into the repository (the old config kept:
    --restore puts it back).
    """
    from algorithm.serving.config import TUNE_SETTINGS, TuneConfig
    from algorithm.serving.tune import ServingTuner, restore_previous_config

    repo = repository if repository is not None or url else DEFAULT_REPOSITORY
    bc = load_config(
        **{**load_options(locals()), "url": url or "localhost:8001"},
        test_batch_sizes=(batch_size,),
        test_seq_lengths=(seq_length,),
    )
    if restore:
        done = restore_previous_config(repo or DEFAULT_REPOSITORY, model, url, protocol, bc)
        emit(done, "Restored")
        return
    chosen = tuple(s.strip() for s in settings.split(",")) if settings else TUNE_SETTINGS
    tc = TuneConfig(
        model_name=model,
        time_budget_s=time_budget,
        settings=chosen,
        instance_counts=_numbers("instances", [instances] if instances else []),
        runtime_threads=_numbers("threads", [threads] if threads else []),
        max_batch_sizes=_numbers("max_batch", [max_batch] if max_batch else []),
        preferred_batch_sizes=_preferred(preferred),
        max_queue_delays_us=_numbers("delays", [delays] if delays else []),
        gpu_batchings=tuple(b.strip() for b in batching.split(",")) if batching else (),
        pipeline_depths=_numbers("pipeline-depths", [pipeline_depths] if pipeline_depths else []),
        queue_policies=_policies(queue_policies),
        max_rejected_percent=max_rejected,
        tolerance_percent=tolerance,
        compare_rounds=rounds,
        write_config=write,
        resume=not fresh,
    )
    # SIGTERM stops a tune like Ctrl-C: the repository keeps its config, an external server
    # reloads it, and the points measured so far stay stored for a rerun.
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress() as p:
            tuner = ServingTuner(tc, bc, progress=_Display(p, time_budget))
            result = tuner.tune(repo, url=url, output=output, triton_bin=triton_bin)
    except KeyboardInterrupt:
        console.print(
            f"interrupted: the repository's config is unchanged; rerun to resume from "
            f"{output / 'tune_points.json'}",
            highlight=False,
        )
        raise typer.Exit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _finish(result)


def _finish(result) -> None:
    if STATE.json:
        data = result.to_dict()
        data.pop("rounds")  # every point is in tune_report.json; keep stdout readable
        data["candidates"] = [
            {
                k: c[k]
                for k in (
                    "index",
                    "label",
                    "step",
                    "throughput_within_budget",
                    "best_p99_ms",
                    "meets_budget",
                    "error",
                    "reused",
                )
            }
            for c in data["candidates"]
        ]
        emit(data, "Tune")
    else:
        table = Table(
            title=f"tune {result.model_name}: P99 <= {result.slo_p99_ms:g} ms", title_justify="left"
        )
        for col in ("#", "settings", "req/s in budget", "best p99 ms", "note"):
            table.add_column(
                col, justify="right" if col in ("#", "req/s in budget", "best p99 ms") else "left"
            )
        j = result.judge
        for i, c in enumerate(result.candidates):
            thr, p99 = j.throughput(c), j.best_p99(c)
            note = "winner" if c is result.winner else ("default" if i == 0 else c.error or "")
            table.add_row(
                str(i),
                c.settings.label,
                "-" if thr is None else f"{thr:.0f}",
                "-" if p99 is None else f"{p99:.1f}",
                note,
            )
        out.print(table)
        out.print(result.summary(), highlight=False)
        if result.written:
            out.print(
                f"written: {result.written['config']} (restore: ugt-serving tune "
                f"{Path(result.written['config']).parent.parent} -m {result.model_name} --restore)",
                highlight=False,
            )
        out.print(f"report: {result.paths.get('markdown')}", highlight=False)
    if not result.met_budget:
        console.print(
            "[yellow]hint:[/] no setting met the budget: raise --slo, lower the load, or serve a "
            "faster artifact (`ugt-serving optimize`).",
            highlight=False,
        )
        raise typer.Exit(1)
