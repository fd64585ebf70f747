"""`python -m algorithm.serving.cli`."""

from algorithm.serving.cli import app

app()
