"""ServingExporter: the one facade over export, optimize, Triton config, deploy and benchmark.

Step by step as the guide's 5.2 shows it: ``export_onnx`` -> ``optimize_tensorrt`` (or
``optimize`` with any backend, or ``optimize_openvino``) -> ``generate_triton_config(repo)``.
The exporter remembers the artifact its last ``optimize_*`` built (or, for a platform that
serves ONNX as is, the last export), and ``generate_triton_config`` publishes it with its
sidecar into the version folder beside ``config.pbtxt``, so the repository it leaves is one a
server loads. With nothing to place and no artifact in that folder yet it fails and says what
to pass, instead of writing a configuration without a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from algorithm.errors import ConfigError
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
        self.last_onnx: Path | None = None  # what export_onnx wrote last
        self.last_artifact: Path | None = None  # what an optimize_* built last

    # -- guide 4.2 ---------------------------------------------------------------------------
    def export_onnx(self, model, save_path, config: ExportConfig | None = None) -> str:
        from algorithm.serving.export_onnx import ONNXExporter

        if config is not None:
            path = ONNXExporter(config).export(model, save_path)
        else:
            if self._onnx_exporter is None:
                self._onnx_exporter = ONNXExporter(self.export_config)
            path = self._onnx_exporter.export(model, save_path)
        self.last_onnx = Path(path)
        return path

    def optimize_tensorrt(self, onnx_path, engine_path, config: ExportConfig | None = None) -> str:
        from algorithm.serving.optimize_trt import TensorRTOptimizer

        if config is not None:
            return self._built(TensorRTOptimizer(config).optimize(onnx_path, engine_path))
        if self._trt_optimizer is None:
            self._trt_optimizer = TensorRTOptimizer(self.export_config)
        return self._built(self._trt_optimizer.optimize(onnx_path, engine_path))

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

        return self._built(
            optimize(
                onnx_path, output_path, backend, config or self.export_config, calibration_data
            )
        )

    def optimize_openvino(
        self, onnx_path, output_dir, config: ExportConfig | None = None, calibration_data=None
    ) -> str:
        """OpenVINO IR in ``output_dir`` (guide 10.1, 6.2's ``optimize_<backend>``); returns the
        path of model.xml."""
        from algorithm.serving.optimize_openvino import OpenVINOOptimizer

        return self._built(
            OpenVINOOptimizer(config or self.export_config).optimize(
                onnx_path, output_dir, calibration_data
            )
        )

    def _built(self, path: str) -> str:
        self.last_artifact = Path(path)
        return path

    def generate_triton_config(
        self,
        model_repository,
        config: ExportConfig | None = None,
        model_file=None,
        version: int = 1,
    ) -> str:
        """Write ``config.pbtxt`` and publish the model as ``version`` (guide 4.2, 5.2).

        The model is ``model_file``, else what the last ``optimize_*`` built, else (for a
        platform that serves ONNX as is) the last export. With none of them it writes the
        configuration only if the version folder already holds this platform's artifact, and
        raises ConfigError naming ``model_file`` otherwise. A file the platform does not serve
        (a .plan for an ONNX Runtime model) is refused the same way. Returns the config path.
        """
        from algorithm.serving.triton_config import TritonConfigGenerator

        gen = TritonConfigGenerator(
            export_config=config or self.export_config, triton_config=self.triton_config
        )
        if model_file is None:
            model_file = self._artifact_for(gen, Path(model_repository), version)
        return gen.generate(model_repository, model_file=model_file, version=version)

    def _artifact_for(self, gen, repo: Path, version: int) -> Path | None:
        tc = self.triton_config
        serves_onnx = tc.platform == "onnxruntime_onnx" or (
            tc.platform == "python" and tc.python_runtime == "onnxruntime"
        )
        if self.last_artifact is not None:
            logger.info("placing %s (built by the last optimize_*)", self.last_artifact)
            return self.last_artifact
        if self.last_onnx is not None and serves_onnx:
            logger.info(
                "placing the exported %s (%s serves ONNX as is)", self.last_onnx, tc.platform
            )
            return self.last_onnx
        if (repo / gen.model_name / str(version) / gen.served_artifact()).exists():
            return None  # the version is there: only its configuration is rewritten
        raise ConfigError(
            "model_file",
            None,
            f"the artifact to serve as {gen.model_name} version {version}: nothing was built by "
            "this exporter and the version folder is empty",
            hint="Call exporter.optimize_tensorrt(...) / optimize(...) / optimize_openvino(...) "
            f"first (it is placed for you), or pass model_file='path/to/{gen.served_artifact()}'.",
        )

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
