"""Optimizer backends, their registry, and ``optimize``: build an artifact behind the accuracy gate.

Backends (``get_backend(name)``):

=============  ==============  ===================  ===========  =============================
name           artifact        Triton platform      runner       library
=============  ==============  ===================  ===========  =============================
tensorrt       model.plan      tensorrt_plan        tensorrt     tensorrt >= 10 (GPU)
onnxruntime    model.onnx      onnxruntime_onnx     onnxruntime  onnxruntime
openvino       model.xml/.bin  openvino             openvino     openvino (+ nncf for int8)
torch          model.pt2       python               torch_aot    torch (AOTInductor)
=============  ==============  ===================  ===========  =============================

``optimize`` builds the artifact in a staging folder beside the output, runs the accuracy gate
(``verify.accuracy.evaluate``) on it through the same Runner that serves it, and only then moves it into
place with its sidecar ``<artifact>.json`` and report ``<artifact>.accuracy.json``. An artifact
that fails the gate raises ParityError (the report is on the exception) and leaves nothing
behind; an artifact already at the output path stays untouched.

Each backend's runner lives in ``runtime/`` (the registry there finds it by name); importing
this package imports no optional library.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from algorithm.errors import (
    ConfigError,
    DependencyError,
    InputFileNotFoundError,
    OptimizationError,
    ParityError,
)
from algorithm.fsutil import created_dirs, write_json
from algorithm.serving.backends.base import Backend, artifact_sidecar
from algorithm.serving.backends.calibration import calibration_batches, load_calibration_file
from algorithm.serving.backends.onnxruntime import ONNXRUNTIME, OnnxRuntimeBackend
from algorithm.serving.backends.openvino import OPENVINO, OpenVINOBackend
from algorithm.serving.backends.tensorrt import TENSORRT, TensorRTBackend
from algorithm.serving.backends.torch_aot import TORCH_AOT, TorchAOTBackend
from algorithm.serving.config import ExportConfig, check_output_path
from algorithm.serving.contract import accuracy_report_path, read_sidecar, sidecar_path
from algorithm.serving.runtime import create_runner
from algorithm.serving.verify.artifact import onnx_problems

logger = logging.getLogger(__name__)

_BACKENDS: dict[str, Backend] = {b.name: b for b in (TENSORRT, ONNXRUNTIME, OPENVINO, TORCH_AOT)}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; its ``name`` becomes a valid ``--backend``."""
    if not backend.name:
        raise ConfigError("backend.name", backend.name, "a non-empty name")
    _BACKENDS[backend.name] = backend


def all_backends() -> list[Backend]:
    """Every registered backend (the source of the platform/runner/artifact-file table)."""
    return list(_BACKENDS.values())


def available_backends(installed_only: bool = False) -> list[str]:
    """Registered backend names (only those whose library is installed with ``installed_only``)."""
    return sorted(n for n, b in _BACKENDS.items() if not installed_only or b.is_available())


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ConfigError listing the registered ones otherwise."""
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        installed = set(available_backends(installed_only=True))
        listing = ", ".join(
            f"{n}{'' if n in installed else ' (not installed)'}" for n in available_backends()
        )
        raise ConfigError("backend", name, f"one of {listing}") from None


def _output_path(output_path, backend: Backend) -> Path:
    out = Path(output_path)
    if out.is_dir() or str(output_path).endswith(os.sep) or not out.suffix:
        return out / backend.artifact_name
    if out.suffix != backend.artifact_suffix:
        raise ConfigError(
            "output_path",
            str(out),
            f"a file ending in {backend.artifact_suffix} (or a folder) for backend {backend.name}",
            hint=f"Triton's default name for this backend is {backend.artifact_name}.",
        )
    return out


def optimize(
    onnx_path,
    output_path,
    backend: str,
    config: ExportConfig | None = None,
    calibration_data=None,
    *,
    reference_model=None,
    checkpoint=None,
    **options,
) -> str:
    """Build ``backend``'s artifact for ``config.precision``, gate it, publish it; returns its path.

    ``reference_model`` (a UGTModel) is the gate's fp32 reference; without it the ONNX model run
    by ONNX Runtime in fp32 is (see ``accuracy``). The torch backend compiles the PyTorch model
    itself, so it needs ``reference_model`` or ``checkpoint`` (a safetensors file). ``options``
    go to the backend (e.g. ``threads`` for openvino). Raises InputFileNotFoundError,
    DependencyError, ConfigError, OptimizationError, or ParityError (gate failed; nothing written).
    """
    cfg = (config or ExportConfig()).validate()
    b = get_backend(backend)
    b.check_precision(cfg.precision)
    if onnx_path is not None and not Path(onnx_path).is_file():
        raise InputFileNotFoundError(f"ONNX model not found: {onnx_path}")
    if onnx_path is not None:  # a truncated or foreign file fails here, not deep in a build
        problems = onnx_problems(onnx_path, read_sidecar(onnx_path))
        if problems:
            message, hint = problems[0]
            raise ConfigError(
                "onnx_path", str(onnx_path), f"a UGT ONNX export; {message}", hint=hint
            )
    if onnx_path is None and b.needs_onnx:
        raise ConfigError(
            "onnx_path", None, f"the exported ONNX model (backend {b.name} optimizes it)"
        )
    if checkpoint is not None and reference_model is None:
        from algorithm.ugt import UGTModel

        if not Path(checkpoint).is_file():
            raise InputFileNotFoundError(f"checkpoint not found: {checkpoint}")
        reference_model = UGTModel.load(checkpoint)
    if not b.is_available():
        raise DependencyError(b.module, b.install, purpose=f"the {b.name} backend")
    if b.name == "torch":
        options["model"] = reference_model
    out = _output_path(output_path, b)
    check_output_path("output_path", out, "file")
    if b.name == "tensorrt" and cfg.timing_cache_path is None:
        cfg = cfg.replace(timing_cache_path=str(out.parent / "tensorrt.timing.cache"))
    # A failed build or gate leaves no empty output folders behind.
    with created_dirs(out.parent):
        return _build(b, onnx_path, out, cfg, calibration_data, reference_model, options)


def _build(b: Backend, onnx_path, out: Path, cfg, calibration_data, reference_model, options):
    from algorithm.serving.verify.accuracy import evaluate, reference_runner

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        t0 = time.monotonic()
        staged = Path(b.optimize(onnx_path, staging / out.name, cfg, calibration_data, **options))
        build_s = time.monotonic() - t0
        if not sidecar_path(staged).is_file():
            write_json(sidecar_path(staged), artifact_sidecar(onnx_path, b, cfg))
        reference, ref_info = reference_runner(onnx_path, reference_model)
        try:
            candidate = create_runner(b.runtime, staged, **b.runner_options(cfg))
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, (DependencyError, ParityError)):
                raise
            raise OptimizationError(
                f"the {b.name} artifact does not load in its runtime: {e}"
            ) from e
        what = f"the {b.name} {cfg.precision} artifact"
        try:
            report = evaluate(candidate, reference, cfg, what=what, reference_info=ref_info)
        except ParityError as e:
            e.report.update(backend=b.name, artifact=str(out), published=False)
            logger.warning("accuracy gate refused %s: %s", what, e)
            raise
        finally:
            del candidate  # release file handles before the files move or go
        report.update(
            backend=b.name, artifact=str(out), build_seconds=round(build_s, 2), published=True
        )
        write_json(accuracy_report_path(staging / out.name), report)
        _publish(staging, out, b.artifact_files(staged))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("published %s (recall@K overlap %.4f)", out, report["worst"]["recall_overlap"])
    return str(out)


def _publish(staging: Path, out: Path, main_files: list[Path]) -> None:
    """Move every staged file next to ``out``; the artifact's main file goes last."""
    main = Path(main_files[-1]).name
    files = sorted((p for p in staging.iterdir() if p.is_file()), key=lambda p: p.name == main)
    for p in files:
        os.replace(p, out.parent / p.name)


__all__ = [
    "Backend",
    "OnnxRuntimeBackend",
    "OpenVINOBackend",
    "TensorRTBackend",
    "TorchAOTBackend",
    "artifact_sidecar",
    "all_backends",
    "available_backends",
    "calibration_batches",
    "get_backend",
    "load_calibration_file",
    "optimize",
    "register_backend",
]
