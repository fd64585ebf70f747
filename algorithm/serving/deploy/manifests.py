"""Production deployment files generated from the same configs as the model repository.

``write_manifests(output_dir, export_config, triton_config, manifest_config)`` writes

    docker/Dockerfile                the official Triton image + the generated model repository
    docker/Dockerfile.dockerignore   keeps the build context to what the image needs
    k8s/namespace.yaml               enforces the "restricted" Pod Security Standard
    k8s/deployment.yaml              probes on /v2/health/*, nvidia.com/gpu, /dev/shm, non-root
    k8s/service.yaml                 http + grpc for clients
    k8s/service-metrics.yaml         the metrics port, kept off the client Service
    k8s/hpa.yaml                     autoscaling/v2 on Triton's average queue time per request
    k8s/pdb.yaml                     PodDisruptionBudget
    k8s/networkpolicy.yaml           clients reach http/grpc through the ingress; metrics only from
                                     monitoring
    k8s/ingress.yaml                 HTTP: the request-size limit, TLS at the ingress
    k8s/ingress-grpc.yaml            gRPC (with ingress_tls_secret): the same limit, public RPCs only
    k8s/pvc.yaml                     the model repository volume (when not baked into the image)
    k8s/kustomization.yaml           `kubectl apply -k deploy/k8s`
    prometheus-adapter/values.yaml   the custom-metrics rule the HPA needs (Helm values)

(the configs resolve to a Plan in ``plan.py``; the Kubernetes objects are built in ``k8s.py``).

Model control stays "none" (no load/unload at run time), and Triton's administrative APIs
(model-repository, model-config, shared-memory, statistics, trace, logging) answer only requests
carrying the admin header whose value comes from a Secret. What that leaves visible: the kubelet
expands ``$(TRITON_ADMIN_KEY)`` into tritonserver's arguments, so the key is in the container's
process list (seen by the container's own processes and by root on the node, which can read the
Secret anyway; the pod API shows only the reference), and in the environment of the python
stubs. The embedded server (``triton/secret_argv.py``) avoids both; the official image runs
``tritonserver`` directly, without this project's launcher. The restricted-API flag syntax was
checked against the tritonserver 2.51 binary that nvidia-pytriton ships (the 24.10 container's
version), which is why 24.10 is the default image.

YAML is produced with PyYAML from dicts, the Dockerfile from JSON-form instructions; every name,
path and image that ends up in a file is validated first, so no config value can inject lines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from algorithm.errors import DependencyError
from algorithm.fsutil import write_text_atomic
from algorithm.serving.config import ExportConfig, TritonConfig
from algorithm.serving.deploy import k8s as kube
from algorithm.serving.deploy.plan import (  # noqa: F401  (ManifestConfig is public here)
    ADMIN_KEY_ENV,
    ADMIN_SECRET_KEY,
    DEFAULT_TRITON_IMAGE,
    GENERATED_NOTE,
    KNOWN_FILES,
    TLS_MOUNT_PATH,
    ManifestConfig,
    Plan,
    healthcheck_command,
    resolve_plan,
    triton_args,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- Docker
def dockerfile(plan: Plan) -> str:
    m = plan.m
    # The key is expanded at run time, never baked into the image: the shell fails closed when it
    # is unset, and `exec` makes tritonserver PID 1 so it receives the stop signal itself.
    args = triton_args(plan, f"${{{ADMIN_KEY_ENV}:?set {ADMIN_KEY_ENV}}}")
    static, keyed = args[:-2], args[-2:]
    script = 'exec tritonserver "$@" ' + " ".join(f'"{a}"' for a in keyed)
    # $0 is "tritonserver"; the static flags and any `docker run` arguments become "$@"
    entry = ["/bin/sh", "-c", script, "tritonserver", *static]
    ports = f"{m.http_port} {m.grpc_port} {m.metrics_port}"
    lines = [
        "# syntax=docker/dockerfile:1",
        f"# {GENERATED_NOTE}",
        f"# Build from the directory that holds {m.repository_dir}/ (the project root):",
        "#   docker build -f deploy/docker/Dockerfile -t <registry>/ugt-triton:<version> .",
        "# Run (the admin key unlocks Triton's administrative APIs; clients never need it):",
        f"#   docker run --gpus all --shm-size={m.shm_size.rstrip('i').lower()} --read-only --tmpfs /tmp"
        f" -e {ADMIN_KEY_ENV}=$(openssl rand -hex 32) -p {m.http_port}:{m.http_port}"
        f" -p {m.grpc_port}:{m.grpc_port} -p {m.metrics_port}:{m.metrics_port} <image>",
        "# A tensorrt_plan engine only loads on the TensorRT version of this base image: build it there.",
        *(
            [
                f"# gRPC TLS: mount tls.crt and tls.key{' and ca.crt' if m.grpc_tls_mutual else ''} "
                f"at {TLS_MOUNT_PATH} (-v <dir>:{TLS_MOUNT_PATH}:ro)."
            ]
            if m.grpc_tls_secret
            else []
        ),
        f"ARG TRITON_IMAGE={m.triton_image}",
        "FROM ${TRITON_IMAGE}",
        "LABEL "
        + " ".join(
            f"{k}={json.dumps(v)}"
            for k, v in (
                ("org.opencontainers.image.title", f"ugt-serving {plan.model}"),
                (
                    "org.opencontainers.image.description",
                    "Triton Inference Server with the UGT model repository",
                ),
                ("ugt-serving.model", plan.model),
                ("ugt-serving.platform", plan.platform),
            )
        ),
        "ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1",
    ]
    if plan.platform == "python":
        lines += [
            "# The python-backend model.py runs the artifact through this project's Runner.",
            "COPY pyproject.toml README.md /opt/ugt-serving/",
            "COPY algorithm /opt/ugt-serving/algorithm",
            "RUN python3 -m pip install --no-cache-dir /opt/ugt-serving",
        ]
    lines += [
        f"COPY {m.repository_dir} {m.model_mount_path}",
        # root-owned and not writable by the server user: a compromised server cannot swap models
        f"RUN chmod -R a+rX,go-w {m.model_mount_path}",
        f"USER {m.run_as_user}:{m.run_as_group}",
        f"EXPOSE {ports}",
        f"HEALTHCHECK --interval=10s --timeout=5s --start-period={m.startup_timeout_s}s --retries=3 "
        f"CMD {json.dumps(healthcheck_command(m.http_port))}",
        f"ENTRYPOINT {json.dumps(entry)}",
    ]
    return "\n".join(lines) + "\n"


def dockerignore(plan: Plan) -> str:
    keep = [plan.m.repository_dir]
    if plan.platform == "python":
        keep += ["pyproject.toml", "README.md", "algorithm"]
    return (
        "\n".join([f"# {GENERATED_NOTE}", "*", *(f"!{p}" for p in keep), "**/__pycache__"]) + "\n"
    )


# ------------------------------------------------------------------------------------- rendering
def _yaml(doc: dict, comment: str = GENERATED_NOTE) -> str:
    try:
        import yaml
    except ImportError as e:
        raise DependencyError(
            "pyyaml", "pip install 'pyyaml>=6'", purpose="writing Kubernetes manifests"
        ) from e

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # shared dicts (selectors) are written out, not anchored
            return True

    body = yaml.dump(doc, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=4096)
    return f"# {comment}\n{body}"


def render_manifests(
    export_config: ExportConfig | None = None,
    triton_config: TritonConfig | None = None,
    manifest_config: ManifestConfig | None = None,
) -> dict[str, str]:
    """{relative path: file text} for the configs (defaults when None); nothing is written."""
    plan = resolve_plan(
        export_config or ExportConfig(),
        triton_config or TritonConfig(),
        manifest_config or ManifestConfig(),
    )

    m = plan.m
    k8s = {
        "namespace.yaml": kube.namespace(plan),
        "deployment.yaml": kube.deployment(plan),
        "service.yaml": kube.service(plan, metrics=False),
        "service-metrics.yaml": kube.service(plan, metrics=True),
    }
    if m.autoscale:
        k8s["hpa.yaml"] = kube.hpa(plan)
    k8s["pdb.yaml"] = kube.pdb(plan)
    k8s["networkpolicy.yaml"] = kube.network_policy(plan)
    if m.ingress:
        k8s["ingress.yaml"] = kube.ingress(plan, grpc=False)
        if m.ingress_tls_secret is not None:
            k8s["ingress-grpc.yaml"] = kube.ingress(plan, grpc=True)
    if m.model_pvc:
        k8s["pvc.yaml"] = kube.pvc(plan)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": m.namespace,
        "resources": list(k8s),
    }
    files = {
        "docker/Dockerfile": dockerfile(plan),
        "docker/Dockerfile.dockerignore": dockerignore(plan),
        **{f"k8s/{n}": _yaml(doc) for n, doc in k8s.items()},
        "k8s/kustomization.yaml": _yaml(
            kustomization,
            f"{GENERATED_NOTE}\n# Needs the Secret "
            f"{m.admin_secret} (key {ADMIN_SECRET_KEY}) in {m.namespace}"
            + (f", the TLS Secret {m.grpc_tls_secret}" if m.grpc_tls_secret else "")
            + "; see the README.",
        ),
    }
    if m.autoscale:
        files["prometheus-adapter/values.yaml"] = _yaml(
            kube.adapter_values(plan),
            f"{GENERATED_NOTE}\n# helm install prometheus-adapter prometheus-community/prometheus-adapter "
            f"-n {m.metrics_namespace} -f deploy/prometheus-adapter/values.yaml",
        )
    return files


def write_manifests(
    output_dir,
    export_config: ExportConfig | None = None,
    triton_config: TritonConfig | None = None,
    manifest_config: ManifestConfig | None = None,
) -> list[Path]:
    """Write the deployment files under ``output_dir`` (mode 0644, each atomically) and remove
    generated files this config no longer produces. Returns the written paths."""
    # everything is validated and rendered before the first write
    files = render_manifests(export_config, triton_config, manifest_config)
    root = Path(output_dir)
    written = [write_text_atomic(root / rel, text) for rel, text in files.items()]
    for rel in KNOWN_FILES:
        stale = root / rel
        if rel not in files and (stale.is_file() or stale.is_symlink()):
            stale.unlink()
            logger.info("removed %s: the current config does not generate it", stale)
    logger.info("wrote %d deployment files under %s", len(written), root)
    return written


__all__ = [
    "DEFAULT_TRITON_IMAGE",
    "ManifestConfig",
    "render_manifests",
    "triton_args",
    "write_manifests",
]
