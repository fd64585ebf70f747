"""One ``Runner`` per runtime: ``infer(dict[str, ndarray]) -> dict[str, ndarray]``.

The accuracy gate and the Triton python-backend model both go through these, so what is
verified is exactly what is served. Heavy runtimes are imported inside the runner that needs
them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import DependencyError, InputFileNotFoundError

logger = logging.getLogger(__name__)

INPUT_NAMES = ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "attention_mask")
OUTPUT_NAMES = ("recommendations", "scores")


class Runner(Protocol):
    name: str

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def require(module: str, install: str, purpose: str = "") -> None:
    """Raise DependencyError with the install command unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise DependencyError(module, install, purpose=purpose)


def _existing(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileNotFoundError(f"artifact not found: {p}")
    return p


class TorchRunner:
    """A UGTModel (eager, optionally cast to fp16/bf16 with fp32 scoring) on CPU or CUDA."""

    name = "torch"

    def __init__(self, model, device: str = "cpu", dtype: str = "fp32"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.model = model.to(self.device, torch_dtype).eval()

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", dtype: str = "fp32") -> TorchRunner:
        from algorithm.ugt import UGTModel

        return cls(UGTModel.load(_existing(path)), device=device, dtype=dtype)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.as_tensor(np.asarray(inputs[k], dtype=np.int64), device=self.device) for k in INPUT_NAMES]
            recs, scores = self.model(*args)
        return {"recommendations": recs.cpu().numpy(), "scores": scores.float().cpu().numpy()}


class OnnxRuntimeRunner:
    """An ONNX model on ONNX Runtime (CPU by default; CUDA/TensorRT providers when present)."""

    name = "onnxruntime"

    def __init__(self, path, providers: list[str] | None = None, intra_op_threads: int = 0):
        require("onnxruntime", "pip install onnxruntime", "running ONNX models")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # The artifact is already optimized offline; don't pay for it again at load time.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(_existing(path)), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(inputs[k], dtype=np.int64) for k in self.input_names}
        recs, scores = self.session.run(list(OUTPUT_NAMES), feed)
        return {"recommendations": recs, "scores": scores.astype(np.float32, copy=False)}


_RUNNERS = {
    "torch": TorchRunner.from_checkpoint,
    "onnxruntime": OnnxRuntimeRunner,
}


def register_runner(runtime: str, factory) -> None:
    """Backends add their runner here (openvino, tensorrt, torch_aot)."""
    _RUNNERS[runtime] = factory


def create_runner(runtime: str, artifact_path, **options) -> Runner:
    """The runner for ``runtime`` over ``artifact_path``; options go to its constructor."""
    from . import backends  # noqa: F401  (registers the optional runtimes' runners)

    try:
        factory = _RUNNERS[runtime]
    except KeyError:
        from .errors import ConfigError

        raise ConfigError("runtime", runtime, f"one of {', '.join(sorted(_RUNNERS))}") from None
    return factory(artifact_path, **options)
