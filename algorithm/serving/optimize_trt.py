"""ONNX -> TensorRT engine (guide 3.3, 4.2, 5.4) with the real ``tensorrt`` >= 10 API.

What the build does: parse the ONNX file (every parser error is reported), one optimization
profile per sequence-length bucket from the ExportConfig's min/opt/max batch and seq_len,
fp32/fp16/bf16/int8 (int8 calibrated by an entropy or min-max calibrator fed with histories of
the demo distribution, with a calibration cache), the scoring layers (log-softmax, beam-score
adds, TopK inputs) pinned to fp32, a timing cache reused across builds, the plan written
atomically, and a sidecar ``<plan>.json`` (TensorRT version, GPU and compute capability,
precision, profiles, build time) that ``check_plan_compatible`` reads before a plan is loaded.

``tensorrt`` is imported only inside the functions that build or run an engine; the profile,
calibration and trtexec logic here runs (and is tested) without it.
"""

from __future__ import annotations

import logging

from algorithm.serving.backends.calibration import (  # noqa: F401  (public here: guide 3.3, 5.4)
    CalibrationDataGenerator,
    create_calibration_data_generator,
)
from algorithm.serving.backends.tensorrt import (  # noqa: F401  (public here: guide 3.3)
    TRT_CALIBRATORS,
    build_engine,
    optimization_profiles,
    trtexec_command,
)
from algorithm.serving.config import ExportConfig
from algorithm.serving.runtime.tensorrt import (  # noqa: F401  (public here: guide 3.3)
    TRT_INSTALL,
    check_plan_compatible,
    gpu_environment,
    import_tensorrt,
)

logger = logging.getLogger(__name__)


class TensorRTOptimizer:
    """ONNX -> serialized TensorRT engine (``.plan``) for ``config.precision`` (guide 3.3).

    The build itself is ``backends.tensorrt.build_engine``; ``optimize`` is the guide's face of
    it, without the accuracy gate that ``backends.optimize("tensorrt", ...)`` adds.
    """

    def __init__(self, config: ExportConfig | None = None):
        self.config = (config or ExportConfig()).validate()

    def optimize(self, onnx_path, engine_path, calibration_data=None) -> str:
        """Build and write the engine; returns its path.

        Raises InputFileNotFoundError (a FileNotFoundError) for a missing ONNX file,
        OptimizationError (a RuntimeError) when parsing or building fails, DependencyError
        when tensorrt is not installed.
        """
        return build_engine(onnx_path, engine_path, self.config, calibration_data)


def build_trt_engine(onnx_path, engine_path, config: ExportConfig | None = None) -> str:
    """The guide's convenience function: ``TensorRTOptimizer(config).optimize(onnx_path, engine_path)``."""
    return TensorRTOptimizer(config).optimize(onnx_path, engine_path)
