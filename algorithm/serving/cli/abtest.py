"""`ugt-serving abtest`: A/B tests and shadow traffic routed inside Triton (create, status,
report, split, promote, stop, route). Registered on ``cli.app`` on import."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from algorithm.serving.cli.app import STATE, app, console, emit, handle_errors, out

abtest_app = typer.Typer(
    help="A/B tests and shadow traffic between two served models, routed inside Triton.",
    no_args_is_help=True,
)
app.add_typer(abtest_app, name="abtest")

DEFAULT_REPOSITORY = Path("demo-output/model_repository")
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"  # the variable the generated manifests fill from the Secret
ADMIN_HEADER = "admin-key"

ROUTER_ARG = typer.Argument("ugt_router", help="The router model's name (one per experiment).")
REPO_OPT = typer.Option(DEFAULT_REPOSITORY, "--repository", "-r", help="Model repository.")
URL_OPT = typer.Option(
    None,
    "--url",
    help="HTTP endpoint (host:port) of the server: reloads the router (explicit model control) "
    "and reads the arms' statistics.",
)
METRICS_OPT = typer.Option(
    None, "--metrics-url", help="The server's metrics page, e.g. http://localhost:8002/metrics."
)


def _experiment(repository: Path, router: str, url=None, metrics_url=None):
    from algorithm.serving.abtest import ABExperiment

    key = os.environ.get(ADMIN_KEY_ENV)  # never a command-line argument: `ps` would show it
    headers = {ADMIN_HEADER: key} if key else None
    return ABExperiment(repository, router, url=url, metrics_url=metrics_url, headers=headers)


@abtest_app.command("create")
@handle_errors
def create(
    router: str = ROUTER_ARG,
    model_a: str = typer.Option(..., "--model-a", "-a", help="Arm A: the model serving now."),
    model_b: str = typer.Option(..., "--model-b", "-b", help="Arm B: the candidate."),
    mode: str = typer.Option("ab", help="ab (split users) or shadow (A answers, B mirrored)."),
    split: float = typer.Option(0.5, min=0.0, max=1.0, help="A/B: A's share of users."),
    shadow_fraction: float = typer.Option(
        0.1, min=0.0, max=1.0, help="Shadow: share of users whose requests B also gets."
    ),
    experiment: str = typer.Option("", help="Experiment name (default: the router's name)."),
    salt: str = typer.Option("", help="Hash salt (default: the experiment's name)."),
    shadow_timeout_ms: int = typer.Option(1000, min=1, help="B's timeout for a mirror."),
    instances: int = typer.Option(
        2, min=1, help="Router instances (CPU): one forwards while another waits for the arms."
    ),
    repository: Path = REPO_OPT,
    url: str | None = URL_OPT,
) -> None:
    """Put a router between two deployed models (same inputs and outputs) in a repository."""
    from algorithm.serving.abtest import ABExperiment
    from algorithm.serving.config import ExperimentConfig

    config = ExperimentConfig(
        router_name=router,
        model_a=model_a,
        model_b=model_b,
        mode=mode,
        traffic_split=split,
        shadow_fraction=shadow_fraction,
        experiment=experiment,
        salt=salt,
        shadow_timeout_ms=shadow_timeout_ms,
        instance_count=instances,
    )
    exp = ABExperiment.create(repository, config, url=url)
    emit(
        {
            "router": router,
            "config_path": str(repository / router / "config.pbtxt"),
            **{k: v for k, v in exp.config.to_dict().items() if k != "router_name"},
            "server": "loaded" if url else "not asked (pass --url, or serve with poll mode)",
        },
        "Experiment created",
    )


@abtest_app.command("status")
@handle_errors
def status(
    router: str = ROUTER_ARG,
    repository: Path = REPO_OPT,
    url: str | None = URL_OPT,
    metrics_url: str | None = METRICS_OPT,
) -> None:
    """The experiment, its history and (with --url and --metrics-url) its live per-arm results."""
    data = _experiment(repository, router, url, metrics_url).status()
    if STATE.json:
        emit(data, "Experiment")
        return
    emit({k: v for k, v in data["experiment"].items()}, f"Experiment {router}")
    results = data["results"]
    if results is None:
        console.print("no live results: pass --url and --metrics-url", highlight=False)
        return
    from rich.table import Table

    table = Table(title="Per arm (router's counters)", title_justify="left")
    for col in ("arm", "model", "path", "requests", "users", "errors", "P50 ms", "P99 ms"):
        table.add_column(col)
    for arm, paths in sorted(results["arms"].items()):
        for path, s in sorted(paths.items()):
            lat = s["latency_ms"] or {}
            table.add_row(
                arm.upper(),
                str(s["model"]),
                path,
                str(s["requests"].get("total", 0)),
                str(s["users"]),
                str(s["requests"].get("total", 0) - s["requests"].get("success", 0)),
                *(f"{lat[k]:.2f}" if lat.get(k) is not None else "-" for k in ("p50", "p99")),
            )
    out.print(table)
    if results["shadow"].get("compared_users"):
        emit(results["shadow"], "Shadow agreement (B against A)")


@abtest_app.command("report")
@handle_errors
def report(
    router: str = ROUTER_ARG,
    output: Path = typer.Option(Path("abtest-report"), "--output", "-o", help="Report folder."),
    repository: Path = REPO_OPT,
    url: str | None = URL_OPT,
    metrics_url: str | None = METRICS_OPT,
) -> None:
    """Write report.md, report.json and report.png (the plot needs --url and --metrics-url)."""
    emit(_experiment(repository, router, url, metrics_url).report(output), "Experiment report")


@abtest_app.command("split")
@handle_errors
def split(
    router: str = ROUTER_ARG,
    value: float = typer.Argument(
        ..., min=0.0, max=1.0, help="A/B: A's share of users; shadow: the share mirrored to B."
    ),
    mode: str | None = typer.Option(None, help="Switch the mode too: ab or shadow."),
    repository: Path = REPO_OPT,
    url: str | None = URL_OPT,
) -> None:
    """Change the split (and the mode); routing by it (re)starts."""
    exp = _experiment(repository, router, url)
    target = mode or exp.config.mode
    field = "traffic_split" if target == "ab" else "shadow_fraction"
    emit(exp.set_split(**{field: value}, mode=mode), "Split changed")


@abtest_app.command("promote")
@handle_errors
def promote(router: str = ROUTER_ARG, repository: Path = REPO_OPT, url: str | None = URL_OPT):
    """Send every user to B, in one atomic change."""
    emit(_experiment(repository, router, url).promote(), "Promoted B")


@abtest_app.command("stop")
@handle_errors
def stop(router: str = ROUTER_ARG, repository: Path = REPO_OPT, url: str | None = URL_OPT):
    """Send every user to A and mirror nothing."""
    emit(_experiment(repository, router, url).stop(), "Stopped")


@abtest_app.command("route")
@handle_errors
def route(
    user_ids: list[str] = typer.Argument(..., help="User ids (an int id and its text agree)."),
    router: str = typer.Option("ugt_router", "--router", help="The router whose split to use."),
    repository: Path = REPO_OPT,
) -> None:
    """Which model serves each user, computed here exactly as the server's router does."""
    r = _experiment(repository, router).router()
    emit({u: r.route(u) for u in user_ids}, f"Routes of {router}")
