"""``validate_deployment``: check a model repository the way Triton will load it (guide 5.5).

Per model: config.pbtxt parses strictly against Triton's ModelConfig schema; every version folder
holds the files its platform loads, and each artifact passes what loading it runs
(``verify/artifact.py``: an ONNX file parses, passes the checker and has the contract's inputs and
outputs; IR reads; a checkpoint reads); the config's inputs/outputs match the artifact's sidecar;
and, for a repository served on this host, the instance groups' devices exist here. So a
repository that validates is one the server loads. Each error comes with a hint (``hints``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from algorithm.errors import RepositoryError
from algorithm.serving.config import PYTHON_RUNTIMES
from algorithm.serving.contract import SIDECAR_NAME
from algorithm.serving.triton.repository import ModelVersionManager, _model_name, check_filename
from algorithm.serving.triton.routing import is_router, validate_router
from algorithm.serving.triton.schema import (
    DEFAULT_FILENAMES,
    TRITON_DTYPES,
    model_config_pb2,
    parse_config,
)
from algorithm.serving.verify.artifact import artifact_problems

logger = logging.getLogger(__name__)

Problem = tuple[str, str]  # (message, hint)

_REPUBLISH = (
    "Publish a good artifact as a new version (`ugt-serving deploy`, or `ugt-serving versions "
    "deploy FILE`), or serve an earlier one (`ugt-serving versions rollback N`)."
)
_RECONFIG = "Regenerate the config: `ugt-serving config -r REPOSITORY` (or `deploy`)."


def gpu_count() -> int:
    """CUDA GPUs this host can use (CUDA_VISIBLE_DEVICES applies); 0 without torch or a driver."""
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    try:
        return torch.cuda.device_count()
    except Exception:  # a broken driver counts as none
        return 0


def _platform(config) -> str:
    return "python" if config.backend == "python" else (config.platform or config.backend)


def _sidecar_for(version_dir: Path) -> dict:
    p = version_dir / SIDECAR_NAME
    if not p.is_file():
        p = version_dir.parent / SIDECAR_NAME
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def _artifact_problems(config, version_dir: Path) -> tuple[list[Problem], int]:
    """Problems of one version folder's files, and their size in bytes."""
    problems: list[Problem] = []
    platform = _platform(config)
    if platform not in DEFAULT_FILENAMES:
        return [(f"unknown platform/backend {platform!r}", _RECONFIG)], 0
    expected = config.default_model_filename or DEFAULT_FILENAMES[platform]
    files = [expected]
    artifacts = [] if platform == "python" else [expected]
    if platform == "openvino":
        files.append(str(Path(expected).with_suffix(".bin")))
    if platform == "python":
        artifact = (
            config.parameters["artifact"].string_value if "artifact" in config.parameters else ""
        )
        if not artifact:
            problems.append(("python model without an 'artifact' parameter", _RECONFIG))
        else:
            files.append(artifact)
            artifacts.append(artifact)
    size = 0
    sidecar = _sidecar_for(version_dir)
    for f in files:
        try:
            check_filename("artifact file", f)
        except RepositoryError as e:
            problems.append((str(e), e.hint))
            continue
        p = version_dir / f
        if not p.exists():
            present = sorted(x.name for x in version_dir.iterdir())
            problems.append(
                (f"{p} missing (platform {platform} expects {f}; present: {present})", _REPUBLISH)
            )
            continue
        n = (
            sum(x.stat().st_size for x in p.rglob("*") if x.is_file())
            if p.is_dir()
            else p.stat().st_size
        )
        size += n
        if f in artifacts or n == 0:
            problems += [(m, _REPUBLISH) for m, _ in artifact_problems(p, sidecar)]
    return problems, size


def _io_problems(config, sidecar: dict) -> list[str]:
    pb = model_config_pb2()
    errors = []
    for kind, declared in (("input", config.input), ("output", config.output)):
        want = [
            (x["name"], TRITON_DTYPES.get(x.get("dtype", ""), "?"))
            for x in sidecar.get(f"{kind}s", [])
        ]
        have = [(x.name, pb.DataType.Name(x.data_type)) for x in declared]
        if [n for n, _ in want] != [n for n, _ in have]:
            errors.append(
                f"{kind} names {[n for n, _ in have]} differ from the model's {[n for n, _ in want]}"
            )
        else:
            errors += [
                f"{kind} {n}: data_type {h} but the model has {w}"
                for (n, w), (_, h) in zip(want, have, strict=True)
                if w != h
            ]
    k = sidecar.get("num_recommendations")
    for out in config.output:
        if k and list(out.dims)[:1] != [k]:
            errors.append(f"output {out.name} dims {list(out.dims)} but the model returns K={k}")
    mbs = sidecar.get("max_batch_size")
    if mbs and config.max_batch_size > mbs:
        errors.append(f"max_batch_size {config.max_batch_size} exceeds the exported model's {mbs}")
    return errors


def checks_host(platform: str, host: bool | None) -> bool:
    """Whether a model of ``platform`` is checked against this host's devices: ``host`` if
    given, else for python-backend models (the ones this project's tritonserver serves here)."""
    return platform == "python" if host is None else bool(host)


def host_problems(groups, gpus: int | None = None) -> list[Problem]:
    """Instance groups ``[(kind, gpu ids)]`` whose devices this host lacks (Triton fails such a
    model at load: "unable to create ... on GPU 0")."""
    problems = []
    for kind, ids in groups:
        if kind != "KIND_GPU":
            continue
        gpus = gpu_count() if gpus is None else gpus
        absent = [i for i in (sorted(set(ids)) or [0]) if i >= gpus]
        if absent:
            have = f"{gpus} CUDA GPU{'s' if gpus != 1 else ''}" if gpus else "no CUDA GPU"
            problems.append(
                (
                    f"instance group KIND_GPU on GPU {absent} but this host has {have}",
                    "Deploy for this host with --instance-kind KIND_CPU (or auto), or say the "
                    "repository is for another host with --target other.",
                )
            )
    return problems


def _validate_model(
    model_dir: Path, host: bool | None, served_only: bool = False
) -> tuple[list[Problem], dict]:
    name = model_dir.name
    problems: list[Problem] = []
    info: dict = {"model_name": name, "versions": [], "warnings": []}
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        return [(f"{name}: config.pbtxt missing", _RECONFIG)], info
    try:
        config = parse_config(cfg_path.read_text())
    except Exception as e:  # text_format.ParseError (strict: unknown fields fail)
        return [
            (
                f"{name}: config.pbtxt does not parse against Triton's ModelConfig schema: {e}",
                _RECONFIG,
            )
        ], info
    if config.name and config.name != name:
        problems.append(
            (f"{name}: config name {config.name!r} differs from the folder name", _RECONFIG)
        )
    if is_router(config):  # an experiment's router: no artifact of its own, two arms
        router_errors, info = validate_router(model_dir, config)
        hint = "Fix the experiment: `ugt-serving abtest status ROUTER` says what it routes to."
        return problems + [(m, hint) for m in router_errors], info
    platform = _platform(config)
    info.update(
        platform=platform,
        max_batch_size=config.max_batch_size,
        inputs=[i.name for i in config.input],
        outputs=[o.name for o in config.output],
        dynamic_batching=config.HasField("dynamic_batching"),
        instance_groups=[
            {
                "kind": model_config_pb2().ModelInstanceGroup.Kind.Name(g.kind),
                "count": g.count,
                "gpus": list(g.gpus),
            }
            for g in config.instance_group
        ],
    )
    if platform == "python":
        runtime = (
            config.parameters["runtime"].string_value if "runtime" in config.parameters else ""
        )
        info["python_runtime"] = runtime
        if runtime not in PYTHON_RUNTIMES:
            problems.append(
                (
                    f"{name}: python parameter runtime={runtime!r} is not one of {', '.join(PYTHON_RUNTIMES)}",
                    _RECONFIG,
                )
            )
    info["host_checked"] = checks_host(platform, host)
    if info["host_checked"]:
        groups = [(g["kind"], g["gpus"]) for g in info["instance_groups"]]
        problems += [(f"{name}: {m}", h) for m, h in host_problems(groups)]
    sizes = {}
    served = (
        set(ModelVersionManager(model_dir.parent).served_versions(name)) if served_only else None
    )
    for p in sorted(model_dir.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not p.name.isdigit() or int(p.name) < 1:
            problems.append(
                (
                    f"{name}: folder {p.name!r} is not a version (a positive integer)",
                    "Triton reads only numeric version folders: rename or remove it.",
                )
            )
            continue
        if served is not None and int(p.name) not in served:  # Triton will not load it
            sizes[int(p.name)] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            continue
        found, sizes[int(p.name)] = _artifact_problems(config, p)
        problems += [(f"{name} v{p.name}: {m}", h) for m, h in found]
        sidecar_file = (
            p / SIDECAR_NAME if (p / SIDECAR_NAME).is_file() else model_dir / SIDECAR_NAME
        )
        if sidecar_file.is_file():
            try:
                sidecar = json.loads(sidecar_file.read_text())
            except (OSError, ValueError) as e:
                problems.append(
                    (f"{name} v{p.name}: unreadable {sidecar_file.name}: {e}", _REPUBLISH)
                )
                continue
            problems += [
                (f"{name} v{p.name}: {m}", _RECONFIG) for m in _io_problems(config, sidecar)
            ]
        else:
            info["warnings"].append(
                f"{name} v{p.name}: no {SIDECAR_NAME}; input/output names not checked"
            )
    info["versions"] = sorted(sizes)
    info["artifact_bytes"] = sizes
    if not sizes:
        problems.append(
            (
                f"{name}: no version folders (e.g. {name}/1/)",
                "Publish a version: `ugt-serving deploy` or `ugt-serving versions deploy FILE`.",
            )
        )
    else:
        manager = ModelVersionManager(model_dir.parent)
        info["served_versions"] = manager.served_versions(name)
        info["retired_versions"] = manager.retired_versions(name)
    return problems, info


def _result(problems: list[Problem], info: dict) -> dict:
    hints = list(dict.fromkeys(h for _, h in problems if h))
    return {"valid": not problems, "errors": [m for m, _ in problems], "hints": hints, "info": info}


def validate_deployment(
    model_repository,
    model_name: str | None = None,
    *,
    host: bool | None = None,
    served_only: bool = False,
) -> dict:
    """Check a repository (or one model of it) the way Triton will load it (guide 5.5).

    Returns {"valid", "errors": [str], "hints": [str], "info": {...}}; ``info`` is the model's
    (with "versions") when ``model_name`` is given, else {"models": {name: info}, "versions"}.
    ``host``: True checks that every instance group's devices exist on this host; False never;
    None (default) checks python-backend models, the ones this project's tritonserver serves.
    ``served_only``: check only the versions the version policy serves (what a server starting
    now loads; ``ugt-serving serve`` uses it), not every version present.
    """
    repo = Path(model_repository)
    if not repo.is_dir():
        what = "is a file, not a folder" if repo.exists() else "does not exist"
        hint = "Pass the repository folder (`ugt-serving deploy -r FOLDER` creates one)."
        return _result([(f"model repository {repo} {what}", hint)], {})
    if model_name is not None:
        try:
            _model_name(model_name)
        except RepositoryError as e:
            return _result([(str(e), e.hint)], {})
        if not (repo / model_name).is_dir():
            present = sorted(
                p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            return _result(
                [
                    (
                        f"model {model_name!r} not in {repo} (present: {present})",
                        "Pass one of the present names with --model.",
                    )
                ],
                {},
            )
        problems, info = _validate_model(repo / model_name, host, served_only)
        return _result(problems, info)
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        return _result(
            [(f"{repo} holds no model folders", "Create one with `ugt-serving deploy`.")],
            {"models": {}},
        )
    problems, infos = [], {}
    for m in models:
        found, infos[m.name] = _validate_model(m, host, served_only)
        problems += found
    return _result(
        problems, {"models": infos, "versions": {k: v["versions"] for k, v in infos.items()}}
    )
