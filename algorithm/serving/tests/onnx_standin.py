"""A tiny ONNX file with the UGT contract's inputs and outputs (no model inside).

It parses and passes ``onnx.checker`` like a real export, so tests of publishing and validation
use it where the model itself does not matter (seconds instead of an export). ``tag`` goes into
the graph's constants, so versions built from different tags differ in their bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from algorithm.serving.contract import INPUT_NAMES


def write_standin_onnx(path, tag: bytes = b"", k: int = 50, size: int = 0) -> Path:
    """``size``: about that many bytes of extra (unused) weights, for tests that need a big file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    seed = int.from_bytes(tag[:4].ljust(4, b"\0"), "little") if tag else 0
    recs = np.full((1, k, 3), seed % 1024, dtype=np.int64)
    scores = np.zeros((1, k), dtype=np.float32)
    pad = [numpy_helper.from_array(np.zeros(size // 4, np.float32), "pad")] if size else []
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["recs_const"], ["recommendations"]),
            helper.make_node("Identity", ["scores_const"], ["scores"]),
        ],
        "ugt_standin",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq_len"])
            for n in INPUT_NAMES
        ],
        [
            helper.make_tensor_value_info("recommendations", TensorProto.INT64, ["batch", k, 3]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", k]),
        ],
        [
            numpy_helper.from_array(recs, "recs_const"),
            numpy_helper.from_array(scores, "scores_const"),
            *pad,
        ],
        doc_string=tag.decode("latin-1"),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path
