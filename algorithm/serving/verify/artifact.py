"""Does an artifact load as what its name says, with the model's inputs and outputs?

What a server's load would run, without running the model: an ONNX file parses, passes
``onnx.checker`` and has the contract's input/output names, dtypes and ranks (and the sidecar's
K); OpenVINO IR reads (with its .bin) and has the contract's names; a UGT checkpoint reads
(safetensors or weights-only); an AOTInductor package is an intact zip; a TensorRT plan is not
some other format (deserializing one needs TensorRT and a GPU). ``artifact_problems`` returns
each problem with a hint; publishing (``ModelVersionManager.deploy_version``), validation
(``validate_deployment``) and ``optimize`` (its input ONNX) use it, so a file that a server
would fail on is refused before it is published, not when the server loads it.
"""

from __future__ import annotations

import importlib.util
import logging
import zipfile
from pathlib import Path

from algorithm.serving.contract import INPUT_NAMES, OUTPUT_NAMES

logger = logging.getLogger(__name__)

Problem = tuple[str, str]  # (message, hint)

_REBUILD = (
    "The file is truncated or not what its name says: rebuild it with `ugt-serving export` / "
    "`optimize` (or `deploy`), then publish it again."
)
_ONNX_TYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 11: "float64"}
# Rank of each tensor of the contract: inputs [batch, seq_len]; recommendations [batch, K, 3];
# scores [batch, K].
_RANKS = {**dict.fromkeys(INPUT_NAMES, 2), "recommendations": 3, "scores": 2}
_CONTRACT_DTYPES = {**dict.fromkeys(INPUT_NAMES, "int64"), "recommendations": "int64"}


def artifact_kind(path) -> str:
    """onnx, openvino, tensorrt, torch_aot or checkpoint (by the file's suffix); '' if unknown."""
    suffix = Path(path).suffix
    return {
        ".onnx": "onnx",
        ".xml": "openvino",
        ".plan": "tensorrt",
        ".engine": "tensorrt",
        ".pt2": "torch_aot",
        ".safetensors": "checkpoint",
        ".pt": "checkpoint",
        ".pth": "checkpoint",
    }.get(suffix, "")


def artifact_problems(path, sidecar: dict | None = None) -> list[Problem]:
    """Every reason ``path`` would fail to load as a UGT artifact (empty: it loads)."""
    p = Path(path)
    if not p.exists():
        return [(f"{p} not found", "Check the path.")]
    if p.is_dir():
        return []  # a folder artifact (none of ours): nothing to parse
    if p.stat().st_size == 0:
        return [(f"{p} is empty", _REBUILD)]
    check = {
        "onnx": onnx_problems,
        "openvino": _openvino_problems,
        "tensorrt": _plan_problems,
        "torch_aot": _pt2_problems,
        "checkpoint": _checkpoint_problems,
    }.get(artifact_kind(p))
    if check is None:
        return [
            (
                f"{p}: unknown artifact type {p.suffix!r}",
                "Publish a .onnx, .xml (+ .bin), .plan, .pt2 or .safetensors artifact.",
            )
        ]
    return check(p, sidecar or {})


# ------------------------------------------------------------------------------------- ONNX
def onnx_problems(p, sidecar: dict | None = None) -> list[Problem]:
    """Why ``p`` is not a loadable UGT ONNX model (empty: it is), whatever its file name."""
    import onnx

    p, sidecar = Path(p), sidecar or {}

    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, and whatever a foreign file makes the parser raise
        return [(f"{p} does not parse as an ONNX model ({type(e).__name__}: {e})", _REBUILD)]
    try:
        onnx.checker.check_model(str(p))  # by path: also checks external data files
    except Exception as e:  # ValidationError, or a parse failure of external data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [(f"{p} fails onnx.checker: {first}", _REBUILD)]
    initializers = {t.name for t in model.graph.initializer}
    tensors = {
        "input": [i for i in model.graph.input if i.name not in initializers],
        "output": list(model.graph.output),
    }
    problems: list[Problem] = []
    for kind, expected in (("input", INPUT_NAMES), ("output", OUTPUT_NAMES)):
        names = [t.name for t in tensors[kind]]
        if sorted(names) != sorted(expected):
            problems.append(
                (
                    f"{p}: {kind}s {names} differ from the UGT contract's {list(expected)}",
                    "This is not a UGT model export: export the model with `ugt-serving export`.",
                )
            )
            continue
        for t in tensors[kind]:
            tt = t.type.tensor_type
            problems += _tensor_problems(
                p, t.name, _ONNX_TYPES.get(tt.elem_type, str(tt.elem_type)), _dims(tt), sidecar
            )
    return problems


def _dims(tensor_type) -> list[int | None]:
    if not tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _declared(sidecar: dict, name: str) -> dict:
    for entry in sidecar.get("inputs", []) + sidecar.get("outputs", []):
        if entry.get("name") == name:
            return entry
    return {}


def _tensor_problems(p: Path, name: str, dtype: str, dims: list, sidecar: dict) -> list[Problem]:
    """One tensor against the contract (rank, integer dtypes) and the sidecar (dtype, K)."""
    problems: list[Problem] = []
    declared = _declared(sidecar, name)
    want = declared.get("dtype") or _CONTRACT_DTYPES.get(name)
    if want and dtype != want:
        source = "its sidecar" if declared.get("dtype") else "the UGT contract"
        problems.append(
            (
                f"{p}: {name} is {dtype} but {source} says {want}",
                "The artifact and its sidecar (<artifact>.json) come from different builds: "
                "publish them together.",
            )
        )
    if dims and len(dims) != _RANKS[name]:
        problems.append(
            (
                f"{p}: {name} has rank {len(dims)}, the UGT contract has {_RANKS[name]}",
                "This is not a UGT model export: export the model with `ugt-serving export`.",
            )
        )
    k = sidecar.get("num_recommendations")
    if k and name in ("recommendations", "scores") and len(dims) >= 2 and dims[1] not in (None, k):
        problems.append(
            (
                f"{p}: {name} returns K={dims[1]} but its sidecar says K={k}",
                "The artifact and its sidecar come from different models: publish them together.",
            )
        )
    return problems


# --------------------------------------------------------------------------------- OpenVINO
def _openvino_problems(p: Path, sidecar: dict) -> list[Problem]:
    weights = p.with_suffix(".bin")
    if not weights.is_file():
        return [
            (f"{p}: its weights {weights.name} are missing", "Publish the .xml and .bin together.")
        ]
    if importlib.util.find_spec("openvino") is None:
        with open(p, "rb") as f:
            head = f.read(512)
        if b"<net" not in head and b"<?xml" not in head:
            return [(f"{p} does not look like OpenVINO IR XML", _REBUILD)]
        logger.info("openvino not installed: %s checked by its header only", p)
        return []
    import openvino as ov

    try:
        model = ov.Core().read_model(str(p), str(weights))
    except Exception as e:  # openvino raises RuntimeError subclasses of its own
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [(f"{p} does not read as OpenVINO IR: {first}", _REBUILD)]
    names = {n for port in (*model.inputs, *model.outputs) for n in port.get_names()}
    missing = [n for n in (*INPUT_NAMES, *OUTPUT_NAMES) if n not in names]
    if missing:
        return [
            (
                f"{p}: tensors {missing} of the UGT contract are missing",
                "This is not a UGT model: build it with `ugt-serving optimize --backend openvino`.",
            )
        ]
    return []


# ------------------------------------------------------------------- TensorRT, torch, checkpoints
def _plan_problems(p: Path, sidecar: dict) -> list[Problem]:
    with open(p, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x08" or head.lstrip()[:1] in (b"<", b"{") or head[:2] == b"PK":
        return [(f"{p} looks like an ONNX/XML/JSON/zip file, not a TensorRT engine", _REBUILD)]
    return []  # deserializing needs TensorRT and the GPU it was built for


def _pt2_problems(p: Path, sidecar: dict) -> list[Problem]:
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return [(f"{p} is not an AOTInductor package (a zip): {e}", _REBUILD)]
    if bad is not None:
        return [(f"{p}: {bad} inside the package is corrupt", _REBUILD)]
    return []


def _checkpoint_problems(p: Path, sidecar: dict) -> list[Problem]:
    from algorithm.errors import ServingError
    from algorithm.ugt.checkpoint import read_checkpoint

    try:
        read_checkpoint(p)
    except ServingError as e:
        return [(str(e).splitlines()[0], e.hint or _REBUILD)]
    return []
