"""What every optimizer backend declares, and the calibration data they share.

A backend turns the exported ONNX model into one artifact that a Triton platform (or the
python backend through a Runner) serves. It declares the artifact it writes, the platform that
serves it, the runner that runs it for the accuracy gate, and whether its library is installed
(found with ``importlib.util.find_spec``, never imported for the check).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import importlib.util
import logging
from pathlib import Path
from typing import Any

from algorithm.errors import ConfigError
from algorithm.serving.config import ExportConfig

logger = logging.getLogger(__name__)


class Backend:
    """Base of the optimizer backends; subclasses set the class attributes and ``_optimize``."""

    name: str = ""
    artifact_suffix: str = ""
    artifact_name: str = ""  # Triton's default file name for the platform
    triton_platform: str = ""
    runtime: str = ""  # the runner name for runtime.create_runner
    module: str = ""  # the Python package that must be importable
    install: str = ""
    precisions: tuple[str, ...] = ("fp32",)
    needs_onnx: bool = True

    def is_available(self) -> bool:
        """Whether the backend's library can be imported (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise ConfigError(
                "precision",
                precision,
                f"one of {', '.join(self.precisions)} for backend {self.name}",
            )

    def optimize(
        self, onnx_path, output_path, config: ExportConfig, calibration_data=None, **options
    ) -> str:
        """Write the artifact for ``config.precision`` at ``output_path``; returns its path.

        This is the optimizer alone; ``algorithm.serving.backends.optimize`` adds the accuracy
        gate and the atomic publish.
        """
        config = config.validate()
        self.check_precision(config.precision)
        return self._optimize(
            Path(onnx_path) if onnx_path else None,
            Path(output_path),
            config,
            calibration_data,
            **options,
        )

    def _optimize(self, onnx_path, output_path, config, calibration_data, **options) -> str:
        raise NotImplementedError

    def artifact_files(self, artifact) -> list[Path]:
        """Every file that makes up the artifact (OpenVINO: .xml and .bin); the main file last."""
        return [Path(artifact)]

    def runner_options(self, config: ExportConfig) -> dict[str, Any]:
        """Options for ``create_runner(self.runtime, artifact, **options)`` matching the artifact."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "artifact_name": self.artifact_name,
            "triton_platform": self.triton_platform,
            "runtime": self.runtime,
            "precisions": list(self.precisions),
            "available": self.is_available(),
            "install": self.install,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def artifact_sidecar(onnx_path, backend: Backend, config: ExportConfig, **extra) -> dict[str, Any]:
    """The ONNX model's contract (its sidecar) plus what this backend built, for ``<artifact>.json``."""
    from algorithm.serving.contract import read_sidecar

    base = read_sidecar(onnx_path) if onnx_path else {}
    return {
        **base,
        "format": "ugt-serving/artifact-sidecar",
        "backend": backend.name,
        "runtime": backend.runtime,
        "triton_platform": backend.triton_platform,
        "precision": config.precision,
        "source_onnx": str(onnx_path) if onnx_path else None,
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def match_layers(names, patterns, where: str = "the network") -> list[str]:
    """The names matching any of ``patterns`` (``ExportConfig.fp32_layers``: fnmatch's "*" and
    "?"), in their order. A pattern that matches no name raises ConfigError naming it, with a
    few of the names it could have meant: a typo must not silently leave a layer in fp16."""
    names = list(names)
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ConfigError(
                "fp32_layers",
                pattern,
                f"a pattern ('*', '?') matching a layer name of {where}, e.g. {sample}",
                hint='List the names with `python -c "import onnx; '
                "print([n.name for n in onnx.load('model.onnx').graph.node])\"`.",
            )
        matched.update(hits)
    return [n for n in names if n in matched]
