"""ServingExporter: the one facade over export, optimize, Triton config, deploy and benchmark."""

from __future__ import annotations

import logging

from algorithm.interfaces import ServingExporterInterface
from algorithm.serving.config import BenchmarkConfig, ExportConfig, TritonConfig

logger = logging.getLogger(__name__)


class ServingExporter(ServingExporterInterface):
    """Implements ServingExporterInterface; sub-components are created on first use."""

    def __init__(
        self,
        export_config: ExportConfig | None = None,
        triton_config: TritonConfig | None = None,
        benchmark_config: BenchmarkConfig | None = None,
    ):
        self.export_config = (export_config or ExportConfig()).validate()
        self.triton_config = (triton_config or TritonConfig()).validate()
        self.benchmark_config = (benchmark_config or BenchmarkConfig()).validate()
        self._onnx_exporter = None
        self._trt_optimizer = None
        self._triton_generator = None
        self._benchmarker = None

    # -- guide 4.2 ---------------------------------------------------------------------------
    def export_onnx(self, model, save_path, config: ExportConfig | None = None) -> str:
        from algorithm.serving.export_onnx import ONNXExporter

        if config is not None:
            return ONNXExporter(config).export(model, save_path)
        if self._onnx_exporter is None:
            self._onnx_exporter = ONNXExporter(self.export_config)
        return self._onnx_exporter.export(model, save_path)

    def optimize_tensorrt(self, onnx_path, engine_path, config: ExportConfig | None = None) -> str:
        from algorithm.serving.optimize_trt import TensorRTOptimizer

        if config is not None:
            return TensorRTOptimizer(config).optimize(onnx_path, engine_path)
        if self._trt_optimizer is None:
            self._trt_optimizer = TensorRTOptimizer(self.export_config)
        return self._trt_optimizer.optimize(onnx_path, engine_path)

    def optimize(
        self,
        onnx_path,
        output_path,
        backend: str = "tensorrt",
        config: ExportConfig | None = None,
        calibration_data=None,
    ) -> str:
        """Optimize with a registered backend (tensorrt, onnxruntime, openvino, torch) behind the accuracy gate."""
        from algorithm.serving.backends import optimize

        return optimize(
            onnx_path, output_path, backend, config or self.export_config, calibration_data
        )

    def generate_triton_config(
        self,
        model_repository,
        config: ExportConfig | None = None,
        model_file=None,
        version: int = 1,
    ) -> str:
        from algorithm.serving.triton_config import TritonConfigGenerator

        gen = TritonConfigGenerator(
            export_config=config or self.export_config, triton_config=self.triton_config
        )
        return gen.generate(model_repository, model_file=model_file, version=version)

    def benchmark(self, triton_url, model_name, num_requests: int = 10000) -> dict[str, float]:
        from algorithm.serving.benchmark import TritonBenchmark

        cfg = self.benchmark_config.replace(triton_url=triton_url, num_requests=num_requests)
        result = TritonBenchmark(cfg).run(
            triton_url, model_name, batch_size=1, seq_length=cfg.test_seq_lengths[0]
        )
        return {
            "throughput": result.throughput,
            "latency_p50": result.latency_p50,
            "latency_p90": result.latency_p90,
            "latency_p95": result.latency_p95,
            "latency_p99": result.latency_p99,
        }

    # -- extensions ----------------------------------------------------------------------------
    def backend_for_platform(self) -> str | None:
        """The backend that builds what the TritonConfig serves (None: the torch runner serves
        the checkpoint)."""
        from algorithm.serving.pipeline import backend_for

        return backend_for(self.triton_config)

    def deploy_full_pipeline(
        self,
        model,
        model_repository,
        onnx_path=None,
        engine_path=None,
        version: int | None = None,
        optimize: bool = True,
        host: bool | None = None,
    ) -> dict[str, str]:
        """Export -> optimize for the configured platform -> repository -> validate.

        Publishes the next version of the model (1 in a new repository) atomically, or
        ``version`` (replacing it). ``optimize=False`` serves the exported ONNX as is where an
        ONNX Runtime platform allows it. Python models with ``python_runtime="torch"`` serve
        the checkpoint itself. Raises RepositoryError if the result does not validate. A re-run
        with the same model and configs publishes nothing new ("status": "unchanged"). ``host``:
        whether the instance kind must exist on this host (``validate_deployment``).
        """
        from algorithm.serving.pipeline import deploy

        return deploy(
            model,
            model_repository,
            self.export_config,
            self.triton_config,
            onnx_path=onnx_path,
            engine_path=engine_path,
            version=version,
            optimize_for_platform=optimize,
            host=host,
        )

    def validate_deployment(
        self, model_repository, model_name: str | None = None, host: bool | None = None
    ) -> dict:
        from algorithm.serving.triton.validation import validate_deployment

        return validate_deployment(model_repository, model_name, host=host)


def create_exporter(
    model_name: str = "ugt_recommend",
    precision: str = "fp16",
    max_batch_size: int = 64,
    max_seq_length: int = 1024,
    triton_config: TritonConfig | None = None,
    benchmark_config: BenchmarkConfig | None = None,
    **export_fields,
) -> ServingExporter:
    """A ServingExporter with an ExportConfig built from the arguments (extra fields as keywords)."""
    cfg = ExportConfig(
        model_name=model_name,
        precision=precision,
        max_batch_size=max_batch_size,
        max_seq_length=max_seq_length,
        **export_fields,
    )
    return ServingExporter(cfg, triton_config, benchmark_config)
