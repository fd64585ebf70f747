"""Export -> optimize -> publish: the one road from a model to a served version.

``ServingExporter.deploy_full_pipeline``, ``ugt-serving deploy`` and the demo all go through
``export``, ``optimize`` and ``publish`` here, so a version is published the same way whoever
asks: config written, artifact staged and renamed into the next (or a given) version folder,
the repository validated before the call returns.
"""

from __future__ import annotations

import logging
from pathlib import Path

from algorithm.errors import ConfigError, RepositoryError
from algorithm.serving.backends import all_backends, get_backend
from algorithm.serving.backends import optimize as optimize_artifact
from algorithm.serving.config import ExportConfig, TritonConfig
from algorithm.serving.export_onnx import ONNXExporter
from algorithm.serving.triton.repository import ModelVersionManager, validate_deployment
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
) -> dict[str, str]:
    """Write the model's config.pbtxt, publish ``artifact`` as the next version (or ``version``,
    replacing it), and validate the repository. Raises RepositoryError if it does not validate."""
    repo = Path(model_repository)
    name = export_config.model_name
    config_path = TritonConfigGenerator(export_config, triton_config).generate(repo)
    published = ModelVersionManager(repo).deploy_version(
        name, artifact, version=version, replace=version is not None
    )
    check = validate_deployment(repo, name)
    if not check["valid"]:
        raise RepositoryError("the deployed model does not validate: " + "; ".join(check["errors"]))
    logger.info("published %s v%s in %s", name, published, repo)
    return {
        "config_path": str(config_path),
        "model_repository": str(repo),
        "version": str(published),
    }


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
) -> dict[str, str]:
    """Export -> optimize for the platform -> publish -> validate (``deploy_full_pipeline``).

    Work files go to ``.<repository>-build/`` beside the repository unless paths are given.
    ``optimize_for_platform=False`` serves the exported ONNX as is where an ONNX Runtime platform
    allows it; ``python_runtime="torch"`` serves the checkpoint itself.
    """
    cfg, tc = export_config, triton_config
    repo = Path(model_repository)
    work = repo.parent / f".{repo.name}-build"
    onnx_out = None
    backend_name = backend_for(tc)
    if backend_name is None:
        artifact = Path(model.save(Path(engine_path or work / f"{cfg.model_name}.safetensors")))
    else:
        onnx_out = export(model, cfg, onnx_path or work / f"{cfg.model_name}.onnx")
        if not optimize_for_platform:
            if backend_name != "onnxruntime":
                raise ConfigError(
                    "optimize", False, f"True for {tc.platform} ({backend_name} artifact)"
                )
            artifact = onnx_out
        else:
            backend = get_backend(backend_name)
            # Its own folder: the onnxruntime artifact has the export's suffix.
            out = Path(engine_path or work / backend.name / backend.artifact_name)
            artifact = optimize(model, onnx_out, backend.name, cfg, out)
    published = publish(repo, cfg, tc, artifact, version)
    return {
        "onnx_path": str(onnx_out) if onnx_out else "",
        "engine_path": str(artifact),
        **published,
    }
