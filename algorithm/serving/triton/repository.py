"""Model repository: atomic version publish, rollback, cleanup, and deployment validation.

Layout (Triton's)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/ugt_model.json          the model contract of the newest deployed version
    <repo>/<name>/<version>/<artifact>    + ugt_model.json (+ model.py for python models)
    <repo>/<name>/.retired/<version>/     versions taken out of service by rollback

Publishing writes a version into a hidden staging folder of the model folder, fsyncs it, and
renames it into place, so a server (polling or told to reload) never sees half a version.
Triton ignores folders whose names are not integers, so ``.staging-*`` and ``.retired`` are
invisible to it. Writers of one model (deploy, rollback, cleanup) hold an flock on
the model folder, so under it any staging folder is the debris of a killed publish: the
next deploy removes it. Published files are 0644 and folders 0755 whatever the umask.

Rollback (policy "latest", the default): the served version is the newest numeric folder, so
``rollback(name, v)`` moves every version newer than ``v`` into ``.retired/``. Rolling forward
is another rollback to a retired version (it is moved back). A server in explicit model-control
mode picks the change up on ``load_model(name)``; in poll mode on its next poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from algorithm.errors import ConfigError, InputFileNotFoundError, RepositoryError
from algorithm.fsutil import fsync_dir, fsync_tree, make_dirs, write_text_atomic
from algorithm.serving.config import PYTHON_RUNTIMES, check_name
from algorithm.serving.contract import SIDECAR_NAME
from algorithm.serving.triton.schema import (
    DEFAULT_FILENAMES,
    PYTHON_MODEL_FILE,
    TRITON_DTYPES,
    artifact_filename,
    model_config_pb2,
    parse_config,
)

logger = logging.getLogger(__name__)

RETIRED = ".retired"
# What a publish killed midway leaves behind (hidden from Triton; removed by the next deploy).
_DEBRIS_DIRS = (".staging-", ".trash-")
_DEBRIS_FILES = f".{SIDECAR_NAME}."


# ------------------------------------------------------------------------------- file helpers


@contextlib.contextmanager
def model_lock(model_dir: Path):
    """One writer per model folder at a time, across processes (flock on the folder itself,
    so no lock file is left behind)."""
    fd = os.open(model_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, also when the process is killed


def _remove_debris(model_dir: Path) -> list[str]:
    """Staging/trash folders and sidecar temp files of killed publishes (call under the lock:
    then no live publisher owns them)."""
    removed = []
    for p in model_dir.iterdir():
        if p.is_dir() and p.name.startswith(_DEBRIS_DIRS):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.startswith(_DEBRIS_FILES) and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p.name)
    if removed:
        logger.warning("%s: removed what interrupted publishes left: %s", model_dir.name, removed)
    return removed


def _secure_tree(root: Path) -> None:
    """0755 folders and 0644 files whatever the umask: nothing world-writable is served."""
    os.chmod(root, 0o755)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def check_filename(what: str, name: str) -> str:
    """A file name from a config (artifact, default_model_filename): one plain path component,
    never a way out of the version folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
    ):
        raise RepositoryError(
            f"{what} {name!r} is not a plain file name",
            hint="Name the file inside the version folder, e.g. model.onnx (no '/', no '..').",
        )
    return name


def _remove_dir(path: Path) -> None:
    """Rename out of Triton's sight first (atomic), then delete."""
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_version(version) -> int:
    """A version number as int; RepositoryError unless it is a positive integer (or "3")."""
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(f"version {version!r} is not a positive integer")
    return version


def _model_name(name) -> str:
    try:
        return check_name("model_name", name)
    except ConfigError as e:
        raise RepositoryError(str(e)) from None


def find_sidecar(model_file) -> Path | None:
    """The model-contract sidecar of an artifact: ``<artifact>.json``, else the ONNX one beside it."""
    p = Path(model_file)
    for cand in (Path(f"{p}.json"), p.with_suffix(".onnx.json"), p.parent / "model.onnx.json"):
        if cand.is_file():
            try:
                if json.loads(cand.read_text()).get("inputs"):
                    return cand
            except (OSError, ValueError):
                continue
    return None


def _python_model_source() -> Path:
    return Path(__file__).resolve().parent / "python_model" / "model.py"


# -------------------------------------------------------------------------- version manager
class ModelVersionManager:
    """Versions of the models of one repository (guide 10.3)."""

    def __init__(self, model_repository):
        self.repo = Path(model_repository)

    def model_dir(self, model_name: str) -> Path:
        return self.repo / _model_name(model_name)

    def _config(self, model_name: str):
        path = self.model_dir(model_name) / "config.pbtxt"
        if not path.is_file():
            raise RepositoryError(
                f"{path} not found",
                hint="Write the model's config first: `ugt-serving config` or TritonConfigGenerator.generate().",
            )
        try:
            return parse_config(path.read_text())
        except Exception as e:  # text_format.ParseError and friends
            raise RepositoryError(f"{path} does not parse as a Triton ModelConfig: {e}") from e

    def list_versions(self, model_name: str) -> list[int]:
        """The versions Triton can see (numeric folders), ascending."""
        d = self.model_dir(model_name)
        if not d.is_dir():
            return []
        return sorted(
            int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
        )

    def retired_versions(self, model_name: str) -> list[int]:
        d = self.model_dir(model_name) / RETIRED
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())

    def served_versions(self, model_name: str) -> list[int]:
        """What the config's version_policy makes Triton serve, from the versions present."""
        versions = self.list_versions(model_name)
        policy = self._config(model_name).version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        if kind == "all":
            return versions
        if kind == "specific":
            return [v for v in versions if v in set(policy.specific.versions)]
        n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
        return versions[-n:]

    def default_version(self, model_name: str) -> int | None:
        """The version that answers requests naming none: the newest served one."""
        served = self.served_versions(model_name)
        return served[-1] if served else None

    def describe(self, model_name: str) -> list[dict]:
        """One row per version: version, status (served/available/retired), bytes, modified."""
        served = set(self.served_versions(model_name))
        rows = []
        d = self.model_dir(model_name)
        for v in self.list_versions(model_name):
            rows.append(self._row(d / str(v), v, "served" if v in served else "available"))
        for v in self.retired_versions(model_name):
            rows.append(self._row(d / RETIRED / str(v), v, "retired"))
        return sorted(rows, key=lambda r: r["version"])

    @staticmethod
    def _row(path: Path, version: int, status: str) -> dict:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return {
            "version": version,
            "status": status,
            "bytes": size,
            "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
        }

    def next_version(self, model_name: str) -> int:
        """One more than any version present or retired (numbers are never reused)."""
        return max(self.list_versions(model_name) + self.retired_versions(model_name) + [0]) + 1

    def _artifact_name(self, config, model_file: Path) -> str:
        if config.backend == "python":
            if "artifact" in config.parameters:
                return check_filename(
                    "parameter artifact", config.parameters["artifact"].string_value
                )
            runtime = (
                config.parameters["runtime"].string_value
                if "runtime" in config.parameters
                else "onnxruntime"
            )
            return artifact_filename("python", runtime, model_file)
        if config.default_model_filename:
            return check_filename("default_model_filename", config.default_model_filename)
        platform = config.platform or config.backend
        if platform not in DEFAULT_FILENAMES:
            raise RepositoryError(f"unknown platform/backend {platform!r} in config.pbtxt")
        return DEFAULT_FILENAMES[platform]

    def deploy_version(
        self,
        model_name: str,
        model_file,
        version: int | None = None,
        replace: bool = False,
        sidecar=None,
    ) -> int:
        """Publish ``model_file`` as a new version (next free number by default); returns it.

        The artifact goes under the platform's file name (python models also get model.py),
        with its sidecar as ugt_model.json; all written to a staging folder, fsynced, and
        renamed into place. An existing version is an error unless ``replace``.
        """
        model_dir = self.model_dir(model_name)
        model_file = Path(model_file)
        if not model_file.exists():
            raise InputFileNotFoundError(f"model file not found: {model_file}")
        config = self._config(model_name)
        version = None if version is None else check_version(version)
        with model_lock(model_dir):
            _remove_debris(model_dir)
            return self._publish(
                model_name, model_dir, model_file, config, version, replace, sidecar
            )

    def _publish(
        self, model_name, model_dir: Path, model_file: Path, config, version, replace, sidecar
    ) -> int:
        version = self.next_version(model_name) if version is None else version
        target = model_dir / str(version)
        if target.exists() and not replace:
            raise RepositoryError(
                f"{model_name} version {version} already exists",
                hint="Leave the version out to publish the next one, or remove the old one first.",
            )
        name = self._artifact_name(config, model_file)
        staging = model_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            self._stage(staging, model_file, name, config.backend == "python")
            sidecar = Path(sidecar) if sidecar else find_sidecar(model_file)
            if sidecar is not None:
                shutil.copyfile(sidecar, staging / SIDECAR_NAME)
            _secure_tree(staging)
            fsync_tree(staging)
            if target.exists():
                _remove_dir(target)
            os.rename(staging, target)
            fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if sidecar is not None and version >= max(self.list_versions(model_name)):
            write_text_atomic(model_dir / SIDECAR_NAME, Path(sidecar).read_text())
        logger.info("published %s version %d (%s)", model_name, version, name)
        return version

    @staticmethod
    def _stage(staging: Path, model_file: Path, name: str, python: bool) -> None:
        dst = staging / name
        if model_file.is_dir():
            shutil.copytree(model_file, dst)
        else:
            shutil.copyfile(model_file, dst)
            if dst.suffix == ".xml":  # OpenVINO IR: weights beside the graph
                weights = model_file.with_suffix(".bin")
                if not weights.is_file():
                    raise InputFileNotFoundError(
                        f"OpenVINO weights not found beside {model_file}: {weights}"
                    )
                shutil.copyfile(weights, dst.with_suffix(".bin"))
        if python:
            shutil.copyfile(_python_model_source(), staging / PYTHON_MODEL_FILE)

    def rollback(self, model_name: str, version: int) -> dict:
        """Make ``version`` the one served: newer versions move to ``.retired/``; a retired
        ``version`` comes back first. Returns {"served", "retired", "restored"}."""
        version = check_version(version)
        model_dir = self.model_dir(model_name)
        self._config(model_name)
        with model_lock(model_dir):
            return self._rollback(model_name, model_dir, version)

    def _rollback(self, model_name: str, model_dir: Path, version: int) -> dict:
        retired_dir = model_dir / RETIRED
        restored = False
        if version not in self.list_versions(model_name):
            src = retired_dir / str(version)
            if not src.is_dir():
                raise RepositoryError(
                    f"{model_name} has no version {version} (present: {self.list_versions(model_name)}, "
                    f"retired: {self.retired_versions(model_name)})"
                )
            os.rename(src, model_dir / str(version))
            restored = True
        newer = [v for v in self.list_versions(model_name) if v > version]
        make_dirs(retired_dir)
        for v in sorted(newer, reverse=True):
            dst = retired_dir / str(v)
            if dst.exists():  # an older retired copy of a number that was redeployed
                shutil.rmtree(dst)
            os.rename(model_dir / str(v), dst)
        fsync_dir(retired_dir)
        fsync_dir(model_dir)
        logger.info("%s: serving version %d, retired %s", model_name, version, newer)
        return {"served": self.default_version(model_name), "retired": newer, "restored": restored}

    def cleanup_old_versions(
        self, model_name: str, keep: int = 3, include_retired: bool = True
    ) -> list[int]:
        """Remove all but the ``keep`` newest versions (and retired ones); the version that
        answers requests naming none is never removed. Returns the removed versions."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError("keep", keep, "an integer >= 1")
        model_dir = self.model_dir(model_name)
        self._config(model_name)  # RepositoryError for a model without config.pbtxt
        with model_lock(model_dir):
            return self._cleanup(model_name, model_dir, keep, include_retired)

    def _cleanup(
        self, model_name: str, model_dir: Path, keep: int, include_retired: bool
    ) -> list[int]:
        versions = self.list_versions(model_name)
        protected = set(versions[-keep:]) | {self.default_version(model_name)}
        removed = []
        for v in versions:
            if v not in protected:
                _remove_dir(model_dir / str(v))
                removed.append(v)
        if include_retired:
            for v in self.retired_versions(model_name):
                _remove_dir(model_dir / RETIRED / str(v))
                removed.append(v)
        logger.info("%s: removed versions %s", model_name, removed)
        return sorted(removed)


# ------------------------------------------------------------------------------ validation
def _artifact_problems(config, version_dir: Path) -> tuple[list[str], int]:
    """Errors about one version folder's artifact, and its size in bytes."""
    errors: list[str] = []
    platform = "python" if config.backend == "python" else (config.platform or config.backend)
    if platform not in DEFAULT_FILENAMES:
        return [f"unknown platform/backend {platform!r}"], 0
    expected = config.default_model_filename or DEFAULT_FILENAMES[platform]
    files = [expected]
    if platform == "openvino":
        files.append(str(Path(expected).with_suffix(".bin")))
    if platform == "python":
        artifact = (
            config.parameters["artifact"].string_value if "artifact" in config.parameters else ""
        )
        if not artifact:
            errors.append("python model without an 'artifact' parameter")
        else:
            files.append(artifact)
    size = 0
    for f in files:
        try:
            check_filename("artifact file", f)
        except RepositoryError as e:
            errors.append(str(e))
            continue
        p = version_dir / f
        if not p.exists():
            present = sorted(x.name for x in version_dir.iterdir())
            errors.append(f"{p} missing (platform {platform} expects {f}; present: {present})")
            continue
        n = (
            sum(x.stat().st_size for x in p.rglob("*") if x.is_file())
            if p.is_dir()
            else p.stat().st_size
        )
        if n == 0:
            errors.append(f"{p} is empty")
        size += n
        errors += _format_problems(p)
    return errors, size


def _format_problems(p: Path) -> list[str]:
    """Cheap content checks: does the file look like what its name says?"""
    if p.is_dir() or p.stat().st_size == 0:
        return []
    with open(p, "rb") as f:
        head = f.read(512)
    if p.suffix == ".onnx" and head[:1] != b"\x08":
        return [f"{p} does not look like an ONNX model (no ir_version field first)"]
    if p.suffix == ".xml" and b"<net" not in head and b"<?xml" not in head:
        return [f"{p} does not look like OpenVINO IR XML"]
    if p.suffix == ".plan" and (head[:1] == b"\x08" or head.lstrip()[:1] in (b"<", b"{")):
        return [f"{p} looks like an ONNX/XML/JSON file, not a serialized TensorRT engine"]
    return []


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


def _validate_model(model_dir: Path) -> tuple[list[str], dict]:
    name = model_dir.name
    errors: list[str] = []
    info: dict = {"model_name": name, "versions": [], "warnings": []}
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        return [f"{name}: config.pbtxt missing"], info
    try:
        config = parse_config(cfg_path.read_text())
    except Exception as e:  # text_format.ParseError (strict: unknown fields fail)
        return [
            f"{name}: config.pbtxt does not parse against Triton's ModelConfig schema: {e}"
        ], info
    if config.name and config.name != name:
        errors.append(f"{name}: config name {config.name!r} differs from the folder name")
    platform = "python" if config.backend == "python" else (config.platform or config.backend)
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
            errors.append(
                f"{name}: python parameter runtime={runtime!r} is not one of {', '.join(PYTHON_RUNTIMES)}"
            )
    sizes = {}
    for p in sorted(model_dir.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not p.name.isdigit() or int(p.name) < 1:
            errors.append(f"{name}: folder {p.name!r} is not a version (a positive integer)")
            continue
        problems, sizes[int(p.name)] = _artifact_problems(config, p)
        errors += [f"{name} v{p.name}: {m}" for m in problems]
        sidecar_file = (
            p / SIDECAR_NAME if (p / SIDECAR_NAME).is_file() else model_dir / SIDECAR_NAME
        )
        if sidecar_file.is_file():
            try:
                sidecar = json.loads(sidecar_file.read_text())
            except (OSError, ValueError) as e:
                errors.append(f"{name} v{p.name}: unreadable {sidecar_file.name}: {e}")
                continue
            errors += [f"{name} v{p.name}: {m}" for m in _io_problems(config, sidecar)]
        else:
            info["warnings"].append(
                f"{name} v{p.name}: no {SIDECAR_NAME}; input/output names not checked"
            )
    info["versions"] = sorted(sizes)
    info["artifact_bytes"] = sizes
    if not sizes:
        errors.append(f"{name}: no version folders (e.g. {name}/1/)")
    else:
        manager = ModelVersionManager(model_dir.parent)
        info["served_versions"] = manager.served_versions(name)
        info["retired_versions"] = manager.retired_versions(name)
    return errors, info


def validate_deployment(model_repository, model_name: str | None = None) -> dict:
    """Check a repository (or one model of it) the way Triton will load it (guide 5.5).

    Returns {"valid": bool, "errors": [str], "info": {...}}; ``info`` is the model's (with
    "versions") when ``model_name`` is given, else {"models": {name: info}, "versions": {...}}.
    """
    repo = Path(model_repository)
    if not repo.is_dir():
        return {"valid": False, "errors": [f"model repository {repo} does not exist"], "info": {}}
    if model_name is not None:
        try:
            _model_name(model_name)
        except RepositoryError as e:
            return {"valid": False, "errors": [str(e)], "info": {}}
        if not (repo / model_name).is_dir():
            present = sorted(
                p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            return {
                "valid": False,
                "errors": [f"model {model_name!r} not in {repo} (present: {present})"],
                "info": {},
            }
        errors, info = _validate_model(repo / model_name)
        return {"valid": not errors, "errors": errors, "info": info}
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        return {
            "valid": False,
            "errors": [f"{repo} holds no model folders"],
            "info": {"models": {}},
        }
    errors, infos = [], {}
    for m in models:
        e, infos[m.name] = _validate_model(m)
        errors += e
    return {
        "valid": not errors,
        "errors": errors,
        "info": {"models": infos, "versions": {k: v["versions"] for k, v in infos.items()}},
    }


__all__ = [
    "ModelVersionManager",
    "check_filename",
    "check_version",
    "find_sidecar",
    "make_dirs",
    "validate_deployment",
    "write_text_atomic",
]
