"""torch -> ONNX: dynamic batch and seq_len, graph checks, a sidecar, and a parity check.

The sidecar (``<model>.onnx.json``) records the model contract (input/output names, dtypes,
codebook sizes, K, max_seq_length); later stages and ``validate_deployment`` read it instead of
guessing. The parity report (``<model>.parity.json``) is ONNX Runtime against PyTorch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from algorithm.errors import ConfigError, ExportError
from algorithm.fsutil import copy_atomic, write_json
from algorithm.serving.config import ExportConfig
from algorithm.serving.contract import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    ModelInputSpec,
    parity_report_path,
    sidecar_path,
)
from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.runtime.torch import (
    ModelWrapper,  # noqa: F401  (public here, guide 3.2)
    TorchRunner,
)
from algorithm.serving.verify.parity import compare_outputs, enforce, merge_reports

logger = logging.getLogger(__name__)

FORBIDDEN_OPS = ("Loop", "If", "Scan")


def check_graph(model_proto) -> dict:
    """onnx.checker plus the serving rules: no control flow, TopK with a constant K."""
    import onnx

    try:
        onnx.checker.check_model(model_proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from e
    ops = [n.op_type for n in model_proto.graph.node]
    bad = sorted({o for o in ops if o in FORBIDDEN_OPS})
    if bad:
        raise ExportError(
            f"the exported graph has control-flow nodes {bad}; the beam search must be unrolled"
        )
    constants = {i.name for i in model_proto.graph.initializer}
    constants |= {o for n in model_proto.graph.node if n.op_type == "Constant" for o in n.output}
    for n in model_proto.graph.node:
        if n.op_type == "TopK" and n.input[1] not in constants:
            raise ExportError(
                f"TopK node {n.name!r} has a data-dependent K ({n.input[1]}); K must be constant"
            )
    names_in = [i.name for i in model_proto.graph.input]
    names_out = [o.name for o in model_proto.graph.output]
    if tuple(names_in) != INPUT_NAMES or tuple(names_out) != OUTPUT_NAMES:
        raise ExportError(
            f"graph io {names_in} -> {names_out} differs from {INPUT_NAMES} -> {OUTPUT_NAMES}"
        )
    return {
        "nodes": len(ops),
        "topk": ops.count("TopK"),
        "opset": model_proto.opset_import[0].version,
    }


class ONNXExporter:
    """Exports a UGT model to ONNX and checks it against PyTorch."""

    def __init__(self, config: ExportConfig | None = None):
        self.config = (config or ExportConfig()).validate()
        self.input_spec = ModelInputSpec()

    def _check_model_matches(self, model) -> None:
        mc = getattr(model, "config", None)
        if mc is None:
            return
        cfg = self.config
        if tuple(mc.codebook_sizes) != tuple(cfg.codebook_sizes):
            raise ConfigError(
                "codebook_sizes",
                cfg.codebook_sizes,
                f"the model's {tuple(mc.codebook_sizes)}",
                hint="Set ExportConfig(codebook_sizes=...) to the model's codebooks.",
            )
        if mc.num_recommendations != cfg.num_recommendations:
            raise ConfigError(
                "num_recommendations",
                cfg.num_recommendations,
                f"the model's K={mc.num_recommendations}",
                hint="K is baked into the graph's beam search; set ExportConfig(num_recommendations=...) to it.",
            )
        if cfg.max_seq_length > mc.max_seq_length:
            raise ConfigError(
                "max_seq_length",
                cfg.max_seq_length,
                f"<= the model's max_seq_length={mc.max_seq_length}",
            )

    def export(self, model, save_path, verify: bool | None = None) -> str:
        """Export to ``save_path`` (written atomically); returns the path. Raises ExportError/ParityError."""
        import torch

        cfg = self.config
        verify = cfg.verify if verify is None else verify
        self._check_model_matches(model)
        save_path = Path(save_path)
        model = model.eval().float()
        wrapper = ModelWrapper(model).eval()
        ex = self.input_spec.example_inputs(
            min(2, cfg.max_batch_size), min(16, cfg.max_seq_length), cfg.codebook_sizes, ragged=True
        )
        args = tuple(torch.from_numpy(ex[k]) for k in INPUT_NAMES)
        batch = torch.export.Dim("batch", min=1, max=cfg.max_batch_size)
        seq = torch.export.Dim("seq_len", min=1, max=cfg.max_seq_length)
        dynamic_shapes = {n: {0: batch, 1: seq} for n in INPUT_NAMES}
        with tempfile.TemporaryDirectory(prefix="ugt-export-") as tmp:
            raw = Path(tmp) / "model.onnx"
            logger.info("exporting to ONNX (opset %d)", cfg.opset_version)
            try:
                # The exporter prints progress on stdout; the library never prints.
                with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                    torch.onnx.export(
                        wrapper,
                        args,
                        str(raw),
                        input_names=list(INPUT_NAMES),
                        output_names=list(OUTPUT_NAMES),
                        dynamic_shapes=dynamic_shapes,
                        opset_version=cfg.opset_version,
                        dynamo=True,
                        optimize=cfg.do_constant_folding,
                        external_data=False,
                    )
            except Exception as e:  # the exporter raises many unrelated types
                raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
            final = self._simplify(raw)
            import onnx

            info = check_graph(onnx.load(str(final)))
            copy_atomic(final, save_path)
        logger.info("wrote %s (%d nodes)", save_path, info["nodes"])
        write_json(sidecar_path(save_path), self._sidecar(model, info))
        if verify:
            self.verify(model, save_path)
        return str(save_path)

    def _simplify(self, path: Path) -> Path:
        import importlib.util

        if importlib.util.find_spec("onnxslim") is None:
            logger.info("onnxslim not installed; skipping simplification")
            return path
        import onnxslim

        out = path.with_name("model.slim.onnx")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                onnxslim.slim(str(path), str(out))
        except Exception as e:  # simplification is an optimization: keep the valid graph
            logger.warning("onnxslim failed (%s); keeping the unsimplified graph", e)
            return path
        return out

    def _sidecar(self, model, info: dict) -> dict:
        import torch

        cfg = self.config
        mc = getattr(model, "config", None)
        return {
            "format": "ugt-serving/onnx-sidecar",
            "model_name": cfg.model_name,
            "inputs": [
                {"name": n, "dtype": "int64", "shape": ["batch", "seq_len"]} for n in INPUT_NAMES
            ],
            "outputs": [
                {
                    "name": "recommendations",
                    "dtype": "int64",
                    "shape": ["batch", cfg.num_recommendations, 3],
                },
                {"name": "scores", "dtype": "float32", "shape": ["batch", cfg.num_recommendations]},
            ],
            "codebook_sizes": list(cfg.codebook_sizes),
            "num_recommendations": cfg.num_recommendations,
            "max_batch_size": cfg.max_batch_size,
            "max_seq_length": cfg.max_seq_length,
            "model_config": mc.to_dict() if mc is not None and hasattr(mc, "to_dict") else None,
            "graph": info,
            "torch_version": torch.__version__,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def parity_cases(self) -> dict[str, dict[str, np.ndarray]]:
        """Fresh random inputs at the shapes the issue names: 1x1, max batch, long, ragged."""
        cfg, spec = self.config, self.input_spec
        cb = cfg.codebook_sizes
        seed = int.from_bytes(os.urandom(4), "little")
        return {
            "batch1_seq1": spec.example_inputs(1, 1, cb, seed),
            f"batch{cfg.max_batch_size}": spec.example_inputs(
                cfg.max_batch_size, min(32, cfg.max_seq_length), cb, seed + 1
            ),
            f"seq{cfg.max_seq_length}": spec.example_inputs(2, cfg.max_seq_length, cb, seed + 2),
            "ragged": spec.example_inputs(
                min(8, cfg.max_batch_size), min(64, cfg.max_seq_length), cb, seed + 3, ragged=True
            ),
        }

    def verify(self, model, onnx_path) -> dict:
        """ONNX Runtime vs PyTorch on fresh inputs; writes ``<stem>.parity.json``; ParityError if outside."""
        ref, cand = TorchRunner(model), OnnxRuntimeRunner(onnx_path)
        cases = {
            name: compare_outputs(ref.infer(x), cand.infer(x))
            for name, x in self.parity_cases().items()
        }
        report = merge_reports(cases)
        report["runtime"] = "onnxruntime"
        path = parity_report_path(onnx_path)
        try:
            enforce(
                report,
                self.config.parity_min_recall,
                self.config.parity_max_score_diff,
                "the ONNX model",
            )
        finally:
            write_json(path, report)
        logger.info("parity ok: %s", report["worst"])
        return report


def export_to_onnx(
    model, save_path, config: ExportConfig | None = None, verify: bool | None = None
) -> str:
    """Export ``model`` to ONNX at ``save_path`` with ``config``; returns the path."""
    return ONNXExporter(config).export(model, save_path, verify=verify)
