"""The CLI's one error path: any exception a user can cause -> one message, one hint, a type.

``describe(exc)`` returns ``{"error", "hint", "type"}`` (plus ``details``, and what the exception
carries for scripts: a server log tail, an accuracy report, a partial benchmark result) or None
for an exception no user input explains (a bug: it keeps its traceback). The hint comes from
the actual cause: the path that is a file, the port that is taken, the version that is missing.
``app.py`` prints it (one line + hint, or one JSON object with ``--json``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from algorithm.errors import ServingError

# Placeholders some library hints carry; the CLI knows the actual values.
_PLACEHOLDERS = {
    "<command>": lambda ctx: " ".join(ctx.command_path.split()[1:]) or "COMMAND",
    "<repository>": lambda ctx: str(ctx.params.get("repository") or "REPOSITORY"),
    "<name>": lambda ctx: str(ctx.params.get("model_name") or ctx.params.get("model") or "MODEL"),
    "<http-url>": lambda ctx: _http_url(ctx.params.get("url")),
}


def _http_url(url) -> str:
    """The HTTP endpoint beside a --url (Triton's HTTP port is 8000 unless moved)."""
    if not url:
        return "http://localhost:8000"
    url = str(url)
    if url.startswith(("http://", "https://")):
        return url.rstrip("/")
    host = url.rsplit(":", 1)[0] if url.count(":") == 1 else url
    return f"http://{host}:8000"


def describe(exc: BaseException, ctx=None) -> dict[str, Any] | None:
    """The error as the user reads it, or None for a bug (no user input explains it)."""
    if isinstance(exc, ServingError):
        info = _serving(exc)
    elif isinstance(exc, OSError):
        info = _os_error(exc)
    elif _is_protobuf_decode_error(exc):
        info = {
            "error": f"a file could not be parsed: {exc or 'truncated or not a protobuf'}",
            "hint": "The file is truncated or not what its name says; re-create it with the "
            "command that writes it (export, optimize, deploy).",
        }
    elif isinstance(exc, KeyboardInterrupt):
        info = {"error": "interrupted", "hint": "Nothing was published by the interrupted step."}
    else:
        return None
    info["type"] = type(exc).__name__
    if ctx is not None and info.get("hint"):
        for key, value in _PLACEHOLDERS.items():
            if key in info["hint"]:
                info["hint"] = info["hint"].replace(key, value(ctx))
    return info


def exit_code(exc: BaseException) -> int:
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def _serving(e: ServingError) -> dict[str, Any]:
    first, *rest = str(e).splitlines() or [type(e).__name__]
    info: dict[str, Any] = {"error": first, "hint": e.hint or ""}
    log_tail = getattr(e, "log_tail", "")
    if log_tail:  # ServerError: the message's tail is the log; scripts get it as a field
        rest = []
        info["log_tail"] = log_tail
    if rest:
        info["details"] = rest
    report = getattr(e, "report", None)
    if report:
        info["report"] = report
    result = getattr(e, "result", None)
    if result is not None and hasattr(result, "to_dict"):
        info["result"] = result.to_dict()
    return info


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _os_error(e: OSError) -> dict[str, Any]:
    """Builtin OS errors by cause, naming the path (and the part of it that is in the way)."""
    name = e.filename
    path = Path(os.fsdecode(name)) if name not in (None, "") else None
    reason = e.strerror or str(e)
    if isinstance(e, NotADirectoryError) and path is not None:
        blocker = _existing_ancestor(path)
        what = blocker if blocker.is_file() else path
        return {
            "error": f"{what} is a file, not a folder (needed for {path})",
            "hint": "Pass a folder path (new or existing) there, or move that file away.",
        }
    if isinstance(e, IsADirectoryError) and path is not None:
        return {
            "error": f"{path} is a folder, not a file",
            "hint": "Name a file inside it, e.g. its default file name.",
        }
    if isinstance(e, FileExistsError) and path is not None:
        kind = "a file" if path.is_file() else "a folder" if path.is_dir() else "something"
        return {
            "error": f"{path} already exists as {kind}",
            "hint": "Choose another path, or remove it first.",
        }
    if isinstance(e, FileNotFoundError) and path is not None:
        return {
            "error": f"{path} not found",
            "hint": "Check the path; earlier stages (train, export, optimize, deploy) write these files.",
        }
    if isinstance(e, PermissionError):
        return {
            "error": f"permission denied: {path or reason}",
            "hint": "Choose a path you can write (or read), or fix its permissions.",
        }
    if e.errno == errno.ENOSPC:
        return {
            "error": f"no space left on the device{f' writing {path}' if path else ''}",
            "hint": "Free disk space or write somewhere else (artifacts are tens of MB).",
        }
    if e.errno == errno.EADDRINUSE:
        return {
            "error": f"address already in use: {reason}",
            "hint": "Another process holds the port: pass other ports (0 picks a free one) or stop it.",
        }
    return {
        "error": f"{reason}{f': {path}' if path else ''}",
        "hint": "Check the path and that the disk and network are available.",
    }


def _is_protobuf_decode_error(exc: BaseException) -> bool:
    return any(
        c.__module__ == "google.protobuf.message" and c.__name__ == "DecodeError"
        for c in type(exc).__mro__
    )
