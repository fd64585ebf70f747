"""config.pbtxt through Triton's own ModelConfig protobuf (shipped in tritonclient).

The message is built field by field on ``model_config_pb2.ModelConfig`` and written with
``google.protobuf.text_format``, then parsed back strictly, so every generated file is valid
against the schema the server uses. No string templates.

Platforms and what the version folder holds:

- ``tensorrt_plan``: ``model.plan``; CUDA graphs (one exact-shape graph per preferred batch
  size and sequence bucket).
- ``onnxruntime_onnx``: ``model.onnx``; optionally ONNX Runtime's TensorRT execution
  accelerator with its precision.
- ``openvino``: ``model.xml`` + ``model.bin`` (Triton's OpenVINO backend, CPU instances).
- ``python``: the project's ``model.py`` + the artifact (e.g. ``model.onnx``), run by a Runner
  named in ``parameters``. Only this platform sets ``allow_ragged_batch`` so that the dynamic
  batcher groups histories of different lengths (``model.py`` pads them); the others batch only
  requests of equal length.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from algorithm.errors import ConfigError, InputFileNotFoundError
from algorithm.fsutil import make_dirs, write_text_atomic
from algorithm.serving.config import (
    NAME_RE,
    ExportConfig,
    TritonConfig,
    check_name,
    check_output_path,
)
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.triton.repository import ModelVersionManager
from algorithm.serving.triton.schema import (  # noqa: F401  (public here too)
    DEFAULT_FILENAMES,
    PYTHON_ARTIFACTS,
    artifact_filename,
    config_to_text,
    model_config_pb2,
    parse_config,
    pipelined_engine,
    set_queue_policy,
)

logger = logging.getLogger(__name__)


class TritonConfigGenerator:
    """Builds the ModelConfig for an exported UGT model and writes a model repository entry."""

    def __init__(
        self, export_config: ExportConfig | None = None, triton_config: TritonConfig | None = None
    ):
        _check_types(export_config, triton_config)
        self.export_config = (export_config or ExportConfig()).validate()
        self.triton_config = (triton_config or TritonConfig()).validate()
        self._check_combination()

    def _check_combination(self) -> None:
        tc = self.triton_config
        if tc.platform == "openvino" and tc.instance_kind == "KIND_GPU":
            raise ConfigError(
                "instance_kind",
                tc.instance_kind,
                "KIND_CPU or KIND_AUTO for platform openvino",
                hint="Triton's OpenVINO backend runs on CPU instances only.",
            )
        if tc.trt_accelerator_precision and tc.platform != "onnxruntime_onnx":
            raise ConfigError(
                "trt_accelerator_precision",
                tc.trt_accelerator_precision,
                "None unless platform is onnxruntime_onnx",
            )
        if tc.trt_accelerator_precision and tc.instance_kind == "KIND_CPU":
            raise ConfigError(
                "trt_accelerator_precision",
                tc.trt_accelerator_precision,
                "None for KIND_CPU instances (the TensorRT accelerator needs a GPU)",
            )

    @property
    def model_name(self) -> str:
        return self.export_config.model_name

    def preferred_batch_sizes(self) -> list[int]:
        mbs = self.export_config.max_batch_size
        sizes = sorted({b for b in self.triton_config.preferred_batch_sizes if b <= mbs})
        dropped = sorted(set(self.triton_config.preferred_batch_sizes) - set(sizes))
        if dropped:
            logger.info("preferred batch sizes %s exceed max_batch_size=%d; left out", dropped, mbs)
        return sizes

    def warmup_lengths(self) -> list[int]:
        ec = self.export_config
        return list(ec.seq_length_buckets) or [ec.opt_seq_length]

    # -- the message ---------------------------------------------------------------------------
    def build_config(self, artifact_name: str | None = None):
        """The ModelConfig protobuf message for this export/serving configuration."""
        pb = model_config_pb2()
        ec, tc = self.export_config, self.triton_config
        k = ec.num_recommendations
        cfg = pb.ModelConfig(name=ec.model_name, max_batch_size=ec.max_batch_size)
        if tc.platform == "python":
            cfg.backend = "python"
        elif tc.platform == "openvino":
            cfg.backend = "openvino"
            cfg.default_model_filename = DEFAULT_FILENAMES["openvino"]
        else:
            cfg.platform = tc.platform
            cfg.default_model_filename = DEFAULT_FILENAMES[tc.platform]
        ragged = tc.platform == "python"
        for name in INPUT_NAMES:
            cfg.input.add(name=name, data_type=pb.TYPE_INT64, dims=[-1], allow_ragged_batch=ragged)
        cfg.output.add(name="recommendations", data_type=pb.TYPE_INT64, dims=[k, 3])
        cfg.output.add(name="scores", data_type=pb.TYPE_FP32, dims=[k])
        self._batching(cfg)
        self._instances(cfg, pb)
        self._optimization(cfg, pb)
        self._parameters(cfg, artifact_name)
        if tc.model_warmup:
            self._warmup(cfg, pb)
        if tc.version_policy == "all":
            cfg.version_policy.all.SetInParent()
        else:
            cfg.version_policy.latest.num_versions = 1
        if tc.response_cache:
            cfg.response_cache.enable = True
        return cfg

    def _batching(self, cfg) -> None:
        tc = self.triton_config
        if not tc.enable_dynamic_batching:
            return
        db = cfg.dynamic_batching
        db.preferred_batch_size.extend(self.preferred_batch_sizes())
        db.max_queue_delay_microseconds = tc.max_queue_delay_us
        set_queue_policy(
            db, tc.max_queue_size, tc.default_queue_timeout_us, tc.allow_timeout_override
        )

    def _instances(self, cfg, pb) -> None:
        tc = self.triton_config
        group = cfg.instance_group.add(
            count=tc.instance_count, kind=getattr(pb.ModelInstanceGroup, tc.instance_kind)
        )
        if tc.instance_kind == "KIND_GPU":
            group.gpus.extend(tc.gpus)

    def _optimization(self, cfg, pb) -> None:
        ec, tc = self.export_config, self.triton_config
        if tc.platform == "tensorrt_plan" and tc.cuda_graphs:
            cuda = cfg.optimization.cuda
            cuda.graphs = True
            # Exact-shape graphs: a request uses one only at that shape (no lower_bound, so no
            # padding inside the engine changes an answer).
            for b in self.preferred_batch_sizes() or [ec.max_batch_size]:
                for seq in self.warmup_lengths():
                    spec = cuda.graph_spec.add(batch_size=b)
                    for name in INPUT_NAMES:
                        spec.input[name].dim.append(seq)
        if tc.platform == "onnxruntime_onnx" and tc.trt_accelerator_precision:
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(
                name="tensorrt"
            )
            acc.parameters["precision_mode"] = tc.trt_accelerator_precision.upper()
            acc.parameters["max_workspace_size_bytes"] = str(ec.workspace_size_gb << 30)
        if tc.platform == "onnxruntime_onnx" and tc.runtime_threads:
            cfg.parameters["intra_op_thread_count"].string_value = str(tc.runtime_threads)
        if tc.platform == "openvino" and tc.runtime_threads:
            cfg.parameters["INFERENCE_NUM_THREADS"].string_value = str(tc.runtime_threads)

    def _parameters(self, cfg, artifact_name: str | None) -> None:
        ec, tc = self.export_config, self.triton_config
        # The model's contract, on every platform: model.py validates requests with it, and a
        # client (the benchmark) reads it through the model-config API to send only requests
        # the model accepts. Triton's other backends read their parameters by name and leave
        # these alone.
        params = {
            "max_seq_length": str(ec.max_seq_length),
            "codebook_sizes": ",".join(str(c) for c in ec.codebook_sizes),
            "num_recommendations": str(ec.num_recommendations),
        }
        if tc.platform != "python":
            for key, value in params.items():
                cfg.parameters[key].string_value = value
            return
        params = {
            "runtime": tc.python_runtime,
            "artifact": artifact_name or artifact_filename("python", tc.python_runtime),
            "device": "auto",  # model.py: the instance's GPU for KIND_GPU, else CPU
            "threads": str(tc.runtime_threads),
            **params,
            "precision": ec.precision,
        }
        if tc.python_runtime == "torch" and tc.instance_kind == "KIND_GPU":
            params.update(
                batching="length_aware",
                engine=json.dumps(self.gpu_engine_options()),
                warmup=json.dumps(self.gpu_warmup()),
            )
        if tc.pipeline_depth:
            params["pipeline_depth"] = str(tc.pipeline_depth)
        if tc.continuous_batching:
            params["continuous_batching"] = "true"
        for key, value in params.items():
            cfg.parameters[key].string_value = value

    def gpu_engine_options(self) -> dict:
        """The GPU engine's options (model.py's ``engine`` parameter): no capture after the
        warm-up (a capture mid-traffic stalls a batch for tens of ms); with a pipeline, host
        waits on the GPU block instead of spinning (``schema.pipelined_engine``)."""
        options: dict = {"capture_new_shapes": False}
        return pipelined_engine(options) if self.triton_config.pipeline_depth else options

    def gpu_warmup(self) -> list:
        """The GPU engine's warm-up (model.py's ``warmup`` parameter): full-length batches of
        1..max_batch_size histories at the longest warm-up length, then the packed buckets of
        ``length_mix``. A batch whose bucket was not warmed later borrows a larger warmed one or
        runs without a graph; none is captured mid-traffic."""
        ec, tc = self.export_config, self.triton_config
        n = max(self.warmup_lengths())
        plan: list = [[b, n] for b in range(1, ec.max_batch_size + 1)]
        if tc.length_mix is not None:
            median, sigma = tc.length_mix
            plan.append(
                {
                    "lognormal": [min(median, ec.max_seq_length), sigma, ec.max_seq_length],
                    "coverage": tc.warmup_coverage,
                    "max_users": ec.max_batch_size,
                }
            )
        return plan

    def _warmup(self, cfg, pb) -> None:
        # Zero ids are valid codes and an all-zero mask is a defined (empty) history, so the
        # samples pass model.py's validation; batch 1 at each bucket length.
        for seq in self.warmup_lengths():
            w = cfg.model_warmup.add(name=f"zeros_batch1_seq{seq}", batch_size=1, count=1)
            for name in INPUT_NAMES:
                w.inputs[name].data_type = pb.TYPE_INT64
                w.inputs[name].dims.append(seq)
                w.inputs[name].zero_data = True

    def config_text(self, artifact_name: str | None = None) -> str:
        """config.pbtxt text, checked by parsing it back strictly."""
        text = config_to_text(self.build_config(artifact_name))
        parse_config(text)
        return text

    # -- the repository ------------------------------------------------------------------------
    def served_artifact(self) -> str:
        """The file name the version folder holds for this platform (python: the runner's)."""
        tc = self.triton_config
        if tc.platform == "python":
            return PYTHON_ARTIFACTS.get(tc.python_runtime, "model.onnx")
        return DEFAULT_FILENAMES[tc.platform]

    def check_artifact(self, model_file) -> None:
        """ConfigError when ``model_file`` is not what this platform serves (a .plan for an
        ONNX Runtime model, an .onnx for tensorrt_plan ...): Triton would fail to load it."""
        tc = self.triton_config
        path = Path(model_file)
        want = Path(self.served_artifact()).suffix
        if path.is_dir() or (tc.platform == "python" and tc.python_runtime == "torch"):
            return  # a folder artifact, or a checkpoint in any format the torch runner reads
        if path.suffix != want:
            runtime = (
                f" with python_runtime={tc.python_runtime!r}" if tc.platform == "python" else ""
            )
            raise ConfigError(
                "model_file",
                str(path),
                f"a {want} file: platform {tc.platform!r}{runtime} serves {self.served_artifact()}",
                hint="Build the artifact for this platform (optimize with its backend) or set "
                "TritonConfig.platform to the one that serves this file.",
            )

    def generate(self, model_repository, model_file=None, version: int = 1) -> str:
        """Write ``<repo>/<name>/config.pbtxt`` and, with ``model_file``, publish it as
        ``version`` (atomically; replaces that version if present). Returns the config path."""
        check_name("model_name", self.model_name)
        check_output_path("model_repository", model_repository)
        tc = self.triton_config
        model_dir = Path(model_repository) / self.model_name
        artifact_name = None
        if model_file is not None:
            model_file = Path(model_file)
            if not model_file.exists():
                raise InputFileNotFoundError(f"model file not found: {model_file}")
            self.check_artifact(model_file)
            artifact_name = artifact_filename(tc.platform, tc.python_runtime, model_file)
        text = self.config_text(artifact_name)
        manager = ModelVersionManager(model_repository)
        if model_file is not None:  # refused before anything is written
            manager.check_artifact(parse_config(text), model_file)
        make_dirs(model_dir)  # 0755 whatever the umask: the server runs what is in here
        path = write_text_atomic(model_dir / "config.pbtxt", text)
        if model_file is not None:
            manager.deploy_version(self.model_name, model_file, version=version, replace=True)
        logger.info("wrote %s", path)
        return str(path)


def _check_types(export_config, triton_config) -> None:
    """A config of the wrong class is a ConfigError saying which goes where, not a TypeError
    from deep inside."""
    for field, value, cls in (
        ("export_config", export_config, ExportConfig),
        ("triton_config", triton_config, TritonConfig),
    ):
        if value is not None and not isinstance(value, cls):
            raise ConfigError(
                field,
                type(value).__name__,
                f"an {cls.__name__}" if cls is ExportConfig else f"a {cls.__name__}",
                hint="TritonConfigGenerator(ExportConfig(...), TritonConfig(...)): the export "
                "config first, the serving config second.",
            )


def generate_triton_config(
    model_name_or_repository,
    config: ExportConfig | TritonConfig | None = None,
    triton_config: TritonConfig | None = None,
    model_file=None,
    version: int = 1,
) -> str:
    """Guide 4.3: ``generate_triton_config("my_model", config)`` returns the config.pbtxt text
    for a model named "my_model". Given a repository (an existing directory, or a path with a
    separator) or a ``model_file``, it writes the repository entry and returns the config path.

    ``config`` is the ExportConfig; a TritonConfig there is taken as ``triton_config`` (the
    serving settings are what most callers mean to pass). Without one, TritonConfig's defaults
    apply: platform tensorrt_plan on GPU 0, as in the guide (the CLI's default is python, which
    the bundled tritonserver runs)."""
    if isinstance(config, TritonConfig):
        if triton_config is not None:
            raise ConfigError(
                "config", "TritonConfig", "an ExportConfig when triton_config is given too"
            )
        config, triton_config = None, config
    _check_types(config, triton_config)
    target = str(model_name_or_repository)
    is_name = NAME_RE.match(target) and not Path(target).is_dir() and model_file is None
    export_config = config or ExportConfig()
    if is_name:
        gen = TritonConfigGenerator(export_config.replace(model_name=target), triton_config)
        return gen.config_text()
    return TritonConfigGenerator(export_config, triton_config).generate(target, model_file, version)


__all__ = [
    "DEFAULT_FILENAMES",
    "TritonConfigGenerator",
    "artifact_filename",
    "config_to_text",
    "generate_triton_config",
    "model_config_pb2",
    "parse_config",
]
