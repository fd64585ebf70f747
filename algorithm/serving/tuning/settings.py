"""The serving settings a tune searches, read from and written into Triton's ModelConfig.

``ServingSettings`` is the point of the search space: instance count, max batch size, preferred
batch sizes (None: no dynamic batching), max queue delay, the queue policy, and where the model
has them the runtime's intra-op threads, the GPU engine's batching mode and the torch runner's
pipeline depth (model.py's ``pipeline_depth``). ``read_settings`` takes them from a config;
``apply_settings`` returns a copy of the config with them, leaving every other field (inputs,
parameters, warm-up, version policy) as it was, so a tuned config is the user's config with
only the searched knobs changed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from algorithm.errors import ConfigError
from algorithm.serving.triton.schema import (
    model_config_pb2,
    pipelined_engine,
    set_queue_policy,
)

GPU_BATCHINGS = ("length_aware", "pad")
# Where each platform's runtime reads its intra-op thread count (triton_config writes the same).
THREAD_PARAMETERS = {
    "python": "threads",
    "onnxruntime_onnx": "intra_op_thread_count",
    "openvino": "INFERENCE_NUM_THREADS",
}
# python-backend runtimes that take a thread count (the torch runner reads OMP_NUM_THREADS).
_THREADED_RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class ServingSettings:
    """One point of the search space. ``None`` in an optional knob: the model has no such knob."""

    instance_count: int
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] | None  # None: dynamic batching off
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0 = unbounded
    queue_timeout_us: int = 0  # 0 = none
    runtime_threads: int | None = None  # 0 = the runtime's default
    gpu_batching: str | None = None  # "length_aware" or "pad" (GpuEngine)
    pipeline_depth: int | None = None  # python + torch: batches queued on the device (0 = off)

    def replace(self, **changes) -> ServingSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["preferred_batch_sizes"] is not None:
            d["preferred_batch_sizes"] = list(d["preferred_batch_sizes"])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ServingSettings:
        d = dict(data)
        if d.get("preferred_batch_sizes") is not None:
            d["preferred_batch_sizes"] = tuple(d["preferred_batch_sizes"])
        return cls(**d)

    @property
    def key(self) -> str:
        """A stable identity (for the stored points and for de-duplication)."""
        return self.label

    @property
    def label(self) -> str:
        """Short and readable: ``i2 t1 mb64 pref[4,8,16] d100us``."""
        parts = [f"i{self.instance_count}"]
        if self.runtime_threads is not None:
            parts.append(f"t{self.runtime_threads}")
        parts.append(f"mb{self.max_batch_size}")
        if self.preferred_batch_sizes is None:
            parts.append("nobatch")
        else:
            parts.append(f"pref[{','.join(map(str, self.preferred_batch_sizes))}]")
            parts.append(f"d{self.max_queue_delay_us}us")
            if self.queue_timeout_us or self.max_queue_size:
                parts.append(f"q{self.max_queue_size}/{self.queue_timeout_us}us")
        if self.gpu_batching is not None:
            parts.append(self.gpu_batching)
        if self.pipeline_depth:
            parts.append(f"pipe{self.pipeline_depth}")
        return " ".join(parts)


def _platform(config) -> str:
    return "python" if config.backend == "python" else (config.platform or config.backend)


def _parameter(config, name: str) -> str | None:
    return config.parameters[name].string_value if name in config.parameters else None


def thread_knob(config) -> str | None:
    """The config parameter holding the runtime's thread count, or None when it has none
    (GPU instances, the torch runner, TensorRT)."""
    platform = _platform(config)
    pb = model_config_pb2()
    if any(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in config.instance_group):
        return None
    if platform == "python" and (_parameter(config, "runtime") or "onnxruntime") not in (
        _THREADED_RUNTIMES
    ):
        return None
    return THREAD_PARAMETERS.get(platform)


def read_settings(config) -> ServingSettings:
    """The settings a ModelConfig serves with."""
    if config.max_batch_size < 1:
        raise ConfigError(
            "max_batch_size",
            config.max_batch_size,
            "a batching model (max_batch_size >= 1) to tune",
            hint="A model with max_batch_size 0 takes no batches: there is nothing to tune.",
        )
    groups = list(config.instance_group)
    count = groups[0].count if groups and groups[0].count else 1
    db = config.dynamic_batching if config.HasField("dynamic_batching") else None
    qp = db.default_queue_policy if db is not None else None
    knob = thread_knob(config)
    threads = None
    if knob is not None:
        text = _parameter(config, knob) or "0"
        threads = int(text) if text.isdigit() else 0
    batching = _parameter(config, "batching")
    depth = None
    if _platform(config) == "python" and _parameter(config, "runtime") == "torch":
        text = _parameter(config, "pipeline_depth") or "0"
        depth = int(text) if text.isdigit() else 0
    return ServingSettings(
        instance_count=int(count),
        max_batch_size=int(config.max_batch_size),
        preferred_batch_sizes=None
        if db is None
        else tuple(sorted({int(b) for b in db.preferred_batch_size})),
        max_queue_delay_us=int(db.max_queue_delay_microseconds) if db is not None else 0,
        max_queue_size=int(qp.max_queue_size) if qp is not None else 0,
        queue_timeout_us=int(qp.default_timeout_microseconds) if qp is not None else 0,
        runtime_threads=threads,
        gpu_batching=batching if batching in GPU_BATCHINGS else None,
        pipeline_depth=depth,
    )


def apply_settings(config, settings: ServingSettings):
    """A copy of ``config`` serving with ``settings`` (every other field kept)."""
    pb = model_config_pb2()
    new = pb.ModelConfig()
    new.CopyFrom(config)
    new.max_batch_size = settings.max_batch_size
    if not new.instance_group:
        new.instance_group.add(kind=pb.ModelInstanceGroup.KIND_AUTO)
    for group in new.instance_group:  # per group (with gpus: per GPU), as Triton counts it
        group.count = settings.instance_count
    if settings.preferred_batch_sizes is None:
        new.ClearField("dynamic_batching")
    else:
        db = new.dynamic_batching
        db.SetInParent()
        del db.preferred_batch_size[:]
        db.preferred_batch_size.extend(
            b for b in sorted(set(settings.preferred_batch_sizes)) if b <= settings.max_batch_size
        )
        db.max_queue_delay_microseconds = settings.max_queue_delay_us
        set_queue_policy(db, settings.max_queue_size, settings.queue_timeout_us)
    knob = thread_knob(config)
    if settings.runtime_threads is not None and knob is not None:
        new.parameters[knob].string_value = str(settings.runtime_threads)
    if settings.gpu_batching is not None and "batching" in new.parameters:
        new.parameters["batching"].string_value = settings.gpu_batching
    if settings.pipeline_depth is not None and _parameter(config, "runtime") == "torch":
        if settings.pipeline_depth:
            new.parameters["pipeline_depth"].string_value = str(settings.pipeline_depth)
            _pipeline_engine_options(new)
        else:  # off: continuous batching (which needs a pipeline) goes with it
            for name in ("pipeline_depth", "continuous_batching"):
                if name in new.parameters:
                    del new.parameters[name]
    return new


def _pipeline_engine_options(config) -> None:
    """A pipelined GPU engine's options as the generator writes them (``schema.pipelined_engine``)."""
    if "engine" not in config.parameters:
        return
    try:
        engine = json.loads(config.parameters["engine"].string_value or "{}")
    except ValueError:
        return  # the model reports a malformed engine parameter itself when it loads
    if isinstance(engine, dict):
        config.parameters["engine"].string_value = json.dumps(pipelined_engine(engine))


def config_json(config) -> str:
    """The config as the JSON that Triton's load API takes as an override."""
    from google.protobuf import json_format

    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def config_from_json(data) -> object:
    """A ModelConfig from the JSON a server's config API returns (fields Triton filled in kept;
    fields this schema does not know ignored)."""
    import json

    from google.protobuf import json_format

    if isinstance(data, str):
        data = json.loads(data)
    return json_format.ParseDict(data, model_config_pb2().ModelConfig(), ignore_unknown_fields=True)


__all__ = [
    "GPU_BATCHINGS",
    "ServingSettings",
    "apply_settings",
    "config_from_json",
    "config_json",
    "read_settings",
    "thread_knob",
]
