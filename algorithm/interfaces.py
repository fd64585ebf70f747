"""The abstract serving-exporter interface of the module guide (section 4.2)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class ServingExporterInterface(ABC):
    """What every serving exporter offers: export, optimize, configure Triton, benchmark."""

    @abstractmethod
    def export_onnx(self, model: Any, save_path: str, config: Any = None) -> str:
        """Export ``model`` to ONNX; returns the ONNX path. Raises RuntimeError on failure."""

    @abstractmethod
    def optimize_tensorrt(self, onnx_path: str, engine_path: str, config: Any = None) -> str:
        """Build a TensorRT engine; FileNotFoundError for a missing ONNX file, RuntimeError on failure."""

    @abstractmethod
    def generate_triton_config(self, model_repository: str, config: Any = None) -> str:
        """Write the Triton model configuration; returns the config.pbtxt path."""

    @abstractmethod
    def benchmark(
        self, triton_url: str, model_name: str, num_requests: int = 10000
    ) -> dict[str, float]:
        """Measure a live model; returns throughput and latency percentiles (ms)."""
