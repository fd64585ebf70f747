"""ONNX Runtime: an ONNX model on CPU (CUDA/TensorRT providers when present)."""

from __future__ import annotations

import logging

import numpy as np

from algorithm.errors import ConfigError
from algorithm.serving.contract import OUTPUT_NAMES
from algorithm.serving.runtime import existing, require

logger = logging.getLogger(__name__)


class OnnxRuntimeRunner:
    """An ONNX model on ONNX Runtime (CPU by default; CUDA/TensorRT providers when present)."""

    name = "onnxruntime"

    def __init__(
        self,
        path,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        rows_per_run: int | None = None,
    ):
        """``rows_per_run``: histories per ``Session.run``; a larger batch runs in slices of that
        many. None: 2 on one CPU thread, where a batch gains no parallelism and its
        ``[rows, 50, 16384]`` beam scores outgrow the caches (tiny model, seq_len 128, ms per
        history: 1.82 in slices of 2 against 2.12 whole at batch 8, 1.79 against 2.31 at 16),
        else the whole batch."""
        require("onnxruntime", "pip install onnxruntime", "running ONNX models")
        import onnxruntime as ort

        if rows_per_run is None:
            cpu_only = not providers or list(providers) == ["CPUExecutionProvider"]
            rows_per_run = 2 if intra_op_threads == 1 and cpu_only else 0
        if not isinstance(rows_per_run, int) or rows_per_run < 0:
            raise ConfigError("rows_per_run", rows_per_run, "an integer >= 0 (0: the whole batch)")
        self.rows_per_run = rows_per_run

        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # The artifact is already optimized offline; don't pay for it again at load time.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(existing(path)), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(inputs[k], dtype=np.int64) for k in self.input_names}
        rows, step = len(feed[self.input_names[0]]), self.rows_per_run
        if not step or rows <= step:
            recs, scores = self.session.run(list(OUTPUT_NAMES), feed)
        else:
            parts = [
                self.session.run(list(OUTPUT_NAMES), {k: v[i : i + step] for k, v in feed.items()})
                for i in range(0, rows, step)
            ]
            recs, scores = (np.concatenate(x) for x in zip(*parts, strict=True))
        return {"recommendations": recs, "scores": scores.astype(np.float32, copy=False)}
