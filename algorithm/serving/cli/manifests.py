"""`ugt-serving manifests`: the Dockerfile and Kubernetes files for a deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from algorithm.serving.cli.app import (
    app,
    emit,
    handle_errors,
)


@app.command()
@handle_errors
def manifests(
    output: Path = typer.Option(
        Path("deploy"), "--output", "-o", help="Folder for docker/, k8s/, prometheus-adapter/."
    ),
    config: Path | None = typer.Option(
        None, help="JSON with optional 'export', 'triton', 'manifest' objects; flags override it."
    ),
    model_name: str | None = typer.Option(None, help="Triton model name (default ugt_recommend)."),
    gpus: int | None = typer.Option(
        None, min=0, help="GPUs per pod; Triton instances on devices 0..N-1 (0: KIND_CPU)."
    ),
    platform: str | None = typer.Option(
        None, help="tensorrt_plan, onnxruntime_onnx, openvino or python."
    ),
    image: str | None = typer.Option(
        None, help="Image the Deployment runs (default: the Triton image + the PVC)."
    ),
    triton_image: str | None = typer.Option(
        None, help="Official Triton image the Dockerfile builds FROM."
    ),
    replicas: int | None = typer.Option(None, min=1, help="Replicas (the autoscaler's minimum)."),
    max_replicas: int | None = typer.Option(None, min=1, help="The autoscaler's maximum."),
    namespace: str | None = typer.Option(None, help="Kubernetes namespace."),
    model_pvc: str | None = typer.Option(
        None, help="PVC holding the model repository; '' = baked into --image."
    ),
    service_type: str | None = typer.Option(
        None,
        help="Type of the inference Service: ClusterIP (default), NodePort or LoadBalancer "
        "(guide 8.5: an external load balancer in front of the gRPC/HTTP ports).",
    ),
) -> None:
    """Write the Dockerfile and Kubernetes manifests (Deployment, Service, HPA, PDB, NetworkPolicy)."""
    from algorithm.errors import ConfigError, InputFileNotFoundError
    from algorithm.serving.config import ExportConfig, TritonConfig, check_output_path
    from algorithm.serving.deploy.manifests import ManifestConfig, write_manifests

    check_output_path("--output", output)
    data: dict[str, Any] = {}
    if config is not None:
        try:
            data = json.loads(config.read_text())
        except FileNotFoundError as e:
            raise InputFileNotFoundError(f"config file not found: {config}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError("config", str(config), f"a readable JSON object ({e})") from e
        if not isinstance(data, dict) or set(data) - {"export", "triton", "manifest"}:
            raise ConfigError(
                "config", str(config), "a JSON object with keys among export, triton, manifest"
            )
    sections = {k: dict(data.get(k) or {}) for k in ("export", "triton", "manifest")}
    if model_name is not None:
        sections["export"]["model_name"] = model_name
    if platform is not None:
        sections["triton"]["platform"] = platform
    if gpus is not None:
        sections["triton"]["gpus"] = tuple(range(gpus))
        sections["triton"]["instance_kind"] = "KIND_GPU" if gpus else "KIND_CPU"
        sections["manifest"]["gpus_per_pod"] = gpus
    flags = {"image": image, "triton_image": triton_image, "replicas": replicas,
             "max_replicas": max_replicas, "namespace": namespace, "model_pvc": model_pvc,
             "service_type": service_type}  # fmt: skip
    sections["manifest"].update({k: v for k, v in flags.items() if v is not None})
    try:
        triton = TritonConfig.from_dict(sections["triton"])
    except ConfigError as e:
        if e.field != "instance_kind":
            raise
        hint = "CPU-only pods need a CPU platform: add --platform onnxruntime_onnx (or openvino, python)."
        raise ConfigError(e.field, e.value, e.allowed, hint=hint) from e
    paths = write_manifests(
        output,
        ExportConfig.from_dict(sections["export"]),
        triton,
        ManifestConfig.from_dict(sections["manifest"]),
    )
    emit({"output": str(output), "files": [str(p) for p in paths]}, "Deployment files")
