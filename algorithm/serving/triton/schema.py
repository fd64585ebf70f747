"""Triton's model-config schema and the platform table: which file a version folder holds.

The schema is Triton's own ModelConfig protobuf (shipped in tritonclient[grpc]); configs are
parsed strictly. The platform -> artifact-file table is derived from the backend registry (each
backend names its Triton platform, its runner and its artifact file), so adding a backend adds
its row here.
"""

from __future__ import annotations

from pathlib import Path

from algorithm.errors import DependencyError
from algorithm.serving.backends import all_backends

# Numpy dtype names of the model contract -> Triton's DataType names.
TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
}
PYTHON_MODEL_FILE = "model.py"
CHECKPOINT_FILE = "model.safetensors"  # the torch runner serves a checkpoint, no built artifact

#: The file Triton looks for in a version folder, per platform.
DEFAULT_FILENAMES = {
    **{b.triton_platform: b.artifact_name for b in all_backends() if b.triton_platform != "python"},
    "python": PYTHON_MODEL_FILE,
}
#: Artifact file names a python-backend model runs, per Runner.
PYTHON_ARTIFACTS = {
    **{b.runtime: b.artifact_name for b in all_backends()},
    "torch": CHECKPOINT_FILE,
}


def model_config_pb2():
    """Triton's ModelConfig protobuf module (from tritonclient[grpc])."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except ImportError as e:
        raise DependencyError(
            "tritonclient[grpc]", "pip install 'tritonclient[grpc]'", purpose="Triton model configs"
        ) from e
    return pb


def set_queue_policy(batching, max_queue_size: int, timeout_us: int, allow_override=None):
    """A dynamic batcher's default queue policy: requests beyond ``max_queue_size`` (0 =
    unbounded) or queued longer than ``timeout_us`` (0 = never) are rejected; both 0 clears it.
    ``allow_override``: whether a request may set its own timeout (left alone when None)."""
    if not (max_queue_size or timeout_us):
        batching.ClearField("default_queue_policy")
        return
    qp = batching.default_queue_policy
    qp.timeout_action = model_config_pb2().ModelQueuePolicy.REJECT
    qp.default_timeout_microseconds = timeout_us
    qp.max_queue_size = max_queue_size
    if allow_override is not None:
        qp.allow_timeout_override = allow_override


def pipelined_engine(options: dict) -> dict:
    """The GPU engine options (model.py's ``engine`` parameter) of a pipelined model: its host
    threads wait on the GPU by blocking instead of spinning, unless the options say otherwise
    (issue 14 runs 10-11 on an H100: c64 x 1024 P99 34.2 -> 24.8 and 26.0 -> 21.3 ms). The
    generator and the tuner both write it through here."""
    return {**options, "blocking_sync": options.get("blocking_sync", True)}


def parse_config(text: str):
    """Parse config.pbtxt text strictly (unknown fields fail) into a ModelConfig."""
    from google.protobuf import text_format

    pb = model_config_pb2()
    return text_format.Parse(text, pb.ModelConfig())


def config_to_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def artifact_filename(platform: str, python_runtime: str = "onnxruntime", model_file=None) -> str:
    """The name of the artifact inside a version folder (for python: the Runner's artifact)."""
    if platform != "python":
        return DEFAULT_FILENAMES[platform]
    if model_file is not None:
        suffixes = "".join(Path(model_file).suffixes[-1:])
        if suffixes:
            return f"model{suffixes}"
    return PYTHON_ARTIFACTS.get(python_runtime, "model.onnx")
