"""A STAND-IN for the part of TensorRT's Python API (``tensorrt`` >= 10) this project calls.

This is not TensorRT and builds no engine. TensorRT cannot be installed on the development
machines (guide 7.3: "mock imports"), so the tests put this module in ``sys.modules["tensorrt"]``
and check what ``backends/tensorrt.py`` would ask the real builder for: the network parsed from
the ONNX file, one optimization profile per length bucket, the builder flags, the memory pool,
the calibrator's batches and cache, the layers pinned to fp32, the timing cache. What
``build_serialized_network`` returns is a JSON description of that build behind ``MAGIC``, never
an engine; ``Runtime`` reads it back for its profiles but an execution context refuses to run.
Tests with the real library are marked ``tensorrt`` and run where it exists.

Names, signatures and behaviour follow NVIDIA's documentation:

- Python API index (Builder, NetworkDefinitionCreationFlag, IBuilderConfig, BuilderFlag,
  MemoryPoolType, IOptimizationProfile, Runtime):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html
- IBuilderConfig (setFlag/clearFlag/getFlag, int8 calibrator, TensorRT 10.2):
  https://docs.nvidia.com/deeplearning/sdk/tensorrt-api/c_api/classnvinfer1_1_1_i_builder_config.html
- OnnxParser, ParserError, ErrorCode (parse_from_file, num_errors, get_error, desc, node):
  https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-861/api/python_api/parsers/Onnx/pyOnnx.html
- ILayer precision / setOutputType / precisionIsSet (TensorRT 10.2):
  https://docs.nvidia.com/deeplearning/sdk/tensorrt-api/c_api/classnvinfer1_1_1_i_layer.html
- IInt8Calibrator / IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator (get_batch(names) -> device
  pointers, or None/[] when done; get_batch_size; read/write_calibration_cache):
  https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Int8/Calibrator.html
- Dynamic shapes and optimization profiles:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html

Checks made where TensorRT makes them, failing the way it fails (an ERROR through the ILogger,
``build_serialized_network`` returning None; the parser returning False with ParserErrors): a
file that is not ONNX, a node from an unknown domain (no importer), dynamic inputs without a
profile, a profile missing an input or with min > opt > max, a calibration batch size that does
not match the calibration profile, a calibrator pointer list of the wrong length. Simplified:
one layer per ONNX node, named after the node (``node_of_<output>`` for an unnamed one), as the
parser names a node's main layer; dtypes from ONNX shape inference.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import json
import sys
import types

MAGIC = b"UGT-TENSORRT-STANDIN-PLAN\n"  # what a stand-in "plan" starts with: never an engine
CALIB_MAGIC = b"TRT-STANDIN-CALIBRATION\n"


# TensorRT's enums, with the members (and values) of the 10.x Python bindings that matter here.
DataType = enum.IntEnum(
    "DataType", dict(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, UINT8=5, FP8=6, BF16=7, INT64=8)
)
BuilderFlag = enum.IntEnum(
    "BuilderFlag",
    dict(FP16=0, INT8=1, DEBUG=2, GPU_FALLBACK=3, REFIT=4, DISABLE_TIMING_CACHE=5, TF32=6,
         SPARSE_WEIGHTS=7, OBEY_PRECISION_CONSTRAINTS=9, PREFER_PRECISION_CONSTRAINTS=10, BF16=17),
)  # fmt: skip
MemoryPoolType = enum.IntEnum(
    "MemoryPoolType",
    dict(WORKSPACE=0, DLA_MANAGED_SRAM=1, DLA_LOCAL_DRAM=2, DLA_GLOBAL_DRAM=3, TACTIC_DRAM=4),
)
# EXPLICIT_BATCH: deprecated and the default in TensorRT 10, still accepted
NetworkDefinitionCreationFlag = enum.IntEnum(
    "NetworkDefinitionCreationFlag", dict(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
)
LayerType = enum.IntEnum(
    "LayerType",
    dict(ACTIVATION=2, ELEMENTWISE=5, SOFTMAX=8, CONCATENATION=9, UNARY=11, SHUFFLE=12, REDUCE=14,
         TOPK=15, GATHER=16, MATRIX_MULTIPLY=17, CONSTANT=19, IDENTITY=20, SLICE=21, SHAPE=22,
         SELECT=27, FILL=28, CAST=41, NORMALIZATION=42),
)  # fmt: skip
ErrorCode = enum.IntEnum(
    "ErrorCode",
    dict(SUCCESS=0, INTERNAL_ERROR=1, MEM_ALLOC_FAILED=2, MODEL_DESERIALIZE_FAILED=3,
         INVALID_VALUE=4, INVALID_GRAPH=5, INVALID_NODE=6, UNSUPPORTED_GRAPH=7, UNSUPPORTED_NODE=8),
)  # fmt: skip
_Severity = enum.IntEnum("Severity", dict(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4))

# The layer type the parser's importer of each ONNX op makes (its main layer); others ELEMENTWISE.
_OP_LAYER = {
    op: LayerType[kind]
    for kind, ops in {
        "MATRIX_MULTIPLY": "MatMul Gemm", "TOPK": "TopK", "SOFTMAX": "Softmax LogSoftmax",
        "GATHER": "Gather GatherElements", "SHUFFLE": "Reshape Transpose Unsqueeze Squeeze",
        "CAST": "Cast", "CONSTANT": "Constant", "SHAPE": "Shape", "CONCATENATION": "Concat",
        "SLICE": "Slice Expand", "SELECT": "Where", "NORMALIZATION": "LayerNormalization",
        "REDUCE": "ReduceMean ReduceMax ReduceSum", "ACTIVATION": "Relu Gelu",
        "UNARY": "Sqrt Exp Log", "IDENTITY": "Identity", "FILL": "ConstantOfShape",
    }.items()
    for op in ops.split()
}  # fmt: skip
_ONNX_DTYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 6: DataType.INT32,
                7: DataType.INT64, 9: DataType.BOOL, 3: DataType.INT8, 2: DataType.UINT8}  # fmt: skip
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_FLOATS = (DataType.FLOAT, DataType.HALF, DataType.BF16)


class ILogger:
    """Subclass and override ``log(severity, msg)``; call ``ILogger.__init__(self)``."""

    Severity = _Severity
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = tuple(_Severity)

    def __init__(self):
        self._standin_initialized = True

    def log(self, severity, msg):  # pragma: no cover - overridden by the project's logger
        raise NotImplementedError


def _log(logger, severity, msg: str) -> None:
    CALLS.append(("ILogger", "log", (_Severity(severity).name, msg)))
    logger.log(severity, msg)


# ------------------------------------------------------------------------------ network
class ITensor:
    def __init__(self, name: str, shape: tuple, dtype: DataType):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class ILayer:
    def __init__(self, name: str, type_: LayerType, outputs: list[ITensor], op: str):
        self.name, self.type, self._outputs, self.op = name, type_, outputs, op
        self._precision: DataType | None = None
        self._output_types: dict[int, DataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    @property
    def precision(self) -> DataType:
        return self._precision if self._precision is not None else DataType.FLOAT

    @precision.setter
    def precision(self, dtype) -> None:
        CALLS.append(("ILayer", "precision", (self.name, DataType(dtype).name)))
        self._precision = DataType(dtype)

    @property
    def precision_is_set(self) -> bool:
        return self._precision is not None

    def reset_precision(self) -> None:
        self._precision = None

    def set_output_type(self, index: int, dtype) -> None:
        CALLS.append(("ILayer", "set_output_type", (self.name, index, DataType(dtype).name)))
        if not 0 <= index < len(self._outputs):
            raise IndexError(f"layer {self.name} has no output {index}")
        self._output_types[index] = DataType(dtype)

    def get_output_type(self, index: int) -> DataType:
        return self._output_types.get(index, self._outputs[index].dtype)

    def output_type_is_set(self, index: int) -> bool:
        return index in self._output_types


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self._inputs: list[ITensor] = []
        self._layers: list[ILayer] = []
        self._outputs: list[ITensor] = []

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_layer(self, index: int) -> ILayer:
        return self._layers[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class ParserError:
    def __init__(self, code: ErrorCode, desc: str, node: int = -1, name: str = "", op: str = ""):
        self._code, self._desc, self._node, self._name, self._op = code, desc, node, name, op

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def __str__(self) -> str:
        return self._desc


class OnnxParser:
    """Parses the ONNX file with ``onnx`` into one layer per node."""

    def __init__(self, network: INetworkDefinition, logger: ILogger):
        CALLS.append(("OnnxParser", "__init__", ()))
        self.network, self.logger, self._errors = network, logger, []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        try:
            proto = onnx.load_model_from_string(bytes(model))
        except Exception as e:  # onnx's decode errors
            return self._fail(
                ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model: {e}"
            )
        return self._import(proto)

    def parse_from_file(self, model: str) -> bool:
        import onnx

        CALLS.append(("OnnxParser", "parse_from_file", (str(model),)))
        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception as e:  # onnx's decode errors
            return self._fail(
                ErrorCode.MODEL_DESERIALIZE_FAILED,
                f"Failed to parse ONNX model from file: {model}: {type(e).__name__}",
            )
        return self._import(proto)

    def _fail(self, code, desc, node=-1, name="", op="") -> bool:
        self._errors.append(ParserError(code, desc, node, name, op))
        _log(self.logger, _Severity.ERROR, desc)
        return False

    def _import(self, proto) -> bool:
        import onnx

        with contextlib.suppress(Exception):  # dtypes are best effort, as in the parser
            proto = onnx.shape_inference.infer_shapes(proto)
        graph = proto.graph
        dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
        dtypes.update({o.name: o.type.tensor_type.elem_type for o in graph.output})
        dtypes.update({i.name: i.data_type for i in graph.initializer})
        inits = {i.name for i in graph.initializer}
        for i, node in enumerate(graph.node):
            if node.domain not in _STANDARD_DOMAINS:
                name = node.name or f"node_of_{node.output[0]}"
                return self._fail(
                    ErrorCode.UNSUPPORTED_NODE,
                    f"In node {i} with name: {name} and operator: {node.op_type} "
                    f"(importFallbackPluginImporter): UNSUPPORTED_NODE: No importer registered "
                    f"for op: {node.op_type} (domain {node.domain!r})",
                    i,
                    name,
                    node.op_type,
                )
        net = self.network
        for vi in graph.input:
            if vi.name in inits:
                continue
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else -1
                for d in vi.type.tensor_type.shape.dim
            )
            dt = _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, DataType.FLOAT)
            net._inputs.append(ITensor(vi.name, dims, dt))
        for node in graph.node:
            outs = [
                ITensor(o, (), _ONNX_DTYPES.get(dtypes.get(o, 1), DataType.FLOAT))
                for o in node.output
            ]
            name = node.name or f"node_of_{node.output[0]}"
            net._layers.append(
                ILayer(name, _OP_LAYER.get(node.op_type, LayerType.ELEMENTWISE), outs, node.op_type)
            )
        for o in graph.output:
            net._outputs.append(
                ITensor(o.name, (), _ONNX_DTYPES.get(o.type.tensor_type.elem_type, DataType.FLOAT))
            )
        return True


# ------------------------------------------------------------------------------ config
class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min, opt, max) -> None:
        CALLS.append(
            ("IOptimizationProfile", "set_shape", (input, tuple(min), tuple(opt), tuple(max)))
        )
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, input: str) -> list:
        return [list(s) for s in self.shapes.get(input, ((), (), ()))]


class IHostMemory:
    def __init__(self, data: bytes):
        self._data = bytes(data)

    def __bytes__(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data)

    nbytes = property(lambda self: len(self._data))


class ITimingCache:
    def __init__(self, entries: dict):
        self.entries = dict(entries)

    def serialize(self) -> IHostMemory:
        return IHostMemory(b"TRT-STANDIN-TIMING-CACHE\n" + json.dumps(self.entries).encode())


class IBuilderConfig:
    def __init__(self):
        self.flags: set[BuilderFlag] = {BuilderFlag.TF32}  # TF32 is on by default
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.calibration_profile: IOptimizationProfile | None = None
        self.int8_calibrator = None
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        CALLS.append(
            ("IBuilderConfig", "set_memory_pool_limit", (MemoryPoolType(pool).name, pool_size))
        )
        self.pools[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool) -> int:
        return self.pools.get(MemoryPoolType(pool), 0)

    def set_flag(self, flag) -> None:
        CALLS.append(("IBuilderConfig", "set_flag", (BuilderFlag(flag).name,)))
        self.flags.add(BuilderFlag(flag))

    def clear_flag(self, flag) -> None:
        CALLS.append(("IBuilderConfig", "clear_flag", (BuilderFlag(flag).name,)))
        self.flags.discard(BuilderFlag(flag))

    def get_flag(self, flag) -> bool:
        return BuilderFlag(flag) in self.flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        CALLS.append(("IBuilderConfig", "add_optimization_profile", (len(self.profiles),)))
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        CALLS.append(("IBuilderConfig", "set_calibration_profile", ()))
        self.calibration_profile = profile
        return True

    def get_calibration_profile(self):
        return self.calibration_profile

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        entries = {}
        if data.startswith(b"TRT-STANDIN-TIMING-CACHE\n"):
            entries = json.loads(data.split(b"\n", 1)[1])
        return ITimingCache(entries)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        CALLS.append(("IBuilderConfig", "set_timing_cache", (len(cache.entries), ignore_mismatch)))
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self.timing_cache


# ------------------------------------------------------------------------------ calibrators
class IInt8Calibrator:
    algorithm = "LEGACY"

    def __init__(self):
        pass


class IInt8EntropyCalibrator2(IInt8Calibrator):
    algorithm = "ENTROPY_CALIBRATION_2"


class IInt8MinMaxCalibrator(IInt8Calibrator):
    algorithm = "MINMAX_CALIBRATION"


# ------------------------------------------------------------------------------ builder
class Builder:
    def __init__(self, logger: ILogger):
        if not getattr(logger, "_standin_initialized", False):
            raise TypeError("the logger must call ILogger.__init__(self)")
        self.logger = logger
        CALLS.append(("Builder", "__init__", ()))

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        CALLS.append(("Builder", "create_network", (flags,)))
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _error(self, msg: str) -> None:
        _log(self.logger, _Severity.ERROR, msg)

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
        CALLS.append(("Builder", "build_serialized_network", ()))
        dynamic = [t for t in network._inputs if -1 in t.shape]
        if dynamic and not config.profiles:
            return self._error(
                "Network has dynamic or shape inputs, but no optimization profile has been defined."
            )
        profiles = []
        for i, p in enumerate(config.profiles):
            for t in dynamic:
                if t.name not in p.shapes:
                    return self._error(f"Optimization profile {i}: no shape set for input {t.name}")
            for name, (lo, opt, hi) in p.shapes.items():
                t = next((x for x in network._inputs if x.name == name), None)
                if t is None:
                    return self._error(f"Optimization profile {i}: {name} is not a network input")
                if not (len(lo) == len(opt) == len(hi) == len(t.shape)) or any(
                    not (a <= b <= c) or (d != -1 and not a == c == d)
                    for a, b, c, d in zip(lo, opt, hi, t.shape, strict=True)
                ):
                    return self._error(
                        f"Optimization profile {i}: {name} min {lo} <= opt {opt} <= max {hi} "
                        f"does not hold for shape {t.shape}"
                    )
            profiles.append(
                {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in p.shapes.items()}
            )
        calibration = self._calibrate(network, config)
        if calibration is False:
            return None
        layers = {}
        lowest = (
            "HALF"
            if config.get_flag(BuilderFlag.FP16) or config.get_flag(BuilderFlag.INT8)
            else "BF16"
            if config.get_flag(BuilderFlag.BF16)
            else "FLOAT"
        )
        obey = config.get_flag(BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for layer in network._layers:
            floating = any(t.dtype in _FLOATS for t in layer._outputs)
            if layer.precision_is_set and (
                obey or config.get_flag(BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            ):
                precision = layer.precision.name
            else:
                precision = lowest if floating else "FLOAT"
            layers[layer.name] = {
                "op": layer.op,
                "type": layer.type.name,
                "precision": precision,
                "precision_set": layer.precision_is_set,
                "output_types": {str(k): v.name for k, v in layer._output_types.items()},
            }
        if config.timing_cache is not None:
            config.timing_cache.entries[f"build{len(config.timing_cache.entries)}"] = len(layers)
        plan = {
            "standin": "not a TensorRT engine",
            "tensorrt_version": __version__,
            "flags": sorted(f.name for f in config.flags),
            "memory_pools": {k.name: v for k, v in config.pools.items()},
            "inputs": {t.name: list(t.shape) for t in network._inputs},
            "profiles": profiles,
            "calibration": calibration,
            "layers": layers,
        }
        return IHostMemory(MAGIC + json.dumps(plan).encode())

    def _calibrate(self, network, config):
        """None without INT8 calibration; False on a failure (logged); else what happened."""
        cal = config.int8_calibrator
        if not config.get_flag(BuilderFlag.INT8) or cal is None:
            return None
        names = [t.name for t in network._inputs]
        cached = cal.read_calibration_cache()
        CALLS.append(("IInt8Calibrator", "read_calibration_cache", (cached is not None,)))
        if cached:
            return {"algorithm": cal.algorithm, "from_cache": True, "batches": 0}
        profile = config.calibration_profile or (
            config.profiles[0] if len(config.profiles) == 1 else None
        )
        if profile is None and any(-1 in t.shape for t in network._inputs):
            self._error(
                "Calibration profile must be set for a network with dynamic shapes and several profiles"
            )
            return False
        batch_size = cal.get_batch_size()
        if profile is not None:
            opt_batch = profile.shapes[names[0]][1][0]
            if batch_size != opt_batch:
                self._error(
                    f"Calibration batch size {batch_size} does not match the calibration "
                    f"profile's batch {opt_batch}"
                )
                return False
        count = 0
        while count < 10_000:
            ptrs = cal.get_batch(names)
            CALLS.append(
                ("IInt8Calibrator", "get_batch", (list(names), ptrs is not None and len(ptrs) > 0))
            )
            if not ptrs:
                break
            if len(ptrs) != len(names) or not all(isinstance(p, int) and p > 0 for p in ptrs):
                self._error(
                    f"get_batch returned {ptrs!r} for {len(names)} inputs: expected pointers"
                )
                return False
            count += 1
        if count == 0:
            self._error("Calibration failure: the calibrator gave no batch")
            return False
        header = f"TRT-{__version__}-{cal.algorithm}\n".encode()
        cache = CALIB_MAGIC + header + json.dumps({"batches": count}).encode()
        cal.write_calibration_cache(cache)
        CALLS.append(("IInt8Calibrator", "write_calibration_cache", (len(cache),)))
        return {
            "algorithm": cal.algorithm,
            "from_cache": False,
            "batches": count,
            "batch_size": batch_size,
        }


# ------------------------------------------------------------------------------ runtime
class ICudaEngine:
    def __init__(self, plan: dict):
        self.plan = plan

    num_optimization_profiles = property(lambda self: len(self.plan["profiles"]))

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        s = self.plan["profiles"][profile_index][name]
        return [tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])]

    def create_execution_context(self):
        raise RuntimeError("the TensorRT stand-in executes nothing (tests check builds only)")


class Runtime:
    def __init__(self, logger: ILogger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes):
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            _log(self.logger, _Severity.ERROR, "Serialization assertion failed: magic tag mismatch")
            return None
        return ICudaEngine(json.loads(data[len(MAGIC) :]))


# ------------------------------------------------------------------------------ the module
__version__ = "10.8.0.43"
CALLS: list[tuple] = []


def make_module(version: str = "10.8.0.43") -> types.ModuleType:
    """A fresh ``tensorrt`` module (this file's API, an empty call record) for ``sys.modules``.

    ``importlib.util.find_spec("tensorrt")`` finds it (it has a spec), as the project checks."""
    global __version__
    __version__ = version
    CALLS.clear()
    spec = importlib.util.spec_from_loader("tensorrt", loader=None)
    mod = importlib.util.module_from_spec(spec)
    names = (
        "DataType BuilderFlag MemoryPoolType NetworkDefinitionCreationFlag LayerType ErrorCode "
        "ILogger ITensor ILayer INetworkDefinition ParserError OnnxParser IOptimizationProfile "
        "IHostMemory ITimingCache IBuilderConfig IInt8Calibrator IInt8EntropyCalibrator2 "
        "IInt8MinMaxCalibrator Builder ICudaEngine Runtime MAGIC CALIB_MAGIC CALLS"
    )
    for n in names.split():
        setattr(mod, n, getattr(sys.modules[__name__], n))
    mod.__version__ = version
    mod.__standin__ = True
    for alias, dt in (("float32", DataType.FLOAT), ("float16", DataType.HALF), ("bfloat16", DataType.BF16),
                      ("int8", DataType.INT8), ("int32", DataType.INT32), ("int64", DataType.INT64),
                      ("bool", DataType.BOOL)):  # fmt: skip
        setattr(mod, alias, dt)
    return mod


def read_plan(path) -> dict:
    """The build a stand-in plan file describes."""
    from pathlib import Path

    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a stand-in plan")
    return json.loads(data[len(MAGIC) :])
