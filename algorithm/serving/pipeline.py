"""Export -> optimize -> publish: the one road from a model to a served version.

``ServingExporter.deploy_full_pipeline``, ``ugt-serving deploy`` and the demo all go through
``export``, ``optimize`` and ``publish`` here, so a version is published the same way whoever
asks: config written, artifact staged and renamed into the next (or a given) version folder,
the repository validated before the call returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from algorithm.errors import ConfigError, DependencyError, RepositoryError
from algorithm.fsutil import make_dirs
from algorithm.serving.backends import all_backends, get_backend
from algorithm.serving.backends import optimize as optimize_artifact
from algorithm.serving.config import ExportConfig, TritonConfig, check_output_path
from algorithm.serving.export_onnx import ONNXExporter
from algorithm.serving.triton.repository import ModelVersionManager
from algorithm.serving.triton.validation import checks_host, host_problems, validate_deployment
from algorithm.serving.triton_config import TritonConfigGenerator

logger = logging.getLogger(__name__)


def backend_for(triton_config: TritonConfig) -> str | None:
    """The backend that builds what ``triton_config`` serves (from the backend registry), or None
    where the torch runner serves the checkpoint itself."""
    tc = triton_config
    if tc.platform == "python":
        if tc.python_runtime == "torch":
            return None
        matches = [b.name for b in all_backends() if b.runtime == tc.python_runtime]
    else:
        matches = [b.name for b in all_backends() if b.triton_platform == tc.platform]
    if not matches:
        raise ConfigError(
            "platform", tc.platform, "a platform (or python runtime) a registered backend builds"
        )
    return matches[0]


def export(model, export_config: ExportConfig, onnx_path) -> Path:
    """torch -> ONNX with the parity check; returns the path."""
    return Path(ONNXExporter(export_config).export(model, onnx_path))


def optimize(model, onnx_path, backend: str, export_config: ExportConfig, output_path) -> Path:
    """``backend``'s artifact behind the accuracy gate (``model`` is the fp32 reference)."""
    return Path(
        optimize_artifact(onnx_path, output_path, backend, export_config, reference_model=model)
    )


def publish(
    model_repository,
    export_config: ExportConfig,
    triton_config: TritonConfig,
    artifact,
    version: int | None = None,
    *,
    host: bool | None = None,
    build_info: dict | None = None,
) -> dict[str, str]:
    """Write the model's config.pbtxt, publish ``artifact`` as the next version (or ``version``,
    replacing it), and validate the repository (``host``: see ``validate_deployment``). Raises
    RepositoryError if it does not validate. ``build_info`` is kept with the version."""
    repo = Path(model_repository)
    name = export_config.model_name
    config_path = TritonConfigGenerator(export_config, triton_config).generate(repo)
    published = ModelVersionManager(repo).deploy_version(
        name, artifact, version=version, replace=version is not None, build_info=build_info
    )
    check = validate_deployment(repo, name, host=host)
    if not check["valid"]:
        raise RepositoryError(
            "the deployed model does not validate: " + "; ".join(check["errors"]),
            hint=check["hints"][0] if check["hints"] else None,
        )
    logger.info("published %s v%s in %s", name, published, repo)
    return {
        "config_path": str(config_path),
        "model_repository": str(repo),
        "version": str(published),
    }


def preflight(model_repository, triton_config: TritonConfig, host: bool | None = None) -> None:
    """What can be known before minutes of export and optimization: the repository path is a
    writable folder, the platform's optimizer is installed, the instance kind exists here."""
    tc = triton_config
    check_output_path("model_repository", model_repository)
    name = backend_for(tc)
    if name is not None:
        backend = get_backend(name)
        if not backend.is_available():
            raise DependencyError(
                backend.module,
                backend.install,
                purpose=f"the {backend.name} artifact of {tc.platform}",
            )
    if checks_host(tc.platform, host):
        problems = host_problems([(tc.instance_kind, list(tc.gpus))])
        if problems:
            message, hint = problems[0]
            raise ConfigError(
                "instance_kind", tc.instance_kind, f"a device this host has; {message}", hint=hint
            )


def fingerprint(
    model, export_config: ExportConfig, triton_config: TritonConfig, optimize_for_platform: bool
) -> str:
    """What a deployed version is built from: the weights, the model and serving configs, the
    backend. Equal fingerprints build the same version, so a re-run publishes nothing new."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    parts = {
        "model": model.config.to_dict(),
        "export": export_config.to_dict(),
        "triton": triton_config.to_dict(),
        "backend": backend_for(triton_config),
        "optimize": optimize_for_platform,
    }
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def deploy(
    model,
    model_repository,
    export_config: ExportConfig,
    triton_config: TritonConfig,
    *,
    onnx_path=None,
    engine_path=None,
    version: int | None = None,
    optimize_for_platform: bool = True,
    host: bool | None = None,
) -> dict[str, str]:
    """Export -> optimize for the platform -> publish -> validate (``deploy_full_pipeline``).

    Checks first what can fail without any work (``preflight``). When the served version was
    built from the same weights and configs (``fingerprint``) and no ``version`` is asked for,
    nothing is rebuilt or published ("status": "unchanged"). Work files go to a temporary
    folder beside the repository that is removed afterwards, unless ``onnx_path`` /
    ``engine_path`` name where to keep them; "engine_path" is then the published artifact.
    ``optimize_for_platform=False`` serves the exported ONNX as is where an ONNX Runtime
    platform allows it; ``python_runtime="torch"`` serves the checkpoint itself.
    """
    cfg, tc = export_config, triton_config
    repo = Path(model_repository)
    preflight(repo, tc, host)
    backend_name = backend_for(tc)
    if backend_name is not None and not optimize_for_platform and backend_name != "onnxruntime":
        raise ConfigError("optimize", False, f"True for {tc.platform} ({backend_name} artifact)")
    build = {"fingerprint": fingerprint(model, cfg, tc, optimize_for_platform)}
    manager = ModelVersionManager(repo)
    if version is None and (repo / cfg.model_name).is_dir():
        served = (
            manager.default_version(cfg.model_name)
            if (repo / cfg.model_name / "config.pbtxt").is_file()
            else None
        )
        if served is not None and manager.build_info(cfg.model_name, served) == build:
            logger.info(
                "%s v%d was built from the same model and configs: unchanged",
                cfg.model_name,
                served,
            )
            return {
                "onnx_path": str(onnx_path or ""),
                "engine_path": str(manager.artifact_path(cfg.model_name, served)),
                "config_path": str(repo / cfg.model_name / "config.pbtxt"),
                "model_repository": str(repo),
                "version": str(served),
                "status": "unchanged",
            }
    make_dirs(repo.parent)
    with tempfile.TemporaryDirectory(prefix=f".{repo.name}-build-", dir=repo.parent) as tmp:
        work = Path(tmp)
        onnx_out = None
        if backend_name is None:
            artifact = Path(model.save(Path(engine_path or work / f"{cfg.model_name}.safetensors")))
        else:
            onnx_out = export(model, cfg, onnx_path or work / f"{cfg.model_name}.onnx")
            if not optimize_for_platform:
                artifact = onnx_out
            else:
                backend = get_backend(backend_name)
                # Its own folder: the onnxruntime artifact has the export's suffix.
                out = Path(engine_path or work / backend.name / backend.artifact_name)
                artifact = optimize(model, onnx_out, backend.name, cfg, out)
        published = publish(repo, cfg, tc, artifact, version, host=host, build_info=build)
    v = int(published["version"])
    return {
        "onnx_path": str(onnx_out) if onnx_path else "",
        "engine_path": str(engine_path)
        if engine_path
        else str(manager.artifact_path(cfg.model_name, v)),
        **published,
        "status": "published",
    }
