"""`ugt-serving`: the command line. It owns all output: progress, tables, --json, exit codes.

Every command turns a ServingError into one line of message plus a hint and exit code 1
(traceback only with -v); other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from algorithm.errors import ServingError

app = typer.Typer(
    name="ugt-serving",
    help="Take a trained UGT recommender from PyTorch to a live, measured Triton Inference Server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

DEFAULT_CHECKPOINT = Path("demo-output/ugt_tiny.safetensors")


class State:
    verbose: bool = False
    json: bool = False


STATE = State()


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging and full tracebacks."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout (for scripts)."
    ),
) -> None:
    STATE.verbose, STATE.json = verbose, json_output
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def handle_errors(fn: Callable) -> Callable:
    """ServingError -> one line + hint, exit 1; traceback only with -v."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServingError as e:
            if STATE.verbose:
                console.print_exception()
            first, *rest = str(e).splitlines() or [type(e).__name__]
            console.print(f"[bold red]error:[/] {escape(first)}", highlight=False)
            for line in rest:
                console.print(line, highlight=False, markup=False)
            if e.hint:
                console.print(f"[yellow]hint:[/] {escape(e.hint)}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=STATE.json,
    )


def stage(description: str):
    """A spinner for a step with no measurable progress."""
    return console.status(f"[bold]{description}...", spinner="dots") if not STATE.json else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def emit(data: dict[str, Any], title: str) -> None:
    """--json: one JSON object on stdout; else a two-column table."""
    if STATE.json:
        out.print_json(json.dumps(data, default=str))
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        table.add_row(str(k), str(v))
    out.print(table)


def load_model(checkpoint: Path):
    from algorithm.ugt import UGTModel

    with stage(f"Loading {checkpoint}"):
        return UGTModel.load(checkpoint)


# Where a command gets the admin key and, as a client, its TLS files (serve, versions, benchmark,
# and any command that talks to a server). The key itself is never an option: ps shows arguments.
ADMIN_KEY_FILE_OPT = typer.Option(
    None,
    "--admin-key-file",
    help="File holding the admin key (default: $TRITON_ADMIN_KEY_FILE, then $TRITON_ADMIN_KEY).",
)
TLS_CA_OPT = typer.Option(
    None, "--tls-ca", help="gRPC over TLS: the CA that signed the server's certificate."
)
TLS_CERT_OPT = typer.Option(None, "--tls-cert", help="Mutual TLS: this client's certificate.")
TLS_KEY_OPT = typer.Option(None, "--tls-key", help="Mutual TLS: this client's private key.")


def client_security(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> dict:
    """BenchmarkConfig fields for a client's TLS files (TLS is on when any is given)."""
    paths = {"tls_ca_file": tls_ca, "tls_cert_file": tls_cert, "tls_key_file": tls_key}
    fields = {k: str(v) for k, v in paths.items() if v is not None}
    return {"tls": bool(fields), **fields}


# --------------------------------------------------------------------------------------- train
