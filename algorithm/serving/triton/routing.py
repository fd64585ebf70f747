"""The router model of an experiment in a model repository: config, version folder, history,
validation.

Layout::

    <repo>/<router>/config.pbtxt       Triton's ModelConfig: the arms' inputs + user_id, their
                                       outputs + arm, python backend, the experiment as parameters
    <repo>/<router>/1/model.py         python_model/router.py
    <repo>/<router>/experiment.json    what happened: created, split changed, promoted, stopped

The router's inputs and outputs are copied from arm A's config, and B must declare the same
ones, so a client sees the arms' contract plus ``user_id`` and ``arm``. The router runs on CPU
instances and has no dynamic batcher: it forwards each request at once, and the arms batch.

Every change is one atomic rewrite of config.pbtxt (``fsutil``) under the router folder's lock:
a server reading the folder (poll mode, or ``load_model`` in explicit mode) sees the old or the
new experiment, never half of one. Triton loads the new router instances before it retires the
old ones, and the old ones answer the requests they hold first (``router.py``'s finalize).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from algorithm.errors import ConfigError, RepositoryError
from algorithm.fsutil import (
    folder_lock,
    fsync_dir,
    fsync_tree,
    make_dirs,
    write_json,
    write_text_atomic,
)
from algorithm.serving.config import ExperimentConfig, check_name
from algorithm.serving.traffic import ARM_OUTPUT, USER_ID_INPUT
from algorithm.serving.triton.schema import (
    PYTHON_MODEL_FILE,
    config_to_text,
    model_config_pb2,
    parse_config,
)

logger = logging.getLogger(__name__)

ROLE_PARAMETER = "ugt_role"
ARM_MAX_BATCH = "arm_max_batch_size"  # the router's python_model/router.py reads it
ROLE_ROUTER = "router"
HISTORY_FILE = "experiment.json"
ROUTER_VERSION = 1


def router_source() -> Path:
    """The router's model.py as shipped in the package."""
    return Path(__file__).resolve().parent / "python_model" / "router.py"


def is_router(config) -> bool:
    """True for the ModelConfig of a router model (its ``ugt_role`` parameter)."""
    p = config.parameters
    return ROLE_PARAMETER in p and p[ROLE_PARAMETER].string_value == ROLE_ROUTER


def _read_config(model_dir: Path, what: str):
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(
            f"{what} {model_dir.name!r}: {path} not found",
            hint="Deploy both arms first (`ugt-serving deploy --model-name NAME`), then create "
            "the experiment.",
        )
    try:
        return parse_config(path.read_text())
    except Exception as e:  # text_format.ParseError and friends
        raise RepositoryError(f"{path} does not parse as a Triton ModelConfig: {e}") from e


def _signature(config) -> tuple[list, list]:
    """(inputs, outputs) as comparable (name, data type, dims) rows."""
    pb = model_config_pb2()

    def rows(tensors):
        return [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in tensors]

    return rows(config.input), rows(config.output)


def arm_problems(repo: Path, exp: ExperimentConfig) -> tuple[list[str], object | None]:
    """What keeps the two arms from being routed between, and A's config (None if unreadable)."""
    problems, configs = [], {}
    for arm, name in (("A", exp.model_a), ("B", exp.model_b)):
        try:
            configs[arm] = _read_config(repo / name, f"arm {arm}")
        except RepositoryError as e:
            problems.append(str(e))
            continue
        if is_router(configs[arm]):
            problems.append(f"arm {arm} {name!r} is itself a router")
        elif configs[arm].max_batch_size < 1:
            problems.append(
                f"arm {arm} {name!r} has max_batch_size 0; the router needs a batch dimension"
            )
    if len(configs) == 2 and _signature(configs["A"]) != _signature(configs["B"]):
        a, b = _signature(configs["A"]), _signature(configs["B"])
        problems.append(
            f"the arms differ in inputs/outputs: {exp.model_a} {a}, {exp.model_b} {b}; "
            "both must answer the same contract"
        )
    return problems, configs.get("A")


def router_config(exp: ExperimentConfig, arm_config):
    """The router's ModelConfig: A's inputs + user_id, A's outputs + arm, CPU instances, the
    experiment as parameters. Parsed back strictly by the caller's write."""
    pb = model_config_pb2()
    # The router's batch is the requests it forwards at once (``workers`` histories): its
    # batcher gathers what queued while the last requests were forwarded. Each request keeps
    # to the arms' own limit (checked by the router).
    cfg = pb.ModelConfig(
        name=exp.router_name,
        backend="python",
        max_batch_size=max(exp.workers, arm_config.max_batch_size),
    )
    cfg.dynamic_batching.max_queue_delay_microseconds = 0
    for t in arm_config.input:
        cfg.input.add().CopyFrom(t)
    cfg.input.add(name=USER_ID_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    for t in arm_config.output:
        cfg.output.add().CopyFrom(t)
    cfg.output.add(name=ARM_OUTPUT, data_type=pb.TYPE_STRING, dims=[1])
    cfg.instance_group.add(count=exp.instance_count, kind=pb.ModelInstanceGroup.KIND_CPU)
    cfg.version_policy.latest.num_versions = 1
    cfg.parameters[ROLE_PARAMETER].string_value = ROLE_ROUTER
    cfg.parameters[ARM_MAX_BATCH].string_value = str(arm_config.max_batch_size)
    for key, value in exp.to_parameters().items():
        cfg.parameters[key].string_value = value
    return cfg


def _config_text(config) -> str:
    text = config_to_text(config)
    parse_config(text)  # strict: what is written is what Triton will parse
    return text


def _publish_code(model_dir: Path) -> None:
    """``<router>/1/model.py`` = router.py, replaced only when it differs: staged in a hidden
    folder, fsynced, renamed into place."""
    target = model_dir / str(ROUTER_VERSION)
    source = router_source().read_bytes()
    current = target / PYTHON_MODEL_FILE
    if current.is_file() and current.read_bytes() == source:
        return
    staging = model_dir / f".staging-{ROUTER_VERSION}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / PYTHON_MODEL_FILE).write_bytes(source)
        os.chmod(staging, 0o755)
        os.chmod(staging / PYTHON_MODEL_FILE, 0o644)
        fsync_tree(staging)
        if target.exists():
            trash = model_dir / f".trash-{ROUTER_VERSION}-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staging, target)
        fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _event(exp: ExperimentConfig, action: str, **extra) -> dict:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "action": action,
        "mode": exp.mode,
        "status": exp.status,
        "traffic_split": exp.traffic_split,
        "shadow_fraction": exp.shadow_fraction,
        **extra,
    }


def read_history(repository, router_name: str) -> dict:
    """The experiment's history file ({"experiment", "events": [...]}), or an empty one."""
    path = Path(repository) / check_name("router_name", router_name) / HISTORY_FILE
    if not path.is_file():
        return {"experiment": None, "events": []}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RepositoryError(f"{path} is unreadable: {e}") from e


def _append_history(model_dir: Path, exp: ExperimentConfig, event: dict) -> None:
    history = read_history(model_dir.parent, model_dir.name)
    if event["action"] == "created":
        history = {"experiment": exp.name, "events": []}
    history["experiment"] = exp.name
    history["events"].append(event)
    write_json(model_dir / HISTORY_FILE, history)


def write_router(repository, exp: ExperimentConfig) -> Path:
    """Create (or re-create) the router of ``exp`` in ``repository``; returns its config path.

    Both arms must be in the repository with the same inputs and outputs. A folder of that name
    holding a model that is not a router is never overwritten."""
    exp = exp.validate()
    repo = Path(repository)
    problems, arm_config = arm_problems(repo, exp)
    if problems:
        raise RepositoryError(
            "; ".join(problems), hint="Deploy both arms with the same contract, then create it."
        )
    model_dir = repo / exp.router_name
    if (model_dir / "config.pbtxt").is_file() and not is_router(_read_config(model_dir, "model")):
        raise RepositoryError(
            f"{model_dir} holds a model that is not a router; it is left as it is",
            hint="Name the router something else (--router / ExperimentConfig.router_name).",
        )
    text = _config_text(router_config(exp, arm_config))
    make_dirs(model_dir)
    with folder_lock(model_dir):
        _publish_code(model_dir)
        path = write_text_atomic(model_dir / "config.pbtxt", text)
        _append_history(
            model_dir, exp, _event(exp, "created", model_a=exp.model_a, model_b=exp.model_b)
        )
    logger.info(
        "router %s: %s between %s and %s", exp.router_name, exp.mode, exp.model_a, exp.model_b
    )
    return path


def read_experiment(repository, router_name: str) -> ExperimentConfig:
    """The experiment a router's config.pbtxt holds."""
    model_dir = Path(repository) / check_name("router_name", router_name)
    config = _read_config(model_dir, "router")
    if not is_router(config):
        raise RepositoryError(f"{model_dir.name!r} in {repository} is not a router model")
    params = {k: v.string_value for k, v in config.parameters.items()}
    return ExperimentConfig.from_parameters(params)


def update_router(repository, router_name: str, action: str, **changes) -> ExperimentConfig:
    """Change the experiment (split, mode, status, ...) in one atomic rewrite of config.pbtxt,
    recorded in the history as ``action``; returns the new experiment."""
    model_dir = Path(repository) / check_name("router_name", router_name)
    if not model_dir.is_dir():
        raise RepositoryError(
            f"router {router_name!r} not found in {repository}",
            hint="Create it first: `ugt-serving abtest create`.",
        )
    with folder_lock(model_dir):
        config = _read_config(model_dir, "router")
        if not is_router(config):
            raise RepositoryError(f"{router_name!r} in {repository} is not a router model")
        old = ExperimentConfig.from_parameters(
            {k: v.string_value for k, v in config.parameters.items()}
        )
        fixed = sorted({"router_name", "model_a", "model_b"} & set(changes))
        if fixed:
            raise ConfigError(
                fixed[0],
                changes[fixed[0]],
                f"unchanged ({getattr(old, fixed[0])}): the arms make the experiment; create a new one",
            )
        exp = old.replace(**changes)
        arm_batch = config.parameters[ARM_MAX_BATCH].string_value
        config.ClearField("parameters")
        config.parameters[ROLE_PARAMETER].string_value = ROLE_ROUTER
        config.parameters[ARM_MAX_BATCH].string_value = arm_batch
        for key, value in exp.to_parameters().items():
            config.parameters[key].string_value = value
        config.instance_group[0].count = exp.instance_count
        config.max_batch_size = max(exp.workers, int(arm_batch or 1))
        write_text_atomic(model_dir / "config.pbtxt", _config_text(config))
        _append_history(model_dir, exp, _event(exp, action))
    logger.info("router %s: %s (%s)", router_name, action, changes)
    return exp


def validate_router(model_dir: Path, config) -> tuple[list[str], dict]:
    """validate_deployment's check of a router model: its experiment, its arms (present, same
    contract, the router's inputs and outputs theirs plus user_id/arm), its version folder."""
    name = model_dir.name
    errors: list[str] = []
    info: dict = {"model_name": name, "platform": "router", "versions": [], "warnings": []}
    try:
        exp = ExperimentConfig.from_parameters(
            {k: v.string_value for k, v in config.parameters.items()}
        )
    except ConfigError as e:
        return [f"{name}: experiment parameter {e}"], info
    info["experiment"] = {k: v for k, v in exp.to_dict().items() if k != "router_name"}
    if exp.router_name != name:
        errors.append(f"{name}: parameter router_name={exp.router_name!r} differs from the folder")
    problems, arm_config = arm_problems(model_dir.parent, exp)
    errors += [f"{name}: {p}" for p in problems]
    if arm_config is not None:
        want = _signature(router_config(exp, arm_config))
        if _signature(config) != want:
            errors.append(
                f"{name}: inputs/outputs {_signature(config)} differ from the arms' plus "
                f"{USER_ID_INPUT}/{ARM_OUTPUT} {want}; re-create the router"
            )
    if arm_config is not None:
        wanted = router_config(exp, arm_config)
        for field in ("max_batch_size", "parameters"):
            if getattr(config, field) != getattr(wanted, field):
                errors.append(f"{name}: {field} differs from what the arms need; re-create it")
        if not config.HasField("dynamic_batching"):
            errors.append(f"{name}: no dynamic batcher: the router forwards one request at a time")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    info["versions"] = versions
    if not versions:
        errors.append(f"{name}: no version folder (e.g. {name}/1/model.py)")
    for v in versions:
        code = model_dir / str(v) / PYTHON_MODEL_FILE
        if not code.is_file():
            errors.append(f"{name} v{v}: {code} missing")
        elif code.read_bytes() != router_source().read_bytes():
            info["warnings"].append(
                f"{name} v{v}: model.py differs from this package's router (re-create to update)"
            )
    return errors, info


__all__ = [
    "HISTORY_FILE",
    "arm_problems",
    "is_router",
    "read_experiment",
    "read_history",
    "router_config",
    "router_source",
    "update_router",
    "validate_router",
    "write_router",
]
