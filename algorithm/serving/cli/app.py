"""`ugt-serving`: the command line. It owns all output: progress, tables, --json, exit codes.

One error path for every command (``CLIGroup.main`` and ``handle_errors``): an exception a user
can cause (a ServingError, a path that is a file, a taken port, a bad option) becomes one line
plus a hint chosen from its cause, or with ``--json`` one JSON object on stdout
(``{"error", "hint", "type", ...}``), and a non-zero exit code (1; 2 for a bad option; 130 for
Ctrl-C). ``--json`` and ``-v`` work anywhere on the command line. Tracebacks only with ``-v``,
or for an exception no input explains (a bug). When stdout is not a terminal, output is plain
text: no table borders, nothing truncated or wrapped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from algorithm.serving.cli.errors import describe, exit_code

GLOBAL_FLAGS = ("--json", "-v", "--verbose")


class State:
    verbose: bool = False
    json: bool = False


STATE = State()

# Newer typer vendors click (typer._click), older typer uses click itself: find the classes
# through typer's public names so both work.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_SIGNALS = (typer.Exit, typer.Abort, _CLICK_ERROR)


def _current_context():
    try:
        from typer.main import get_current_context
    except ImportError:  # typer without its own click
        from click import get_current_context
    return get_current_context(silent=True)


def hoist_global_flags(args: Sequence[str]) -> list[str]:
    """``--json`` and ``-v`` anywhere (before a ``--``) move to the front, where click reads them."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]


class CLIGroup(TyperGroup):
    """The top-level group: global flags anywhere, and usage errors through the error path."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = hoist_global_flags(sys.argv[1:] if args is None else args)
        STATE.json = "--json" in args  # known before parsing: a usage error is JSON too
        STATE.verbose = "-v" in args or "--verbose" in args
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERROR as e:
            if STATE.json:
                ctx = getattr(e, "ctx", None)
                path = ctx.command_path if ctx is not None else "ugt-serving"
                _print_json(
                    {
                        "error": e.format_message(),
                        "hint": f"`{path} --help` lists the options and their values.",
                        "type": type(e).__name__,
                    }
                )
            else:
                e.show()
            rv = e.exit_code
        except typer.Abort:
            rv = 1
        except typer.Exit as e:
            rv = e.exit_code
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="ugt-serving",
    cls=CLIGroup,
    help="Take a trained UGT recommender from PyTorch to a live, measured Triton Inference Server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: full option names at any width (rich's truncates them at 80 columns)
    rich_markup_mode=None,
)
# soft_wrap: an error or a plain line is never broken over lines (terminals wrap it themselves)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

DEFAULT_CHECKPOINT = Path("demo-output/ugt_tiny.safetensors")


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging, third-party warnings and full tracebacks."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout, errors too (for scripts)."
    ),
) -> None:
    STATE.verbose, STATE.json = verbose, json_output
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # Our warnings stay; third-party chatter (torch's exporter, FutureWarnings) needs -v.
        logging.getLogger("algorithm").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
        # torch logs through its own handler (e.g. the exporter's "torchvision is not installed");
        # it reads TORCH_LOGS when imported, which happens later, inside the commands.
        os.environ.setdefault("TORCH_LOGS", "-torch")


# ---------------------------------------------------------------------------------- errors
def _print_json(data: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def fail(exc: BaseException) -> NoReturn:
    """Report ``exc`` the one way (message + hint, or JSON) and exit; a bug keeps its traceback."""
    ctx = _current_context()
    info = describe(exc, ctx)
    if info is None or STATE.verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if info is None:  # no input explains it: still one object for scripts
        info = {
            "error": f"internal error: {type(exc).__name__}: {exc}",
            "hint": "This is a bug: rerun with -v and report the traceback.",
            "type": type(exc).__name__,
        }
    if STATE.json:
        _print_json(info)
    else:
        console.print(f"[bold red]error:[/] {escape(info['error'])}", highlight=False)
        for line in info.get("details", []):
            console.print(line, highlight=False, markup=False)
        if info.get("log_tail"):
            console.print("--- tritonserver log (tail) ---", highlight=False, markup=False)
            console.print(info["log_tail"], highlight=False, markup=False)
        if info.get("hint"):
            console.print(f"[yellow]hint:[/] {escape(info['hint'])}", highlight=False)
    raise typer.Exit(exit_code(exc))


def handle_errors(fn: Callable) -> Callable:
    """Every exception out of a command goes through ``fail``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _SIGNALS:
            raise
        except (Exception, KeyboardInterrupt) as e:
            fail(e)

    return wrapper


def warn(message: str) -> None:
    """A warning for the user on stderr (not under --json: the JSON carries it)."""
    if not STATE.json:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


# ---------------------------------------------------------------------------------- output
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


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1
) -> None:
    """A table on stdout: rich on a terminal; else plain aligned columns, nothing truncated.
    The first ``left`` columns are left-aligned, the rest (numbers) right-aligned."""
    cells = [[_cell(c) for c in row] for row in rows]
    if out.is_terminal:
        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i < left else "right", overflow="fold")
        for row in cells:
            table.add_row(*row)
        out.print(table)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values):
        parts = [
            v.ljust(w) if i < left else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    text = [title, line(list(columns))] + [line(r) for r in cells]
    sys.stdout.write("\n".join(text) + "\n")


def emit(data: dict[str, Any], title: str) -> None:
    """--json: one JSON object on stdout; a terminal: a two-column table; else ``key: value``."""
    if STATE.json:
        _print_json(data)
        return
    if out.is_terminal:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for k, v in data.items():
            table.add_row(str(k), _cell(v))
        out.print(table)
        return
    sys.stdout.write(title + "\n" + "".join(f"{k}: {_cell(v)}\n" for k, v in data.items()))


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
