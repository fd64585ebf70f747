"""OpenVINO backend (optional extra): ONNX -> OpenVINO IR (model.xml + model.bin), and its runner.

- The same exact scoring rewrite as ONNX Runtime (``rewrite.flatten_beam_topk``) before
  ``openvino.convert_model``; ``save_model`` writes the IR.
- fp32 (default): fp32 weights. The runner always sets ``INFERENCE_PRECISION_HINT``
  explicitly: OpenVINO's CPU default on processors with bf16 support is bf16, which changed
  about 40% of a random model's top-50 on the development machine (seen).
- fp16 / bf16: fp16 weights in the IR (fp16) and inference in the requested precision for the
  whole network, scoring included: OpenVINO's Python API offers no per-node precision pin that
  survives ``save_model`` or that the CPU plugin honours (``disable_fp16_compression`` rt_info
  set from Python changed nothing, seen), so the accuracy gate is the safeguard. On this CPU
  (AVX512-BF16, no native fp16) the f16 hint ran exactly as bf16 (seen).
- int8: NNCF post-training quantization (``nncf.quantize``, transformer preset) calibrated on
  the same histories as the other backends, with the heads, the scoring path and the nodes
  matching ``ExportConfig.fp32_layers`` ignored. fp16/bf16 refuse ``fp32_layers`` (no per-layer
  pin, see above) instead of ignoring it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from algorithm.errors import ConfigError, OptimizationError
from algorithm.serving.backends.base import Backend, artifact_sidecar, match_layers
from algorithm.serving.backends.calibration import calibration_batches
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.openvino import HINTS, INSTALL, _openvino

logger = logging.getLogger(__name__)


def _fp32_node_names(onnx_model) -> list[str]:
    from algorithm.serving.backends.rewrite import head_matmuls, scoring_path_nodes

    producer = {o: n for n in onnx_model.graph.node for o in n.output}
    names = set(scoring_path_nodes(onnx_model)) | set(head_matmuls(onnx_model))
    # The heads' bias adds sit between the MatMul and LogSoftmax.
    for n in onnx_model.graph.node:
        if n.op_type == "LogSoftmax" and n.input[0] in producer:
            names.add(producer[n.input[0]].name)
    return sorted(names)


class OpenVINOBackend(Backend):
    name = "openvino"
    artifact_suffix = ".xml"
    artifact_name = "model.xml"
    triton_platform = "openvino"
    runtime = "openvino"
    module = "openvino"
    install = INSTALL
    precisions = ("fp32", "fp16", "bf16", "int8")

    def artifact_files(self, artifact) -> list[Path]:
        xml = Path(artifact)
        return [xml.with_suffix(".bin"), xml]

    def runner_options(self, config) -> dict:
        return {"precision": config.precision}

    def _optimize(
        self,
        onnx_path,
        output_path,
        config,
        calibration_data=None,
        *,
        rewrite: bool = True,
        **options,
    ) -> str:
        import onnx

        from algorithm.fsutil import write_json
        from algorithm.serving.backends.rewrite import flatten_beam_topk
        from algorithm.serving.contract import sidecar_path

        if options:
            raise ConfigError("options", sorted(options), "rewrite for backend openvino")
        ov = _openvino()
        precision = config.precision
        info: dict = {
            "openvino_version": ov.__version__,
            "inference_precision_hint": HINTS[precision],
        }
        model = onnx.load(str(onnx_path))
        info["flattened_beam_topk"] = flatten_beam_topk(model) if rewrite else 0
        keep = _fp32_node_names(model) if precision == "int8" else []
        if config.fp32_layers and precision in ("fp16", "bf16"):
            raise ConfigError(
                "fp32_layers",
                config.fp32_layers,
                f"empty for OpenVINO {precision}: its CPU plugin honours no per-layer precision "
                "(int8 keeps the named layers float, as does the TensorRT or ONNX Runtime backend)",
            )
        if config.fp32_layers and precision == "int8":
            names = [n.name for n in model.graph.node]
            user = match_layers(names, config.fp32_layers, Path(onnx_path).name)
            keep = sorted(set(keep) | set(user))
            info["fp32_layers"] = list(config.fp32_layers)
        with tempfile.TemporaryDirectory(prefix="ugt-ov-") as tmp:
            src = Path(tmp) / "model.onnx"
            onnx.save(model, str(src))
            try:
                ov_model = ov.convert_model(str(src))
            except Exception as e:  # the frontends raise several types
                raise OptimizationError(f"OpenVINO could not convert {onnx_path}: {e}") from e
        if precision == "int8":
            ov_model, qinfo = self._quantize(
                ov_model, calibration_batches(calibration_data, config), keep
            )
            info.update(qinfo)
        ov.save_model(ov_model, str(output_path), compress_to_fp16=precision == "fp16")
        write_json(sidecar_path(output_path), artifact_sidecar(onnx_path, self, config, **info))
        return str(output_path)

    @staticmethod
    def _quantize(ov_model, batches: list[dict], keep: list[str]):
        from algorithm.serving.runtime import require

        require("nncf", INSTALL, "OpenVINO int8 (NNCF post-training quantization)")
        import nncf

        scope = nncf.IgnoredScope(names=keep, types=["LogSoftmax", "TopK"], validate=False)
        samples = sum(len(b[INPUT_NAMES[0]]) for b in batches)
        # NNCF draws progress bars on stdout and logs each ignored node at INFO; the library
        # never prints, so both are muted for the call (and the logger's level restored).
        nncf_logger = logging.getLogger("nncf")
        level = nncf_logger.level
        nncf_logger.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                quantized = nncf.quantize(
                    ov_model,
                    nncf.Dataset(batches),
                    subset_size=len(batches),
                    model_type=nncf.ModelType.TRANSFORMER,
                    ignored_scope=scope,
                )
            except Exception as e:  # nncf raises many types
                raise OptimizationError(
                    f"NNCF int8 quantization failed: {type(e).__name__}: {e}"
                ) from e
            finally:
                nncf_logger.setLevel(level)
        import importlib.metadata

        return quantized, {
            "nncf_version": importlib.metadata.version("nncf"),
            "calibration_batches": len(batches),
            "calibration_samples": samples,
            "float_nodes": len(keep),
        }


OPENVINO = OpenVINOBackend()
