"""One exception hierarchy for the whole project.

Subclasses are chosen by what the user does next; each keeps the builtin base that the module
guide promises (RuntimeError for failed exports/builds, FileNotFoundError for missing inputs,
ValueError for bad configuration) so code written against the guide keeps working.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error this project raises on purpose.

    ``hint`` is one line telling the user what to do next; the CLI prints it under the message.
    """

    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint


class ConfigError(ServingError, ValueError):
    """A configuration field has a value that is not allowed."""

    default_hint = "Fix the named field; `ugt-serving <command> --help` lists the allowed values."

    def __init__(self, field: str, value: object, allowed: str, *, hint: str | None = None):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}", hint=hint)


class InputFileNotFoundError(ServingError, FileNotFoundError):
    """A file the user named (checkpoint, ONNX model, engine, calibration data) does not exist."""

    default_hint = (
        "Check the path; earlier stages (`train`, `export`, `optimize`) write these files."
    )


class CheckpointError(ServingError, ValueError):
    """A checkpoint exists but is corrupt, foreign, or would need unpickling code to load."""

    default_hint = "Re-create it with `ugt-serving train` or `UGTModel.save(path)`."


class DependencyError(ServingError, ImportError):
    """An optional dependency is missing; the message carries the install command."""

    def __init__(self, package: str, install: str, *, purpose: str = ""):
        self.package, self.install = package, install
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}", hint=f"Install it: {install}")


class ExportError(ServingError, RuntimeError):
    """torch -> ONNX export failed or produced an invalid graph."""

    default_hint = (
        "Run with -v for the exporter's traceback; check the model's forward() signature."
    )


class OptimizationError(ServingError, RuntimeError):
    """An optimizer (TensorRT, ONNX Runtime, OpenVINO, AOTInductor) failed to build an artifact."""

    default_hint = (
        "Run with -v for the optimizer's log; try --precision fp32 to isolate precision issues."
    )


class ParityError(ServingError, RuntimeError):
    """An artifact disagrees with the PyTorch fp32 reference beyond the allowed tolerance."""

    default_hint = "Loosen the threshold only if the observed error is acceptable for your ranking."

    def __init__(self, message: str, report: dict | None = None, *, hint: str | None = None):
        self.report = report or {}
        super().__init__(message, hint=hint)


class ServerError(ServingError, RuntimeError):
    """tritonserver failed to start, died, or failed to load a model; carries the log tail."""

    default_hint = "Read the server log tail above; `ugt-serving validate` checks the repository."

    def __init__(self, message: str, log_tail: str = "", *, hint: str | None = None):
        self.log_tail = log_tail
        full = f"{message}\n--- tritonserver log (tail) ---\n{log_tail}" if log_tail else message
        super().__init__(full, hint=hint)


class BenchmarkError(ServingError, RuntimeError):
    """A benchmark could not run or its measurements are unusable."""

    default_hint = (
        "Check that the server is up (`curl <http-url>/v2/health/ready`) and the model name."
    )


class RepositoryError(ServingError, ValueError):
    """A model repository, model name or version is invalid or unsafe."""

    default_hint = "Names may use letters, digits, '_' and '-'; versions are positive integers."


__all__ = [
    "BenchmarkError",
    "CheckpointError",
    "ConfigError",
    "DependencyError",
    "ExportError",
    "InputFileNotFoundError",
    "OptimizationError",
    "ParityError",
    "RepositoryError",
    "ServerError",
    "ServingError",
]
