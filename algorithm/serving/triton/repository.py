"""Model repository: atomic version publish, rollback, cleanup, and deployment validation.

Layout (Triton's)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/ugt_model.json          the model contract of the newest deployed version
    <repo>/<name>/<version>/<artifact>    + ugt_model.json (+ model.py for python models)
                                          (+ ugt_build.json: what the version was built from)
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
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from algorithm.errors import ConfigError, InputFileNotFoundError, RepositoryError
from algorithm.fsutil import folder_lock as _model_lock  # one writer per model folder
from algorithm.fsutil import fsync_dir, fsync_tree, make_dirs, write_text_atomic
from algorithm.serving.config import check_name
from algorithm.serving.contract import SIDECAR_NAME
from algorithm.serving.triton.schema import (
    DEFAULT_FILENAMES,
    PYTHON_MODEL_FILE,
    artifact_filename,
    parse_config,
)
from algorithm.serving.verify.artifact import artifact_kind, artifact_problems

logger = logging.getLogger(__name__)

RETIRED = ".retired"
BUILD_INFO_NAME = "ugt_build.json"  # a version's build fingerprint (pipeline.deploy skips rebuilds)
# What a publish killed midway leaves behind (hidden from Triton; removed by the next deploy).
_DEBRIS_DIRS = (".staging-", ".trash-")
_DEBRIS_FILES = f".{SIDECAR_NAME}."


# ------------------------------------------------------------------------------- file helpers


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
            raise RepositoryError(
                f"{path} does not parse as a Triton ModelConfig: {e}",
                hint="Regenerate it: `ugt-serving config -r REPOSITORY` (or `ugt-serving deploy`).",
            ) from e

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

    def build_info(self, model_name: str, version: int) -> dict | None:
        """What ``version`` was built from (pipeline.deploy's fingerprint), if recorded."""
        p = self.model_dir(model_name) / str(check_version(version)) / BUILD_INFO_NAME
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None

    def artifact_path(self, model_name: str, version: int) -> Path:
        """The file a version serves (for python models the runner's artifact, not model.py)."""
        config = self._config(model_name)
        name = self._artifact_name(config, Path("model.onnx"))
        return self.model_dir(model_name) / str(check_version(version)) / name

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
            raise RepositoryError(
                f"unknown platform/backend {platform!r} in config.pbtxt",
                hint="Regenerate it: `ugt-serving config -r REPOSITORY --platform ...`.",
            )
        return DEFAULT_FILENAMES[platform]

    def deploy_version(
        self,
        model_name: str,
        model_file,
        version: int | None = None,
        replace: bool = False,
        sidecar=None,
        build_info: dict | None = None,
    ) -> int:
        """Publish ``model_file`` as a new version (next free number by default); returns it.

        The artifact goes under the platform's file name (python models also get model.py),
        with its sidecar as ugt_model.json; all written to a staging folder, fsynced, and
        renamed into place. An existing version is an error unless ``replace``. The artifact is
        checked first (``check_artifact``): what the server would fail to load is refused.
        ``build_info`` (JSON) is kept in the version folder as ugt_build.json.
        """
        model_dir = self.model_dir(model_name)
        model_file = Path(model_file)
        if not model_file.exists():
            raise InputFileNotFoundError(f"model file not found: {model_file}")
        config = self._config(model_name)
        version = None if version is None else check_version(version)
        self.check_artifact(config, model_file, sidecar)
        with _model_lock(model_dir):
            _remove_debris(model_dir)
            return self._publish(
                model_name, model_dir, model_file, config, version, replace, sidecar, build_info
            )

    def check_artifact(self, config, model_file, sidecar=None) -> None:
        """Refuse what the server would fail to load: the file must be the platform's artifact
        type and pass what loading it runs (``verify/artifact.py``), before anything is staged."""
        model_file = Path(model_file)
        name = self._artifact_name(config, model_file)
        if artifact_kind(name) != artifact_kind(model_file):
            raise RepositoryError(
                f"{model_file} is not a {Path(name).suffix} file, which this model serves as {name}",
                hint=f"Publish the model's {Path(name).suffix} artifact (what `ugt-serving "
                "optimize`/`export` writes), or regenerate the config for another platform.",
            )
        weights = model_file.with_suffix(".bin")
        if model_file.suffix == ".xml" and not weights.is_file():
            raise InputFileNotFoundError(
                f"OpenVINO weights not found beside {model_file}: {weights}",
                hint="Publish the .xml with its .bin beside it (what `ugt-serving optimize "
                "--backend openvino` writes).",
            )
        meta = {}
        sidecar = Path(sidecar) if sidecar else find_sidecar(model_file)
        if sidecar is not None:
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(sidecar.read_text())
        problems = artifact_problems(model_file, meta)
        if problems:
            (message, hint), more = problems[0], len(problems) - 1
            extra = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
            raise RepositoryError(f"refusing to publish {message}{extra}", hint=hint)

    def _publish(
        self,
        model_name,
        model_dir: Path,
        model_file: Path,
        config,
        version,
        replace,
        sidecar,
        build_info=None,
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
            if build_info is not None:
                (staging / BUILD_INFO_NAME).write_text(json.dumps(build_info, sort_keys=True))
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
            if dst.suffix == ".xml":  # OpenVINO IR: weights beside the graph (checked before)
                shutil.copyfile(model_file.with_suffix(".bin"), dst.with_suffix(".bin"))
        if python:
            shutil.copyfile(_python_model_source(), staging / PYTHON_MODEL_FILE)

    def rollback(self, model_name: str, version: int) -> dict:
        """Make ``version`` the one served: newer versions move to ``.retired/``; a retired
        ``version`` comes back first. Returns {"served", "retired", "restored"}."""
        version = check_version(version)
        model_dir = self.model_dir(model_name)
        self._config(model_name)
        with _model_lock(model_dir):
            return self._rollback(model_name, model_dir, version)

    def _rollback(self, model_name: str, model_dir: Path, version: int) -> dict:
        retired_dir = model_dir / RETIRED
        restored = False
        if version not in self.list_versions(model_name):
            src = retired_dir / str(version)
            if not src.is_dir():
                present, retired = self.list_versions(model_name), self.retired_versions(model_name)
                raise RepositoryError(
                    f"{model_name} has no version {version} (present: {present}, retired: {retired})",
                    hint=f"Roll back to one of {sorted(present + retired)}; "
                    "`ugt-serving versions list` shows them.",
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
        with _model_lock(model_dir):
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


__all__ = [
    "ModelVersionManager",
    "check_filename",
    "check_version",
    "find_sidecar",
    "make_dirs",
    "write_text_atomic",
]
