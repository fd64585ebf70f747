"""`ugt-serving`: the command line. ``app`` (shared options, output, the one error path) lives in
``app.py``; each topic's commands register on it when their module is imported here."""

from algorithm.serving.cli import (  # noqa: F401  (register)
    abtest,
    bench,
    manifests,
    model,
    repository,
    tune,
)
from algorithm.serving.cli.app import app

__all__ = ["app"]
