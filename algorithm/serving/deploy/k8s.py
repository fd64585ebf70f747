"""Kubernetes objects for the Triton deployment, as plain dicts (``manifests`` writes them as YAML).

Every function takes the resolved ``Plan`` (validated configs) and returns one API object:
a Deployment whose pod passes the "restricted" Pod Security Standard, the client and metrics
Services, an autoscaling/v2 HPA on Triton's average queue time (served by the Prometheus
Adapter rule in ``adapter_values``), a PodDisruptionBudget, a NetworkPolicy, the model repository
PVC, the Namespace, and the ingresses that cap the request size (HTTP, and gRPC behind TLS).
"""

from __future__ import annotations

import math

from algorithm.serving.deploy.plan import (
    ADMIN_KEY_ENV,
    ADMIN_SECRET_KEY,
    TLS_MOUNT_PATH,
    Plan,
    triton_args,
)

# What the gRPC ingress routes: inference, health and metadata. The admin RPCs (repository,
# config, statistics, trace, logging, shared memory) are not reachable from outside at all.
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_PUBLIC_RPCS = ("ModelInfer", "ServerLive", "ServerReady", "ModelReady")
GRPC_PUBLIC_RPCS += ("ServerMetadata", "ModelMetadata")
# HTTP: the same, by path prefix (/v2/models/<name>/config and /stats still need the key).
HTTP_PUBLIC_PATHS = (("/v2", "Exact"), ("/v2/health", "Prefix"), ("/v2/models", "Prefix"))


def _probe(path: str, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def deployment(plan: Plan) -> dict:
    m = plan.m
    uses_pvc = m.model_pvc != ""
    resources = {
        "requests": {"cpu": m.cpu_request, "memory": plan.memory_request},
        "limits": {"memory": plan.memory_limit, **({"cpu": m.cpu_limit} if m.cpu_limit else {})},
    }
    if plan.gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = plan.gpus
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": m.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": m.tmp_size}},
    ]
    if m.grpc_tls_secret is not None:
        mounts.append({"name": "grpc-tls", "mountPath": TLS_MOUNT_PATH, "readOnly": True})
        volumes.append(
            {"name": "grpc-tls", "secret": {"secretName": m.grpc_tls_secret, "defaultMode": 0o440}}
        )
    if uses_pvc:
        mounts.append(
            {"name": "model-repository", "mountPath": m.model_mount_path, "readOnly": True}
        )
        volumes.append(
            {
                "name": "model-repository",
                "persistentVolumeClaim": {"claimName": m.model_pvc, "readOnly": True},
            }
        )
    container = {
        "name": "tritonserver",
        "image": m.image or m.triton_image,
        "imagePullPolicy": m.image_pull_policy,
        "command": ["tritonserver"],
        "args": triton_args(plan, f"$({ADMIN_KEY_ENV})"),  # the kubelet expands $(VAR) from env
        "env": [
            {
                "name": ADMIN_KEY_ENV,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": m.admin_secret,
                        "key": ADMIN_SECRET_KEY,
                        "optional": False,
                    }
                },
            },
            {"name": "HOME", "value": "/tmp"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "ports": [
            {"name": "http", "containerPort": m.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": m.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": m.metrics_port, "protocol": "TCP"},
        ],
        "startupProbe": _probe("/v2/health/ready", 10, math.ceil(m.startup_timeout_s / 10)),
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        # Let endpoint removal reach every proxy before Triton stops taking requests.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": m.run_as_user,
            "runAsGroup": m.run_as_group,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    pod_spec = {
        "automountServiceAccountToken": False,  # Triton never talks to the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": m.drain_timeout_s + 15,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": m.run_as_user,
            "runAsGroup": m.run_as_group,
            "fsGroup": m.run_as_group,
            "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of a large repository
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": plan.selector},
            }
        ],
    }
    if plan.gpus:
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(m.metrics_port),
        "prometheus.io/path": "/metrics",
        "ugt-serving/model": plan.model,
        "ugt-serving/memory-limit": plan.memory_formula,
    }
    spec = {
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": m.startup_timeout_s + 120,
        "selector": {"matchLabels": plan.selector},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "template": {
            "metadata": {"labels": plan.labels, "annotations": annotations},
            "spec": pod_spec,
        },
    }
    if not m.autoscale:  # with an HPA, a replicas field would reset its count on every apply
        spec = {"replicas": m.replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": plan.meta(annotations={"ugt-serving/model": plan.model}),
        "spec": spec,
    }


def service(plan: Plan, metrics: bool) -> dict:
    m = plan.m
    names = ("metrics",) if metrics else ("http", "grpc")
    ports = {"http": m.http_port, "grpc": m.grpc_port, "metrics": m.metrics_port}
    spec = {
        "type": "ClusterIP" if metrics else m.service_type,
        "selector": plan.selector,
        "ports": [{"name": n, "port": ports[n], "targetPort": n, "protocol": "TCP"} for n in names],
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": plan.meta("-metrics" if metrics else ""),
        "spec": spec,
    }


def hpa(plan: Plan) -> dict:
    m = plan.m
    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": m.queue_metric},
            "target": {"type": "AverageValue", "averageValue": str(m.target_queue_time_us)},
        },
    }
    behavior = {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
        },
    }
    spec = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name},
        "minReplicas": m.replicas,
        "maxReplicas": m.max_replicas,
        "metrics": [metric],
        "behavior": behavior,
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": plan.meta(),
        "spec": spec,
    }


def pdb(plan: Plan) -> dict:
    spec = {"maxUnavailable": plan.m.max_unavailable, "selector": {"matchLabels": plan.selector}}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": plan.meta(),
        "spec": spec,
    }


def _namespace(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def network_policy(plan: Plan) -> dict:
    m = plan.m
    clients = {"ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]}
    if m.ingress:  # through the ingress (and its body limit) only, unless a namespace is trusted
        clients = {
            "from": [_namespace(n) for n in (m.ingress_namespace, *m.client_namespaces)],
            **clients,
        }
    spec = {
        "podSelector": {"matchLabels": plan.selector},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            clients,
            {
                "from": [_namespace(m.metrics_namespace)],
                "ports": [{"port": "metrics", "protocol": "TCP"}],
            },
        ],
        "egress": [{}] if m.allow_egress else [],  # [] denies all outbound traffic
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": plan.meta(),
        "spec": spec,
    }


def ingress(plan: Plan, grpc: bool) -> dict:
    """ingress-nginx in front of the Service: bodies over the largest valid request are refused
    (413) before they reach Triton, which has no request-size limit of its own. HTTP TLS ends
    here (``ingress_tls_secret``); gRPC needs it (nginx speaks HTTP/2 to clients over TLS only)
    and is passed on as GRPCS when Triton serves TLS itself."""
    m = plan.m
    port = "grpc" if grpc else "http"
    backend = {"service": {"name": plan.name, "port": {"name": port}}}
    routes = (
        [(GRPC_SERVICE + rpc, "Exact") for rpc in GRPC_PUBLIC_RPCS] if grpc else HTTP_PUBLIC_PATHS
    )
    rule = {"http": {"paths": [{"path": p, "pathType": t, "backend": backend} for p, t in routes]}}
    if m.ingress_host is not None:
        rule = {"host": m.ingress_host, **rule}
    annotations = {
        "nginx.ingress.kubernetes.io/proxy-body-size": str(plan.request_bytes),
        "nginx.ingress.kubernetes.io/backend-protocol": (
            ("GRPCS" if m.grpc_tls_secret else "GRPC") if grpc else "HTTP"
        ),
    }
    spec: dict = {"ingressClassName": m.ingress_class, "rules": [rule]}
    if m.ingress_tls_secret is not None:
        tls = {"secretName": m.ingress_tls_secret}
        spec["tls"] = [{"hosts": [m.ingress_host], **tls} if m.ingress_host else tls]
    meta = plan.meta("-grpc" if grpc else "", annotations=annotations)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": spec}


def pvc(plan: Plan) -> dict:
    m = plan.m
    # ReadWriteMany: replicas on several nodes mount it (read-only) while a publisher writes versions.
    spec = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": m.model_storage}},
    }
    if m.storage_class is not None:
        spec["storageClassName"] = m.storage_class
    meta = {**plan.meta(), "name": m.model_pvc}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def namespace(plan: Plan) -> dict:
    labels = {
        f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")
    }
    labels["pod-security.kubernetes.io/enforce-version"] = "latest"
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": plan.m.namespace, "labels": labels},
    }


def adapter_values(plan: Plan) -> dict:
    """Helm values for prometheus-community/prometheus-adapter: Triton exports cumulative queue
    microseconds and request counts; their rates' ratio is the average queue time per request."""
    m = plan.m
    sel = f'model="{plan.model}"'
    query = (
        f"sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>,{sel}}}[1m])) by (<<.GroupBy>>)"
        f" / clamp_min(sum(rate(nv_inference_request_success{{<<.LabelMatchers>>,{sel}}}[1m])) by (<<.GroupBy>>), 1)"
    )
    rule = {
        "seriesQuery": f'nv_inference_queue_duration_us{{namespace!="",pod!="",{sel}}}',
        "resources": {
            "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        },
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": m.queue_metric},
        "metricsQuery": query,
    }
    return {
        "prometheus": {"url": m.prometheus_url, "port": m.prometheus_port},
        "rules": {"custom": [rule]},
    }
