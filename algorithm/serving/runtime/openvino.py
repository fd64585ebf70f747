"""OpenVINO: an IR (``model.xml`` + ``.bin``) on a device with an explicit inference precision."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from algorithm.errors import ConfigError, InputFileNotFoundError, OptimizationError
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime import require

logger = logging.getLogger(__name__)
INSTALL = "pip install 'ugt-serving[openvino]'"
HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}


def _openvino():

    require("openvino", INSTALL, "the OpenVINO backend")
    import openvino as ov

    return ov


class OpenVINORunner:
    """An OpenVINO IR on a device (CPU by default) with an explicit inference precision."""

    name = "openvino"

    def __init__(
        self, path, device: str = "CPU", precision: str = "fp32", threads: int = 0, **_ignored
    ):
        ov = _openvino()
        xml = Path(path)
        if not xml.is_file():
            raise InputFileNotFoundError(f"OpenVINO IR not found: {xml}")
        if precision not in HINTS:
            raise ConfigError("precision", precision, f"one of {', '.join(HINTS)}")
        props = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            self.compiled = core.compile_model(str(xml), device, props)
        except RuntimeError as e:
            raise OptimizationError(f"OpenVINO could not compile {xml} for {device}: {e}") from e
        self.request = self.compiled.create_infer_request()
        self.outputs = {o.get_any_name(): o for o in self.compiled.outputs}
        self.precision = precision

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(inputs[k], dtype=np.int64) for k in INPUT_NAMES}
        result = self.request.infer(feed)
        return {
            "recommendations": np.array(result[self.outputs["recommendations"]], dtype=np.int64),
            "scores": np.array(result[self.outputs["scores"]], dtype=np.float32),
        }
