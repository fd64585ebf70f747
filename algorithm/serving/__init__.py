"""algorithm.serving: UGT from PyTorch to a live, measured Triton Inference Server.

The public API of the module guide (section 4.1) plus names added since. Names resolve lazily so
that ``import algorithm.serving`` stays cheap (torch, ONNX Runtime and tritonclient load only
when used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from algorithm.lazy import lazy_exports

_EXPORTS = {
    # configs
    "ExportConfig": ".config",
    "TritonConfig": ".config",
    "BenchmarkConfig": ".config",
    "ExperimentConfig": ".config",
    "TuneConfig": ".config",
    # core classes
    "ServingExporter": ".exporter",
    "ONNXExporter": ".export_onnx",
    "ModelWrapper": ".runtime.torch",
    "ModelInputSpec": ".contract",
    "TensorRTOptimizer": ".optimize_trt",
    "TritonConfigGenerator": ".triton_config",
    "TritonBenchmark": ".benchmark",
    "BenchmarkResult": ".benchmark",
    "GPUMonitoredBenchmark": ".benchmark",
    "ExtendedBenchmarkResult": ".benchmark",
    "GPUMonitor": ".bench.gpu_monitor",
    "OpenVINOOptimizer": ".optimize_openvino",
    "ServingTuner": ".tune",
    "TuneResult": ".tune",
    "ModelVersionManager": ".triton.repository",
    "TritonServer": ".triton.server",
    # convenience functions
    "export_to_onnx": ".export_onnx",
    "build_trt_engine": ".optimize_trt",
    "create_calibration_data_generator": ".optimize_trt",
    "check_plan_compatible": ".optimize_trt",
    "trtexec_command": ".optimize_trt",
    "get_backend": ".backends",
    "available_backends": ".backends",
    "generate_triton_config": ".triton_config",
    "run_benchmark": ".benchmark",
    "tune_serving": ".tune",
    "restore_previous_config": ".tune",
    "write_report": ".bench.report",
    "load_report": ".bench.report",
    "DemoConfig": ".demo",
    "run_demo": ".demo",
    "create_exporter": ".exporter",
    "validate_deployment": ".triton.validation",
    "create_runner": ".runtime",
    "ManifestConfig": ".deploy.manifests",
    "render_manifests": ".deploy.manifests",
    "write_manifests": ".deploy.manifests",
    "ServerSupervisor": ".triton.supervisor",
    "RestartPolicy": ".triton.supervisor",
    "ABTestingRouter": ".abtest",
    "ABExperiment": ".abtest",
    # errors
    "ServingError": "algorithm.errors",
    "ConfigError": "algorithm.errors",
    "DependencyError": "algorithm.errors",
    "ExportError": "algorithm.errors",
    "OptimizationError": "algorithm.errors",
    "ParityError": "algorithm.errors",
    "ServerError": "algorithm.errors",
    "BenchmarkError": "algorithm.errors",
    "CheckpointError": "algorithm.errors",
    "RepositoryError": "algorithm.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from algorithm.errors import (
        BenchmarkError,
        CheckpointError,
        ConfigError,
        DependencyError,
        ExportError,
        OptimizationError,
        ParityError,
        RepositoryError,
        ServerError,
        ServingError,
    )
    from algorithm.serving.abtest import ABExperiment, ABTestingRouter
    from algorithm.serving.backends import available_backends, get_backend
    from algorithm.serving.bench.gpu_monitor import GPUMonitor
    from algorithm.serving.bench.report import load_report, write_report
    from algorithm.serving.benchmark import (
        BenchmarkResult,
        ExtendedBenchmarkResult,
        GPUMonitoredBenchmark,
        TritonBenchmark,
        run_benchmark,
    )
    from algorithm.serving.config import (
        BenchmarkConfig,
        ExperimentConfig,
        ExportConfig,
        TritonConfig,
        TuneConfig,
    )
    from algorithm.serving.contract import ModelInputSpec
    from algorithm.serving.demo import DemoConfig, run_demo
    from algorithm.serving.deploy.manifests import ManifestConfig, render_manifests, write_manifests
    from algorithm.serving.export_onnx import ONNXExporter, export_to_onnx
    from algorithm.serving.exporter import ServingExporter, create_exporter
    from algorithm.serving.optimize_openvino import OpenVINOOptimizer
    from algorithm.serving.optimize_trt import (
        TensorRTOptimizer,
        build_trt_engine,
        check_plan_compatible,
        create_calibration_data_generator,
        trtexec_command,
    )
    from algorithm.serving.runtime import create_runner
    from algorithm.serving.runtime.torch import ModelWrapper
    from algorithm.serving.triton.repository import ModelVersionManager
    from algorithm.serving.triton.server import TritonServer
    from algorithm.serving.triton.supervisor import RestartPolicy, ServerSupervisor
    from algorithm.serving.triton.validation import validate_deployment
    from algorithm.serving.triton_config import TritonConfigGenerator, generate_triton_config
    from algorithm.serving.tune import (
        ServingTuner,
        TuneResult,
        restore_previous_config,
        tune_serving,
    )
