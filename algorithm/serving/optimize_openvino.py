"""ONNX -> OpenVINO IR (guide 10.1): ``OpenVINOOptimizer(config).optimize(onnx_path, output_dir)``.

The guide's face of the OpenVINO backend (``backends/openvino.py``): the same build as
``ugt-serving optimize --backend openvino`` and ``backends.optimize(..., "openvino")``, behind the
same accuracy gate (recall@K overlap and score error against the fp32 reference, thresholds
from the ExportConfig), published atomically as ``<output_dir>/model.xml`` + ``model.bin`` with
the sidecar ``model.xml.json`` and the report ``model.xml.accuracy.json``.

The guide's sketch calls ``openvino.tools.mo`` (the Model Optimizer, removed in OpenVINO 2025);
the backend uses ``openvino.convert_model`` + ``save_model``, its replacement. ``fp16`` stores
fp16 weights as ``compress_to_fp16`` does; ``int8`` is NNCF post-training quantization.
"""

from __future__ import annotations

import logging
from pathlib import Path

from algorithm.errors import ConfigError
from algorithm.serving.backends import optimize as optimize_artifact
from algorithm.serving.backends.openvino import OPENVINO
from algorithm.serving.config import ExportConfig

logger = logging.getLogger(__name__)


class OpenVINOOptimizer:
    """ONNX -> OpenVINO IR for ``config.precision`` (fp32, fp16, bf16, int8), gated for accuracy."""

    def __init__(self, config: ExportConfig | None = None):
        self.config = (config or ExportConfig()).validate()

    def optimize(
        self,
        onnx_path,
        output_dir,
        calibration_data=None,
        *,
        reference_model=None,
    ) -> str:
        """Convert, gate and publish; returns the path of ``<output_dir>/model.xml``.

        ``output_dir`` is a folder (created if missing). ``reference_model`` (a UGTModel) is the
        gate's fp32 reference; without it the ONNX model under ONNX Runtime fp32 is.
        ``calibration_data`` feeds int8 (a calibration generator, batches or an .npz; default:
        histories of the demo distribution). Raises InputFileNotFoundError (a
        FileNotFoundError), DependencyError (openvino/nncf missing, with the install command),
        OptimizationError or ParityError (the gate refused it: nothing is written).
        """
        out = Path(output_dir)
        if out.suffix == OPENVINO.artifact_suffix:
            raise ConfigError(
                "output_dir",
                str(out),
                "a folder (the guide's signature); model.xml and model.bin are written into it",
            )
        path = optimize_artifact(
            onnx_path,
            out / OPENVINO.artifact_name,
            OPENVINO.name,
            self.config,
            calibration_data,
            reference_model=reference_model,
        )
        logger.info("OpenVINO IR at %s", path)
        return path


__all__ = ["OpenVINOOptimizer"]
