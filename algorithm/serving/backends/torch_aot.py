"""Compiled PyTorch for GPUs without TensorRT: ``torch.export`` + AOTInductor -> ``model.pt2``.

The package holds the compiled kernels and the weights; ``torch._inductor.aoti_load_package``
loads it without the model's Python code (no ``algorithm.ugt`` import at serving time). Batch
and seq_len stay dynamic (``torch.export.Dim``, as in the ONNX export). The artifact is compiled
for one device type: CUDA when one is visible (or ``device="cuda"``), else CPU, and is served by
Triton's python backend through the ``torch_aot`` runner.

Seen: on this CPU (torch 2.13) compile, load and the gate pass. On an H200 with torch 2.11.0+cu130
the CUDA package compiled (67 s) but ``aoti_load_package`` crashed (SIGSEGV in ``_load_aoti``),
also in a fresh process; there, serve the eager model through the torch runner instead.

This backend compiles the PyTorch model, not the ONNX graph: ``optimize`` needs the model
(``reference_model=``) or its checkpoint (``checkpoint=``); the ONNX path, when given, only
supplies the model contract for the sidecar.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from algorithm.errors import ConfigError, InputFileNotFoundError, OptimizationError
from algorithm.serving.backends.base import Backend, artifact_sidecar
from algorithm.serving.runtime import INPUT_NAMES, register_runner

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")


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
        from algorithm.serving.export_onnx import read_sidecar

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


class TorchAOTBackend(Backend):
    name = "torch"
    artifact_suffix = ".pt2"
    artifact_name = "model.pt2"
    triton_platform = "python"
    runtime = "torch_aot"
    module = "torch"
    install = "pip install torch"
    precisions = DTYPES
    needs_onnx = False

    def runner_options(self, config) -> dict:
        return {}

    def _optimize(
        self,
        onnx_path,
        output_path,
        config,
        calibration_data=None,
        *,
        model=None,
        device: str | None = None,
        **options,
    ) -> str:
        import torch

        from algorithm.serving.export_onnx import (
            ModelInputSpec,
            ModelWrapper,
            sidecar_path,
            write_json,
        )

        if options:
            raise ConfigError("options", sorted(options), "model, device for backend torch")
        if model is None:
            raise ConfigError(
                "reference_model",
                None,
                "the PyTorch model: the torch backend compiles it, not the ONNX graph",
                hint="Pass reference_model=<UGTModel> (or checkpoint=PATH); CLI: --checkpoint PATH.",
            )
        device = _device(device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            config.precision
        ]
        first = next(model.parameters())
        restore = (first.device, first.dtype)
        # The model keeps log-softmax and beam scores in fp32 whatever its weights' dtype.
        wrapper = ModelWrapper(model.to(device, dtype).eval()).eval()
        ex = ModelInputSpec().example_inputs(
            min(2, config.max_batch_size),
            min(16, config.max_seq_length),
            config.codebook_sizes,
            ragged=True,
        )
        args = tuple(torch.from_numpy(ex[k]).to(device) for k in INPUT_NAMES)
        batch = torch.export.Dim("batch", min=1, max=config.max_batch_size)
        seq = torch.export.Dim("seq_len", min=1, max=config.max_seq_length)
        try:
            with torch.no_grad():
                exported = torch.export.export(
                    wrapper, args, dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES}
                )
                path = torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(output_path)
                )
        except Exception as e:  # export/inductor raise many types
            raise OptimizationError(
                f"torch.export/AOTInductor failed: {type(e).__name__}: {e}"
            ) from e
        finally:
            model.to(*restore)  # the caller's model, as it was (it is the gate's reference)
        write_json(
            sidecar_path(output_path),
            artifact_sidecar(
                onnx_path,
                self,
                config,
                device=device,
                torch_version=torch.__version__,
                model_config=model.config.to_dict() if hasattr(model, "config") else None,
            ),
        )
        return str(path)


TORCH_AOT = TorchAOTBackend()
register_runner("torch_aot", TorchAOTRunner)
