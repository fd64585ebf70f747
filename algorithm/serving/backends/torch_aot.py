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

from algorithm.errors import ConfigError, OptimizationError
from algorithm.serving.backends.base import Backend, artifact_sidecar
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.torch_aot import _device

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")


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

        from algorithm.fsutil import write_json
        from algorithm.serving.contract import ModelInputSpec, sidecar_path
        from algorithm.serving.runtime.torch import ModelWrapper

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
