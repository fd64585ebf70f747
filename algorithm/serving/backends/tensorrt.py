"""The TensorRT backend, all of it: optimization profiles per length bucket, fp32-pinned scoring
layers, INT8 calibration with its cache, the timing cache, the build (``build_engine``, the real
``tensorrt`` >= 10 API), the sidecar, and the equivalent ``trtexec`` command. Running a plan is
``runtime/tensorrt.py``'s.

``tensorrt`` is imported only inside the functions that build an engine; the profile,
calibration and trtexec logic runs (and is tested) without it.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import time
from pathlib import Path

from algorithm.errors import ConfigError, InputFileNotFoundError, OptimizationError
from algorithm.fsutil import write_atomic, write_json
from algorithm.serving.backends.base import Backend, artifact_sidecar, match_layers
from algorithm.serving.backends.calibration import calibration_batches, uniform_batches
from algorithm.serving.config import ExportConfig
from algorithm.serving.contract import INPUT_NAMES, sidecar_path
from algorithm.serving.runtime.tensorrt import (
    TRT_INSTALL,
    CapturingLogger,
    gpu_environment,
    import_tensorrt,
)

logger = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    name = "tensorrt"
    artifact_suffix = ".plan"
    artifact_name = "model.plan"
    triton_platform = "tensorrt_plan"
    runtime = "tensorrt"
    module = "tensorrt"
    install = TRT_INSTALL
    precisions = ("fp32", "fp16", "bf16", "int8")

    def _optimize(self, onnx_path, output_path, config, calibration_data, **options) -> str:
        if options:
            from algorithm.errors import ConfigError

            raise ConfigError(
                "options", sorted(options), "no extra options for the tensorrt backend"
            )
        return build_engine(onnx_path, output_path, config, calibration_data)


TENSORRT = TensorRTBackend()
TRT_CALIBRATORS = {"entropy": "IInt8EntropyCalibrator2", "minmax": "IInt8MinMaxCalibrator"}


# ------------------------------------------------------------------------------ profiles
def optimization_profiles(config: ExportConfig) -> list[dict[str, tuple[int, int]]]:
    """min/opt/max ``(batch, seq_len)`` of each optimization profile, shared by the 4 inputs.

    Without ``seq_length_buckets`` one profile spans [min, max]. With buckets, profile i covers
    lengths (bucket[i-1], bucket[i]] and is tuned at the bucket's top (what a request padded to
    its bucket has), plus one profile above the last bucket when it is below max_seq_length.
    """
    cfg = config
    batch = (cfg.min_batch_size, cfg.opt_batch_size, cfg.max_batch_size)
    if not cfg.seq_length_buckets:
        ranges = [(cfg.min_seq_length, cfg.opt_seq_length, cfg.max_seq_length)]
    else:
        ranges, lo = [], cfg.min_seq_length
        for top in cfg.seq_length_buckets:
            if top < lo:
                continue
            ranges.append((lo, top, top))
            lo = top + 1
        if lo <= cfg.max_seq_length:
            ranges.append((lo, cfg.max_seq_length, cfg.max_seq_length))
    return [
        {
            "min": (batch[0], s[0]),
            "opt": (batch[1], min(max(s[1], s[0]), s[2])),
            "max": (batch[2], s[2]),
        }
        for s in ranges
    ]


def _shape_spec(shape: tuple[int, int]) -> str:
    return ",".join(f"{name}:{shape[0]}x{shape[1]}" for name in INPUT_NAMES)


# ------------------------------------------------------------------------------ scoring path
def _user_fp32_layers(onnx_path, patterns) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return match_layers([n.name for n in graph.node], patterns, Path(onnx_path).name)


def scoring_layer_names(onnx_path) -> list[str]:
    """ONNX node names of the scoring path; the parser names TensorRT layers after them."""
    import onnx

    from algorithm.serving.backends.rewrite import scoring_path_nodes

    return scoring_path_nodes(onnx.load(str(onnx_path), load_external_data=False))


def _is_scoring_layer(layer, trt, names: set[str]) -> bool:
    if layer.type == trt.LayerType.TOPK:
        return True
    name = layer.name or ""
    return any(name == n or name.startswith((f"{n}_", f"{n}/", f"{n}:")) for n in names)


def pin_scoring_layers(network, trt, names, patterns=()) -> list[str]:
    """Force fp32 compute and outputs on the scoring layers and on the layers whose names match
    ``patterns`` (``ExportConfig.fp32_layers``); returns the pinned layer names."""
    names = set(names)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    chosen = set(match_layers([layer.name or "" for layer in layers], patterns, "the network"))
    pinned = []
    floats = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}
    for layer in layers:
        if (layer.name or "") not in chosen and not _is_scoring_layer(layer, trt, names):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


def _parser_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        try:
            if err.node() >= 0:
                where = f" (node {err.node()} {err.node_name()!r}, op {err.node_operator()})"
        except AttributeError:  # older 10.x bindings lack the node accessors
            pass
        errors.append(f"{err.desc()}{where}")
    return errors


def file_digest(path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def timing_cache_path(config: ExportConfig, engine_path) -> Path:
    """``config.timing_cache_path``, else ``tensorrt.timing.cache`` beside the engine."""
    return (
        Path(config.timing_cache_path)
        if config.timing_cache_path
        else Path(engine_path).parent / "tensorrt.timing.cache"
    )


def calibration_cache_path(onnx_path, config: ExportConfig, engine_path, method: str) -> Path:
    """Beside the timing cache, keyed by the ONNX file's content: a changed model never reuses stale scales."""
    folder = timing_cache_path(config, engine_path).parent
    return folder / f"{Path(engine_path).stem}.{method}-{file_digest(onnx_path)}.calib"


def to_device(array):
    """(the array in GPU memory, its device pointer): torch owns the memory, kept alive by the
    calibrator until TensorRT asks for the next batch."""
    import torch

    t = torch.from_numpy(array).cuda()
    return t, int(t.data_ptr())


def _make_calibrator(trt, batches: list[dict], cache_file: Path, method: str, copy=None):
    base = getattr(trt, TRT_CALIBRATORS[method])
    copy = copy or to_device

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)
            self.batches, self.index, self.device = batches, 0, {}

        def get_batch_size(self):
            return int(batches[0][INPUT_NAMES[0]].shape[0])

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            self.device = {n: copy(batch[n]) for n in names}  # kept alive until the next call
            return [self.device[n][1] for n in names]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            write_atomic(cache_file, bytes(cache))

    return Calibrator()


def trtexec_command(onnx_path, engine_path, config: ExportConfig | None = None) -> str:
    """The ``trtexec`` command equivalent to ``TensorRTOptimizer(config).optimize`` (TensorRT 10).

    For users building inside the Triton container. INT8 needs a calibration cache from a
    Python build (``--calib``): trtexec cannot calibrate from our histories itself.
    """
    cfg = (config or ExportConfig()).validate()
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    profiles = optimization_profiles(cfg)
    for i, p in enumerate(profiles):
        if len(profiles) > 1:
            args.append(f"--profile={i}")
        args += [
            f"--minShapes={_shape_spec(p['min'])}",
            f"--optShapes={_shape_spec(p['opt'])}",
            f"--maxShapes={_shape_spec(p['max'])}",
        ]
    args.append(f"--memPoolSize=workspace:{cfg.workspace_size_gb}G")
    args.append(f"--timingCacheFile={timing_cache_path(cfg, engine_path)}")
    if cfg.precision in ("fp16", "int8"):
        args.append("--fp16")
    if cfg.precision == "bf16":
        args.append("--bf16")
    if cfg.precision == "int8":
        method = cfg.calibration_method if cfg.calibration_method in TRT_CALIBRATORS else "entropy"
        cache = (
            calibration_cache_path(onnx_path, cfg, engine_path, method)
            if Path(onnx_path).is_file()
            else timing_cache_path(cfg, engine_path).with_name(
                f"{Path(engine_path).stem}.{method}.calib"
            )
        )
        args += ["--int8", f"--calib={cache}"]
    if cfg.precision != "fp32":
        names = scoring_layer_names(onnx_path) if Path(onnx_path).is_file() else []
        if cfg.fp32_layers and Path(onnx_path).is_file():
            # trtexec takes exact layer names: the patterns resolved against the ONNX node names
            # (the parser names layers after them).
            names += [n for n in _user_fp32_layers(onnx_path, cfg.fp32_layers) if n not in names]
        # TopK layers are pinned by type in Python; trtexec matches names, so list them too.
        specs = [f"{n}:fp32" for n in names]
        args += ["--precisionConstraints=obey"]
        if specs:
            args += [
                f"--layerPrecisions={','.join(specs)}",
                f"--layerOutputTypes={','.join(specs)}",
            ]
    return shlex.join(args)


def build_engine(onnx_path, engine_path, config: ExportConfig, calibration_data=None) -> str:
    """Build and write the TensorRT engine for ``config.precision``; returns its path.

    Raises InputFileNotFoundError (a FileNotFoundError) for a missing ONNX file,
    OptimizationError (a RuntimeError) when parsing or building fails, DependencyError
    when tensorrt is not installed.
    """
    cfg = config.validate()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise InputFileNotFoundError(f"ONNX model not found: {onnx_path}")
    if cfg.precision == "int8" and cfg.calibration_method not in TRT_CALIBRATORS:
        raise ConfigError(
            "calibration_method",
            cfg.calibration_method,
            f"one of {', '.join(TRT_CALIBRATORS)} for TensorRT",
        )
    trt = import_tensorrt()
    trt_logger = CapturingLogger(trt)
    builder = trt.Builder(trt_logger)
    flags = 0
    if hasattr(
        trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"
    ):  # default (and deprecated) in 10.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or trt_logger.errors or ["(no parser message)"]
        raise OptimizationError(
            f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):\n"
            + "\n".join(f"  - {e}" for e in errors),
            hint="Re-export with `ugt-serving export` (opset 18); unsupported ops are named above.",
        )
    bconf = builder.create_builder_config()
    bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_size_gb << 30)
    profiles = optimization_profiles(cfg)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name in inputs:
            profile.set_shape(name, p["min"], p["opt"], p["max"])
        bconf.add_optimization_profile(profile)

    pinned: list[str] = []
    calib_cache = None
    if cfg.precision == "fp32":
        # fp32 means fp32: TF32 matmuls (on by default on Ampere+) move scores by ~1e-2.
        bconf.clear_flag(trt.BuilderFlag.TF32)
    if cfg.precision in ("fp16", "int8"):
        bconf.set_flag(trt.BuilderFlag.FP16)
    if cfg.precision == "bf16":
        bconf.set_flag(trt.BuilderFlag.BF16)
    if cfg.precision == "int8":
        bconf.set_flag(trt.BuilderFlag.INT8)
        given = calibration_batches(calibration_data, cfg)
        # One calibration profile, so one shape: the first batch's size, the longest history.
        batches = uniform_batches(given, len(given[0][INPUT_NAMES[0]]))
        shape = batches[0][INPUT_NAMES[0]].shape
        calib_profile = builder.create_optimization_profile()
        for name in inputs:
            calib_profile.set_shape(name, shape, shape, shape)
        bconf.set_calibration_profile(calib_profile)
        calib_cache = calibration_cache_path(onnx_path, cfg, engine_path, cfg.calibration_method)
        bconf.int8_calibrator = _make_calibrator(trt, batches, calib_cache, cfg.calibration_method)
    if cfg.precision != "fp32":
        pinned = pin_scoring_layers(network, trt, scoring_layer_names(onnx_path), cfg.fp32_layers)
        bconf.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        logger.info("pinned %d layers to fp32 (scoring path + fp32_layers)", len(pinned))

    cache_path = timing_cache_path(cfg, engine_path)
    timing_cache = bconf.create_timing_cache(
        cache_path.read_bytes() if cache_path.is_file() else b""
    )
    bconf.set_timing_cache(timing_cache, ignore_mismatch=False)

    logger.info("building TensorRT %s engine (%d profile(s))", cfg.precision, len(profiles))
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, bconf)
    build_s = time.monotonic() - t0
    if serialized is None:
        tail = "\n".join(trt_logger.errors[-20:]) or "(TensorRT logged no error)"
        raise OptimizationError(f"TensorRT failed to build the engine for {onnx_path}:\n{tail}")
    write_atomic(cache_path, bytes(bconf.get_timing_cache().serialize()))
    write_atomic(engine_path, bytes(serialized))

    from algorithm.serving.backends.tensorrt import TENSORRT

    env = gpu_environment()
    write_json(
        sidecar_path(engine_path),
        artifact_sidecar(
            onnx_path,
            TENSORRT,
            cfg,
            tensorrt_version=env["tensorrt_version"],
            gpu_name=env["gpu_name"],
            compute_capability=env["compute_capability"],
            profiles=profiles,
            build_seconds=round(build_s, 2),
            pinned_fp32_layers=len(pinned),
            fp32_layers=list(cfg.fp32_layers),
            calibration_cache=str(calib_cache) if calib_cache else None,
            timing_cache=str(cache_path),
            workspace_gb=cfg.workspace_size_gb,
        ),
    )
    logger.info("wrote %s in %.1fs", engine_path, build_s)
    return str(engine_path)
