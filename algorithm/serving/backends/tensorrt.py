"""The TensorRT backend (``optimize_trt.TensorRTOptimizer`` behind the Backend interface) and its runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from algorithm.errors import InputFileNotFoundError, OptimizationError
from algorithm.serving.backends.base import Backend
from algorithm.serving.optimize_trt import (
    TRT_INSTALL,
    CapturingLogger,
    TensorRTOptimizer,
    check_plan_compatible,
    import_tensorrt,
    profile_for_shape,
)
from algorithm.serving.runtime import INPUT_NAMES, OUTPUT_NAMES, register_runner


class TensorRTBackend(Backend):
    name = "tensorrt"
    artifact_suffix = ".plan"
    artifact_name = "model.plan"
    triton_platform = "tensorrt_plan"
    runtime = "tensorrt"
    module = "tensorrt"
    install = TRT_INSTALL
    precisions = ("fp32", "fp16", "bf16", "int8")

    def _optimize(self, onnx_path, output_path, config, calibration_data, **options) -> str:
        if options:
            from algorithm.errors import ConfigError

            raise ConfigError(
                "options", sorted(options), "no extra options for the tensorrt backend"
            )
        return TensorRTOptimizer(config).optimize(onnx_path, output_path, calibration_data)


class TensorRTRunner:
    """A TensorRT plan behind ``infer()``: picks the profile that fits each request's shape."""

    name = "tensorrt"

    def __init__(self, path, device: int | str = 0, check_compatible: bool = True, **_ignored):
        import torch

        if isinstance(device, str):  # "cuda:1", "cuda", "1"
            device = (
                int(device.rpartition(":")[2] or 0) if device.rpartition(":")[2].isdigit() else 0
            )

        trt = import_tensorrt()
        plan = Path(path)
        if not plan.is_file():
            raise InputFileNotFoundError(f"TensorRT plan not found: {plan}")
        meta = check_plan_compatible(plan) if check_compatible else {}
        self.torch, self.device = torch, torch.device("cuda", device)
        self.logger = CapturingLogger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise OptimizationError(
                f"TensorRT could not load {plan}:\n" + "\n".join(self.logger.errors[-10:])
            )
        self.context = self.engine.create_execution_context()
        self.profiles = meta.get("profiles") or [
            {"min": tuple(s[0]), "opt": tuple(s[1]), "max": tuple(s[2])}
            for s in (
                self.engine.get_tensor_profile_shape(INPUT_NAMES[0], i)
                for i in range(self.engine.num_optimization_profiles)
            )
        ]
        self.stream = torch.cuda.Stream(self.device)
        self.dtypes = {
            np.dtype(np.int64): torch.int64,
            np.dtype(np.float32): torch.float32,
            np.dtype(np.int32): torch.int32,
        }
        self.trt = trt
        self.current_profile = -1

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt, ctx = self.torch, self.trt, self.context
        b, s = np.shape(inputs[INPUT_NAMES[0]])
        profile = profile_for_shape(self.profiles, int(b), int(s))
        with torch.cuda.stream(self.stream):
            if profile != self.current_profile:
                ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
                self.current_profile = profile
            keep = []
            for name in INPUT_NAMES:
                t = torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=np.int64)).to(
                    self.device, non_blocking=True
                )
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            outs = {}
            for name in OUTPUT_NAMES:
                shape = tuple(ctx.get_tensor_shape(name))
                dtype = self.dtypes[np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))]
                outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                ctx.set_tensor_address(name, outs[name].data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise OptimizationError(
                    "TensorRT execution failed: " + "\n".join(self.logger.errors[-5:])
                )
        self.stream.synchronize()
        return {
            "recommendations": outs["recommendations"].to(torch.int64).cpu().numpy(),
            "scores": outs["scores"].float().cpu().numpy(),
        }


TENSORRT = TensorRTBackend()
register_runner("tensorrt", TensorRTRunner)
