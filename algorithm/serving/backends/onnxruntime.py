"""ONNX Runtime backend: an offline-optimized ONNX model in fp32, fp16 or int8 (QDQ).

- fp32: the scoring rewrites (``rewrite.flatten_beam_topk``: one grouped top-k per beam step;
  ``rewrite.fold_head_bias``: head biases inside the head MatMuls), then ONNX Runtime's graph
  optimizations applied offline and saved as a model (``optimized_model_filepath``) at the
  EXTENDED level: fusions that any ONNX Runtime build runs (CPU or CUDA), without the
  hardware-specific layout transforms of ALL, so the file stays portable between machines.
- fp16: weights and activations in fp16 except the scoring path (LogSoftmax, beam-score adds,
  TopK and everything feeding ``scores``), which stays fp32, with fp32 inputs/outputs. Meant for
  GPUs (CUDA or TensorRT execution providers); ONNX Runtime's CPU kernels run it, slowly.
- int8: static QDQ quantization (``quantize_static``) of the encoder/decoder MatMuls only:
  weights per channel (int8, symmetric), activations per tensor (uint8), calibrated on
  histories of the demo distribution or the user's .npz with MinMax, Entropy or Percentile.
  Embeddings (Gather), layer norms, the output heads, LogSoftmax and TopK stay float: the
  heads' logits decide the ranking directly. The QDQ file is what is saved; ONNX Runtime fuses
  it into integer kernels at load time, and TensorRT's execution provider reads QDQ as well.
- ``ExportConfig.fp32_layers``: the ONNX nodes matching these name patterns stay float in fp16
  (blocked from the conversion) and int8 (excluded from quantization).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import tempfile
from pathlib import Path

from algorithm.errors import ConfigError, OptimizationError
from algorithm.serving.backends.base import Backend, artifact_sidecar, match_layers
from algorithm.serving.backends.calibration import (
    CALIBRATION_BATCH,
    calibration_batches,
    uniform_batches,
)
from algorithm.serving.backends.rewrite import head_matmuls

logger = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def optimize_offline(src: Path, dst: Path, level: str = "extended") -> None:
    """Run ONNX Runtime's graph optimizations once and save the optimized model."""
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise OptimizationError(f"ONNX Runtime could not optimize {src}: {e}") from e


def convert_fp16(model, keep_fp32=()):
    """fp16 weights/activations with the scoring path, TopK, the graph I/O and the nodes named
    in ``keep_fp32`` kept in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from algorithm.serving.backends.rewrite import scoring_path_nodes

    return convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=["LogSoftmax", "TopK", "Softmax", "ReduceLogSumExp"],
        node_block_list=[*scoring_path_nodes(model), *keep_fp32],
    )


def quantize_int8(
    src: Path, dst: Path, batches: list[dict], method: str, work: Path, fp32_layers=()
) -> dict:
    """Static QDQ quantization of the non-head MatMuls (those matching ``fp32_layers`` stay
    float too); returns what was quantized."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    pre = work / "preprocessed.onnx"
    # The quantizer prints progress on stdout; the library never prints.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # preprocessing is an optimization; quantize the plain model
            logger.warning(
                "quantization pre-processing failed (%s); quantizing the unprocessed model", e
            )
            pre = src
        model = onnx.load(str(pre))
        heads = head_matmuls(model)
        # The patterns were checked against the export; pre-processing may rename a few nodes.
        names = [n.name for n in model.graph.node]
        kept = sorted({n for p in fp32_layers for n in fnmatch.filter(names, p)} - set(heads))
        matmuls = [
            n.name
            for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.name not in heads and n.name not in kept
        ]
        try:
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=heads + kept,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except Exception as e:  # the quantizer raises many types
            raise OptimizationError(
                f"ONNX Runtime int8 quantization failed: {type(e).__name__}: {e}"
            ) from e
    return {
        "quantized_matmuls": len(matmuls),
        "float_heads": heads,
        "fp32_layers_kept": kept,
        "calibration_method": method,
        "calibration_batches": len(batches),
    }


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    artifact_suffix = ".onnx"
    artifact_name = "model.onnx"
    triton_platform = "onnxruntime_onnx"
    runtime = "onnxruntime"
    module = "onnxruntime"
    install = "pip install onnxruntime"
    precisions = ("fp32", "fp16", "int8")

    def _optimize(
        self,
        onnx_path,
        output_path,
        config,
        calibration_data=None,
        *,
        optimization_level: str = "extended",
        rewrite: bool = True,
        **options,
    ) -> str:
        import onnx

        from algorithm.fsutil import write_json
        from algorithm.serving.backends.rewrite import flatten_beam_topk, fold_head_bias
        from algorithm.serving.contract import sidecar_path

        if options:
            raise ConfigError(
                "options", sorted(options), "optimization_level, rewrite for backend onnxruntime"
            )
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ConfigError(
                "optimization_level", optimization_level, f"one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        precision = config.precision
        info: dict = {"optimization_level": optimization_level}
        with tempfile.TemporaryDirectory(prefix="ugt-ort-") as tmp:
            work = Path(tmp)
            model = onnx.load(str(onnx_path))
            info["flattened_beam_topk"] = flatten_beam_topk(model) if rewrite else 0
            info["folded_head_biases"] = fold_head_bias(model) if rewrite else 0
            keep = []
            if precision != "fp32" and config.fp32_layers:
                names = [n.name for n in model.graph.node]
                keep = match_layers(names, config.fp32_layers, Path(onnx_path).name)
                info["fp32_layers"] = list(config.fp32_layers)
            if precision == "fp16":
                model = convert_fp16(model, keep)
                info["fp32_layers_kept"] = keep
            stage = work / "stage.onnx"
            onnx.save(model, str(stage))
            if precision == "int8":
                batches = uniform_batches(
                    calibration_batches(calibration_data, config), CALIBRATION_BATCH
                )
                quantized = work / "int8.onnx"
                info.update(
                    quantize_int8(
                        stage,
                        quantized,
                        batches,
                        config.calibration_method,
                        work,
                        config.fp32_layers,
                    )
                )
                # Keep QDQ in the file (portable to the CUDA/TensorRT providers); fusing it into
                # integer kernels is a load-time step.
                optimize_offline(quantized, output_path, "basic")
            else:
                optimize_offline(stage, output_path, optimization_level)
        import onnxruntime as ort

        write_json(
            sidecar_path(output_path),
            artifact_sidecar(onnx_path, self, config, onnxruntime_version=ort.__version__, **info),
        )
        return str(output_path)

    def runner_options(self, config) -> dict:
        return {}


ONNXRUNTIME = OnnxRuntimeBackend()
