"""AOTInductor: a compiled ``.pt2`` package run without the model's Python code."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from algorithm.errors import ConfigError, InputFileNotFoundError, OptimizationError
from algorithm.serving.contract import INPUT_NAMES, read_sidecar

logger = logging.getLogger(__name__)


def _device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", device, "cpu (no CUDA device is visible)")
    return device


class TorchAOTRunner:
    """An AOTInductor package behind ``infer()``; the model's Python code is not needed."""

    name = "torch_aot"

    def __init__(self, path, device: str | None = None, **_ignored):
        import torch

        pkg = Path(path)
        if not pkg.is_file():
            raise InputFileNotFoundError(f"AOTInductor package not found: {pkg}")

        self.torch = torch
        built_for = read_sidecar(pkg).get("device")
        self.device = torch.device(_device(device or built_for))
        if built_for and torch.device(built_for).type != self.device.type:
            raise ConfigError(
                "device",
                str(self.device),
                f"{built_for}: {pkg} was compiled for it",
                hint="AOTInductor packages are per device type; rebuild with "
                "`ugt-serving optimize --backend torch` on the serving machine.",
            )
        try:
            self.module = torch._inductor.aoti_load_package(str(pkg))
        except Exception as e:  # torch raises several types on a foreign or corrupt package
            raise OptimizationError(f"could not load AOTInductor package {pkg}: {e}") from e

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [
            torch.as_tensor(np.asarray(inputs[k], dtype=np.int64), device=self.device)
            for k in INPUT_NAMES
        ]
        with torch.inference_mode():
            recs, scores = self.module(*args)
        return {
            "recommendations": recs.to(torch.int64).cpu().numpy(),
            "scores": scores.float().cpu().numpy(),
        }
