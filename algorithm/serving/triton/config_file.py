"""Replace a model's config.pbtxt keeping the one before it, and put that one back.

``replace_config`` first writes the current file to ``config.pbtxt.previous`` and then the new
text over ``config.pbtxt``, each atomically and under the model folder's writer lock, so a reader
(or a server told to reload) sees the old or the new config, never half of one, and a process
killed in between leaves the old config in place. ``restore_config`` swaps the two back: the
restored config's replacement becomes the new ``.previous``, so a restore can be undone the
same way. Triton reads only ``config.pbtxt``; the ``.previous`` file beside it is ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

from algorithm.errors import RepositoryError
from algorithm.fsutil import folder_lock as model_lock  # one writer per model folder
from algorithm.fsutil import write_text_atomic
from algorithm.serving.triton.schema import parse_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
PREVIOUS_FILE = "config.pbtxt.previous"


def _paths(model_dir) -> tuple[Path, Path]:
    model_dir = Path(model_dir)
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise RepositoryError(
            f"{config} not found",
            hint="Name a model folder of the repository (it holds config.pbtxt).",
        )
    return config, model_dir / PREVIOUS_FILE


def _check(text: str, what: str) -> None:
    try:
        parse_config(text)
    except Exception as e:  # text_format.ParseError and friends
        raise RepositoryError(f"{what} does not parse as a Triton ModelConfig: {e}") from e


def replace_config(model_dir, text: str) -> dict:
    """Make ``text`` the model's config.pbtxt; the current one is kept as config.pbtxt.previous.
    Returns {"config": path, "previous": path}."""
    config, previous = _paths(model_dir)
    _check(text, "the new config")
    with model_lock(config.parent):
        write_text_atomic(previous, config.read_text())
        write_text_atomic(config, text)
    logger.info("wrote %s (the one before it: %s)", config, previous.name)
    return {"config": str(config), "previous": str(previous)}


def restore_config(model_dir) -> dict:
    """Put config.pbtxt.previous back as config.pbtxt (the replaced one becomes .previous).
    Returns {"config": path, "previous": path}."""
    config, previous = _paths(model_dir)
    if not previous.is_file():
        raise RepositoryError(
            f"no earlier config to restore: {previous} not found",
            hint="`ugt-serving tune` keeps the config it replaces there; nothing was replaced yet.",
        )
    old = previous.read_text()
    _check(old, str(previous))
    with model_lock(config.parent):
        current = config.read_text()
        write_text_atomic(previous, current)
        write_text_atomic(config, old)
    logger.info("restored %s from %s", config, previous.name)
    return {"config": str(config), "previous": str(previous)}


__all__ = ["CONFIG_FILE", "PREVIOUS_FILE", "replace_config", "restore_config"]
