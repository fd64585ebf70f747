"""TensorRT at run time: the library check, whether a plan can run on this machine (its sidecar
names the TensorRT version and GPU that built it), and the runner that executes a plan with the
optimization profile that fits each request. The build lives in ``backends/tensorrt.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from algorithm.errors import ConfigError, DependencyError, InputFileNotFoundError, OptimizationError
from algorithm.serving.contract import INPUT_NAMES, OUTPUT_NAMES, read_sidecar, sidecar_path

logger = logging.getLogger(__name__)


TRT_INSTALL = "pip install 'ugt-serving[tensorrt]' (or tensorrt>=10 from NVIDIA; needs a CUDA GPU)"


def import_tensorrt():
    """``tensorrt`` >= 10, or DependencyError naming the package and the extra."""
    if importlib.util.find_spec("tensorrt") is None:
        raise DependencyError(
            "tensorrt", TRT_INSTALL, purpose="building and running TensorRT engines"
        )
    import tensorrt as trt

    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise DependencyError(
            f"tensorrt>=10 (found {trt.__version__})", TRT_INSTALL, purpose="the TensorRT 10 API"
        )
    return trt


def profile_for_shape(profiles: list[dict], batch: int, seq_len: int) -> int:
    """Index of the first profile that accepts ``[batch, seq_len]``; ConfigError when none does."""
    for i, p in enumerate(profiles):
        if p["min"][0] <= batch <= p["max"][0] and p["min"][1] <= seq_len <= p["max"][1]:
            return i
    spans = ", ".join(f"{p['min']}..{p['max']}" for p in profiles)
    raise ConfigError(
        "input shape", (batch, seq_len), f"within one engine profile (batch, seq_len): {spans}"
    )


# ------------------------------------------------------------------------------ build
class CapturingLogger:
    """A trt.ILogger that keeps errors for the exception message and forwards to logging."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(msg)
                    logger.error("tensorrt: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    logger.warning("tensorrt: %s", msg)
                else:
                    logger.debug("tensorrt: %s", msg)

        return Logger()


def gpu_environment() -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine (what a plan is bound to)."""
    env: dict[str, Any] = {"tensorrt_version": None, "gpu_name": None, "compute_capability": None}
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt as trt

        env["tensorrt_version"] = str(trt.__version__)
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            env["gpu_name"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = f"{major}.{minor}"
            return env
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
        if out:
            name, cc = (s.strip() for s in out[0].split(",", 1))
            env["gpu_name"], env["compute_capability"] = name, cc
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return env


def check_plan_compatible(plan_path, environment: dict | None = None) -> dict:
    """Refuse a plan built for another GPU or TensorRT version; returns its sidecar.

    A serialized engine only loads on the TensorRT version that built it and runs on GPUs of
    the same compute capability; the sidecar written at build time says which, so the
    mismatch is reported here instead of as an opaque deserialization failure in Triton.
    """

    plan = Path(plan_path)
    if not plan.is_file():
        raise InputFileNotFoundError(f"TensorRT plan not found: {plan}")
    meta = read_sidecar(plan)
    rebuild = (
        f"Rebuild it on the serving machine: ugt-serving optimize --backend tensorrt --output {plan}"
        " (or run the command from --emit-trtexec inside the Triton container)."
    )
    if not meta.get("tensorrt_version"):
        raise OptimizationError(
            f"{sidecar_path(plan)} is missing or has no tensorrt_version: cannot tell which GPU and TensorRT built {plan}",
            hint=rebuild,
        )
    env = environment or gpu_environment()
    problems = []
    if env.get("tensorrt_version") and env["tensorrt_version"] != meta["tensorrt_version"]:
        problems.append(
            f"TensorRT {meta['tensorrt_version']} built it, this machine has {env['tensorrt_version']}"
        )
    if (
        env.get("compute_capability")
        and meta.get("compute_capability")
        and env["compute_capability"] != meta["compute_capability"]
    ):
        problems.append(
            f"it was built for {meta.get('gpu_name')} (compute capability {meta['compute_capability']}), "
            f"this GPU is {env.get('gpu_name')} (compute capability {env['compute_capability']})"
        )
    if problems:
        raise OptimizationError(
            f"TensorRT plan {plan} cannot run here: " + "; ".join(problems), hint=rebuild
        )
    if env.get("gpu_name") and meta.get("gpu_name") and env["gpu_name"] != meta["gpu_name"]:
        logger.warning(
            "plan %s was tuned on %s, running on %s (same compute capability)",
            plan,
            meta["gpu_name"],
            env["gpu_name"],
        )
    return meta


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
