"""Lazily resolved package exports: ``import algorithm.serving`` (or ``algorithm.ugt``) stays
cheap, and a name's module (torch, ONNX Runtime, tritonclient ...) loads when the name is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in the modules that
    ``exports`` maps them to (relative module names resolve against ``package``)."""
    names = sorted(exports)

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return names

    return __getattr__, __dir__
