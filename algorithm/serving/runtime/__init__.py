"""The Runner protocol and the lazy runner registry, at the bottom of the house.

One ``Runner`` per runtime: ``infer(dict[str, ndarray]) -> dict[str, ndarray]``. The accuracy
gate and the Triton python-backend model both go through these, so what is verified is exactly
what is served. Each runtime lives in its own module here and is imported only when a runner of
it is created (heavy runtimes stay unloaded until used).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from algorithm.errors import ConfigError, DependencyError, InputFileNotFoundError


class Runner(Protocol):
    name: str

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def require(module: str, install: str, purpose: str = "") -> None:
    """Raise DependencyError with the install command unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise DependencyError(module, install, purpose=purpose)


def existing(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileNotFoundError(f"artifact not found: {p}")
    return p


# runtime -> "module:factory" (resolved on first use; register_runner adds plug-ins).
_RUNNERS: dict[str, object] = {
    "torch": "algorithm.serving.runtime.torch:TorchRunner.from_checkpoint",
    "onnxruntime": "algorithm.serving.runtime.onnxruntime:OnnxRuntimeRunner",
    "openvino": "algorithm.serving.runtime.openvino:OpenVINORunner",
    "tensorrt": "algorithm.serving.runtime.tensorrt:TensorRTRunner",
    "torch_aot": "algorithm.serving.runtime.torch_aot:TorchAOTRunner",
}


def register_runner(runtime: str, factory) -> None:
    """Add a runner: ``factory`` is a callable, or ``"module:attr.path"`` resolved on first use."""
    _RUNNERS[runtime] = factory


def runner_factory(runtime: str):
    try:
        factory = _RUNNERS[runtime]
    except KeyError:
        raise ConfigError("runtime", runtime, f"one of {', '.join(sorted(_RUNNERS))}") from None
    if isinstance(factory, str):
        module, _, attrs = factory.partition(":")
        obj = importlib.import_module(module)
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
        factory = _RUNNERS[runtime] = obj
    return factory


def create_runner(runtime: str, artifact_path, **options) -> Runner:
    """The runner for ``runtime`` over ``artifact_path``; options go to its constructor."""
    return runner_factory(runtime)(artifact_path, **options)
