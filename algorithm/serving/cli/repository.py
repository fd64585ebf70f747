"""`ugt-serving` commands for the model repository and the server: config, deploy, validate,
serve, versions {list, deploy, rollback, cleanup}. Registered on ``cli.app`` on import."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from algorithm.serving.cli.app import (
    ADMIN_KEY_FILE_OPT,
    DEFAULT_CHECKPOINT,
    STATE,
    app,
    console,
    emit,
    handle_errors,
    load_model,
    print_table,
    stage,
)
from algorithm.serving.config import check_output_path

DEFAULT_REPOSITORY = Path("demo-output/model_repository")

versions_app = typer.Typer(
    help="List, publish, roll back and clean up model versions.",
    no_args_is_help=True,
    rich_markup_mode=None,  # full option names at any width, as the main app
)
app.add_typer(versions_app, name="versions")


def _ints(field: str, text: str | None) -> tuple[int, ...] | None:
    from algorithm.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(field, text, "comma-separated integers, e.g. 8,16,32") from None


def _length_mix(text: str) -> tuple[float, float] | None:
    from algorithm.errors import ConfigError

    if text.strip().lower() == "none":
        return None
    try:
        median, sigma = (float(t) for t in text.split(","))
    except ValueError:
        raise ConfigError("length_mix", text, "median,sigma (e.g. 200,0.8) or none") from None
    return median, sigma


def _instance_kind(kind: str, platform: str) -> str:
    if kind != "auto":
        return kind
    if platform == "tensorrt_plan":
        return "KIND_GPU"
    if platform == "openvino":
        return "KIND_CPU"
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "KIND_GPU"
    return "KIND_CPU"


def _configs(model, opts: dict[str, Any]):
    """ExportConfig and TritonConfig from the shared options (and the model's shape)."""
    from algorithm.serving.config import ExportConfig, TritonConfig

    export_fields: dict[str, Any] = {
        "model_name": opts["model_name"],
        "precision": opts["precision"],
        "max_batch_size": opts["max_batch_size"],
        "max_seq_length": opts["max_seq_length"],
    }
    kind = _instance_kind(opts["instance_kind"], opts["platform"])
    triton_fields: dict[str, Any] = {
        "platform": opts["platform"], "python_runtime": opts["python_runtime"], "instance_kind": kind,
        "instance_count": opts["instance_count"], "max_queue_delay_us": opts["max_queue_delay_us"],
        "max_queue_size": opts["max_queue_size"], "default_queue_timeout_us": opts["queue_timeout_us"],
        "model_warmup": opts["warmup"], "response_cache": opts["response_cache"],
        "trt_accelerator_precision": opts["trt_precision"], "version_policy": opts["version_policy"],
        "runtime_threads": opts["threads"], "pipeline_depth": opts["pipeline_depth"],
        "continuous_batching": opts["continuous_batching"],
    }  # fmt: skip
    triton_fields["length_mix"] = _length_mix(opts["length_mix"])
    gpus = _ints("gpus", opts["gpus"])
    triton_fields["gpus"] = gpus if gpus is not None else ((0,) if kind == "KIND_GPU" else ())
    preferred = _ints("preferred_batch_sizes", opts["preferred_batch_sizes"])
    if preferred is not None:
        triton_fields["preferred_batch_sizes"] = preferred
    export = (
        ExportConfig(**export_fields)
        if model is None
        else ExportConfig.for_model(model, **export_fields)
    )
    return export, TritonConfig(**triton_fields)


TARGETS = {"auto": None, "this": True, "other": False}
TARGET_OPT = typer.Option(
    "auto",
    "--target",
    help="Where the repository is served: this (its instance kinds must exist on this host), "
    "other (another host: not checked), or auto (this, for python-backend models).",
)


def _target(target: str) -> bool | None:
    from algorithm.errors import ConfigError

    if target not in TARGETS:
        raise ConfigError("--target", target, "auto, this or other")
    return TARGETS[target]


# Shared options of `config` and `deploy` (typer has no option groups; one definition here).
OPT = {
    "model_name": typer.Option("ugt_recommend", help="Triton model name."),
    "platform": typer.Option(
        "python",
        help="tensorrt_plan, onnxruntime_onnx, openvino, or python. The default is python because "
        "the bundled tritonserver runs only python models; the API's TritonConfig defaults to "
        "tensorrt_plan, as the module guide does.",
    ),
    "python_runtime": typer.Option(
        "onnxruntime",
        help="Runner of a python model: onnxruntime, openvino, torch, torch_aot, tensorrt.",
    ),
    "precision": typer.Option(
        "fp32", help="fp32, fp16, bf16 or int8 (the optimized artifact's precision)."
    ),
    "instance_kind": typer.Option(
        "auto", help="KIND_CPU, KIND_GPU, KIND_AUTO, or auto (GPU when CUDA is available)."
    ),
    "gpus": typer.Option(None, help="GPU ids for KIND_GPU instances, e.g. 0,1."),
    "instance_count": typer.Option(1, min=1, help="Model instances (per GPU for KIND_GPU)."),
    "max_batch_size": typer.Option(64, min=1, help="Largest batch Triton forms."),
    "max_seq_length": typer.Option(1024, min=1, help="Longest history accepted."),
    "preferred_batch_sizes": typer.Option(
        None, help="Dynamic batcher's preferred sizes, e.g. 8,16,32,64."
    ),
    "max_queue_delay_us": typer.Option(
        100, min=0, help="How long the batcher waits to fill a batch."
    ),
    "max_queue_size": typer.Option(
        0, min=0, help="Reject requests beyond this queue length (0 = unbounded)."
    ),
    "queue_timeout_us": typer.Option(0, min=0, help="Reject requests queued longer (0 = never)."),
    "trt_precision": typer.Option(
        None, help="onnxruntime_onnx on GPU: TensorRT accelerator precision fp32/fp16."
    ),
    "version_policy": typer.Option("latest", help="latest (serve the newest version) or all."),
    "threads": typer.Option(
        0, min=0, help="Intra-op threads of CPU runtimes (0 = runtime default)."
    ),
    "warmup": typer.Option(True, help="Warm-up samples in config.pbtxt."),
    "response_cache": typer.Option(False, help="Enable Triton's response cache for the model."),
    "length_mix": typer.Option(
        "200,0.8",
        help="torch on GPU: median,sigma of the log-normal history lengths whose CUDA graphs are "
        "captured at load ('none': full-length batches only).",
    ),
    "pipeline_depth": typer.Option(
        0,
        min=0,
        max=8,
        help="python + torch: batches an instance keeps queued on the GPU while it reads the "
        "next (0 = off; 2 with --max-queue-delay-us 3000 held P99 20 ms at 64 x 1024 on an H200).",
    ),
    "continuous_batching": typer.Option(
        False,
        "--continuous-batching/--no-continuous-batching",
        help="with --pipeline-depth >= 1: execute() returns at once and the requests left so far "
        "go to the GPU as one batch whenever a pipeline slot frees (no queue delay needed).",
    ),
}


# ----------------------------------------------------------------------------------------- config
@app.command()
@handle_errors
def config(
    repository: Path | None = typer.Option(
        None,
        "--repository",
        "-r",
        help="Write <repository>/<name>/config.pbtxt (default: print it).",
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Take codebooks, K and the longest history from this model.",
    ),
    model_file: Path | None = typer.Option(None, help="Also publish this artifact as --version."),
    version: int = typer.Option(1, min=1, help="Version for --model-file."),
    model_name: str = OPT["model_name"],
    platform: str = OPT["platform"],
    python_runtime: str = OPT["python_runtime"],
    precision: str = OPT["precision"],
    instance_kind: str = OPT["instance_kind"],
    gpus: str | None = OPT["gpus"],
    instance_count: int = OPT["instance_count"],
    max_batch_size: int = OPT["max_batch_size"],
    max_seq_length: int = OPT["max_seq_length"],
    preferred_batch_sizes: str | None = OPT["preferred_batch_sizes"],
    max_queue_delay_us: int = OPT["max_queue_delay_us"],
    max_queue_size: int = OPT["max_queue_size"],
    queue_timeout_us: int = OPT["queue_timeout_us"],
    trt_precision: str | None = OPT["trt_precision"],
    version_policy: str = OPT["version_policy"],
    threads: int = OPT["threads"],
    warmup: bool = OPT["warmup"],
    response_cache: bool = OPT["response_cache"],
    length_mix: str = OPT["length_mix"],
    pipeline_depth: int = OPT["pipeline_depth"],
    continuous_batching: bool = OPT["continuous_batching"],
) -> None:
    """Generate config.pbtxt (Triton's ModelConfig protobuf) for a platform; print or write it."""
    from algorithm.serving.triton.schema import artifact_filename
    from algorithm.serving.triton_config import TritonConfigGenerator

    opts = dict(locals())
    if repository is not None:
        check_output_path("--repository", repository)
    model = load_model(checkpoint) if checkpoint is not None else None
    ec, tc = _configs(model, opts)
    gen = TritonConfigGenerator(ec, tc)
    if repository is None:
        name = artifact_filename(tc.platform, tc.python_runtime, model_file) if model_file else None
        text = gen.config_text(name)
        if STATE.json:
            emit({"config": text}, "config.pbtxt")
        else:
            sys.stdout.write(text)
        return
    path = gen.generate(repository, model_file=model_file, version=version)
    emit(
        {
            "config_path": path,
            "platform": tc.platform,
            "instance_kind": tc.instance_kind,
            "version": version if model_file else None,
        },
        "Triton config",
    )


# ----------------------------------------------------------------------------------------- deploy
@app.command()
@handle_errors
def deploy(
    checkpoint: Path = typer.Option(
        DEFAULT_CHECKPOINT, "--checkpoint", "-c", help="Model checkpoint to deploy."
    ),
    repository: Path = typer.Option(
        DEFAULT_REPOSITORY, "--repository", "-r", help="Model repository to write."
    ),
    optimize: bool = typer.Option(
        True, help="Optimize for the platform (--no-optimize: serve the ONNX export as is)."
    ),
    version: int | None = typer.Option(
        None, min=1, help="Version to publish (default: the next one)."
    ),
    model_name: str = OPT["model_name"],
    platform: str = OPT["platform"],
    python_runtime: str = OPT["python_runtime"],
    precision: str = OPT["precision"],
    instance_kind: str = OPT["instance_kind"],
    gpus: str | None = OPT["gpus"],
    instance_count: int = OPT["instance_count"],
    max_batch_size: int = OPT["max_batch_size"],
    max_seq_length: int = OPT["max_seq_length"],
    preferred_batch_sizes: str | None = OPT["preferred_batch_sizes"],
    max_queue_delay_us: int = OPT["max_queue_delay_us"],
    max_queue_size: int = OPT["max_queue_size"],
    queue_timeout_us: int = OPT["queue_timeout_us"],
    trt_precision: str | None = OPT["trt_precision"],
    version_policy: str = OPT["version_policy"],
    threads: int = OPT["threads"],
    warmup: bool = OPT["warmup"],
    response_cache: bool = OPT["response_cache"],
    length_mix: str = OPT["length_mix"],
    pipeline_depth: int = OPT["pipeline_depth"],
    continuous_batching: bool = OPT["continuous_batching"],
    target: str = TARGET_OPT,
) -> None:
    """Checkpoint -> ONNX -> optimized artifact -> model repository (a new version), validated.

    A re-run with the same checkpoint and options publishes nothing new."""
    from algorithm.serving.exporter import ServingExporter
    from algorithm.serving.pipeline import preflight

    opts = dict(locals())
    host = _target(target)
    check_output_path("--repository", repository)
    model = load_model(checkpoint)
    ec, tc = _configs(model, opts)
    preflight(repository, tc, host)  # before the export: path, optimizer installed, devices
    with stage(f"Deploying {ec.model_name} ({tc.platform}) to {repository}"):
        paths = ServingExporter(ec, tc).deploy_full_pipeline(
            model, repository, version=version, optimize=optimize, host=host
        )
    unchanged = paths.get("status") == "unchanged"
    title = (
        f"Unchanged: version {paths['version']} was built from this checkpoint and these options"
        if unchanged
        else "Deployed"
    )
    emit(paths, title)


# --------------------------------------------------------------------------------------- validate
@app.command()
@handle_errors
def validate(
    repository: Path = typer.Argument(DEFAULT_REPOSITORY, help="Model repository."),
    model_name: str | None = typer.Option(None, "--model", "-m", help="Check only this model."),
    target: str = TARGET_OPT,
) -> None:
    """Check a repository the way Triton loads it; exit 1 with the problems if it is invalid."""
    from algorithm.serving.triton.validation import validate_deployment

    result = validate_deployment(repository, model_name, host=_target(target))
    if result["valid"]:
        if STATE.json:
            emit(result, "Validation")
        else:
            info = {k: v for k, v in result["info"].items() if k != "models"}
            emit({"valid": True, **info}, "Validation")
        return
    _invalid(result)


def _invalid(result: dict):
    """An invalid repository: each problem on a line and a hint (JSON: the result plus the
    error fields every command gives)."""
    from rich.markup import escape

    errors = result["errors"]
    n = len(errors)
    more = f" (and {n - 1} more problem{'s' * (n > 2)})" if n > 1 else ""
    hint = " ".join(result["hints"][:2])
    if STATE.json:
        emit({**result, "error": errors[0] + more, "hint": hint, "type": "RepositoryError"}, "")
    else:
        for e in errors:
            console.print(f"[bold red]error:[/] {escape(e)}", highlight=False)
        console.print(f"[yellow]hint:[/] {escape(hint)}", highlight=False)
    raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ serve
def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _check_ports(host: str, ports: dict[str, int]) -> None:
    """ConfigError naming the option whose port another process holds (0: picked later)."""
    import errno
    import socket

    from algorithm.errors import ConfigError

    for option, port in ports.items():
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise ConfigError(
                    option,
                    port,
                    f"a free port; {host}:{port} is in use by another process",
                    hint=f"Pass another {option} (0 picks a free one), or stop what holds "
                    f"port {port} (`ss -ltnp | grep :{port}` shows it).",
                ) from None


@app.command()
@handle_errors
def serve(
    repository: Path = typer.Argument(DEFAULT_REPOSITORY, help="Model repository."),
    http_port: int = typer.Option(8000, min=0, max=65535, help="HTTP port (0 = a free one)."),
    grpc_port: int = typer.Option(8001, min=0, max=65535, help="gRPC port (0 = a free one)."),
    metrics_port: int = typer.Option(8002, min=0, max=65535, help="Metrics port (0 = a free one)."),
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to bind (0.0.0.0 for every interface: then the admin key is required).",
    ),
    model_control: str = typer.Option(
        "none", help="none, explicit (load/unload via the API; `versions` --url), or poll."
    ),
    poll_secs: int = typer.Option(
        5, min=1, help="Repository poll interval for --model-control poll."
    ),
    triton_bin: Path | None = typer.Option(
        None, help="tritonserver binary (default: $TRITONSERVER_BIN, then nvidia-pytriton's)."
    ),
    log_verbose: int = typer.Option(0, min=0, help="tritonserver --log-verbose level."),
    startup_timeout: float = typer.Option(120.0, min=1.0, help="Seconds to wait for readiness."),
    response_cache_bytes: int = typer.Option(
        0, min=0, help="Size of Triton's response cache (0 = off)."
    ),
    restart: bool = typer.Option(
        True,
        help="Restart tritonserver when it dies, with exponential back-off (--no-restart: exit 1).",
    ),
    restart_backoff: float = typer.Option(
        1.0, min=0.0, help="Seconds before the first restart; doubles per failed restart, up to 60."
    ),
    max_restarts: int = typer.Option(
        0, min=0, help="Give up (exit 1) after this many failed restarts in a row (0 = never)."
    ),
    admin_key_file: Path | None = ADMIN_KEY_FILE_OPT,
    grpc_tls_cert: Path | None = typer.Option(
        None, help="Serve gRPC over TLS with this certificate (PEM; with --grpc-tls-key)."
    ),
    grpc_tls_key: Path | None = typer.Option(None, help="The gRPC certificate's private key."),
    grpc_tls_client_ca: Path | None = typer.Option(
        None, help="Mutual TLS: accept only clients with a certificate from this CA."
    ),
    grpc_request_pool: int | None = typer.Option(
        None,
        min=0,
        help="gRPC request objects Triton keeps for reuse (default 8); 0: an oversized "
        "request's buffers are freed, not kept (its throughput cost: benchmarks/RESULTS.md).",
    ),
) -> None:
    """Run the real tritonserver on a repository in the foreground; Ctrl-C stops it.

    Off 127.0.0.1 the admin APIs (repository, model config, statistics, trace, logging, shared
    memory) need the admin key; inference, health and metadata stay open."""
    from algorithm.errors import ConfigError, ServerError
    from algorithm.serving.security import GrpcTls, ServerSecurity, read_admin_key
    from algorithm.serving.triton.supervisor import RestartPolicy, ServerSupervisor, describe_event
    from algorithm.serving.triton.validation import validate_deployment

    # Preflight: what would make the server fail to start or load, said before it starts. First
    # the admin key (refused off loopback without one), then the repository, served here (devices
    # must exist), and only what the server loads (the served versions).
    admin_key = read_admin_key(admin_key_file)
    ServerSecurity.resolve(host, admin_key)
    checked = validate_deployment(repository, host=True, served_only=True)
    if not checked["valid"]:
        _invalid(checked)
    _check_ports(
        host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    )

    def say(event: str, info: dict) -> None:  # every restart is announced on stderr
        console.print(
            f"serve: {describe_event(event, info)}", markup=False, highlight=False, soft_wrap=True
        )

    extra = [f"--repository-poll-secs={poll_secs}"] if model_control == "poll" else []
    tls = None
    if grpc_tls_cert or grpc_tls_key or grpc_tls_client_ca:
        if not (grpc_tls_cert and grpc_tls_key):
            raise ConfigError(
                "grpc_tls_cert" if not grpc_tls_cert else "grpc_tls_key",
                None,
                "both --grpc-tls-cert and --grpc-tls-key for gRPC TLS",
            )
        tls = GrpcTls(
            str(grpc_tls_cert), str(grpc_tls_key), grpc_tls_client_ca and str(grpc_tls_client_ca)
        )
    policy = RestartPolicy(
        initial_backoff_s=restart_backoff,
        max_backoff_s=max(60.0, restart_backoff),
        max_restarts=max_restarts,
    )
    supervisor = ServerSupervisor(
        repository,
        policy,
        say,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        triton_bin=triton_bin,
        model_control=model_control,
        log_verbose=log_verbose,
        startup_timeout_s=startup_timeout,
        host=host,
        response_cache_bytes=response_cache_bytes,
        extra_args=extra,
        admin_key=admin_key,
        grpc_tls=tls,
        grpc_request_pool=grpc_request_pool,
    )
    # SIGTERM (docker stop, kubectl) stops it like Ctrl-C does; SIGINT is set explicitly
    # because a shell starts background jobs with it ignored.
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with stage(f"Starting tritonserver on {repository}"):
            server = supervisor.start()
        models = [m["name"] for m in server.repository_index() if m.get("state") == "READY"]
        emit(
            {
                **server.urls(),
                "admin_apis": "need the admin key" if server.restricted else "open (loopback)",
                "grpc_tls": "off" if tls is None else ("mutual" if tls.mutual else "on"),
                "models": models,
                "log": str(server.log_path),
                "pid": server.process.pid,
            },
            "Serving (Ctrl-C stops)",
        )
        if restart:
            supervisor.run()  # returns on stop(); ServerError once max_restarts in a row failed
        while server.is_alive():
            time.sleep(0.5)
        raise ServerError("tritonserver exited unexpectedly", server.error_tail())
    except KeyboardInterrupt:
        console.print("stopping tritonserver...", highlight=False)
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------- versions
def _reload(url: str | None, model_name: str, admin_key_file: Path | None) -> str:
    if not url:
        return "not requested (a server in poll mode picks it up; explicit mode needs --url)"
    from algorithm.serving.security import read_admin_key
    from algorithm.serving.triton.admin import request_model_load

    request_model_load(url, model_name, admin_key=read_admin_key(admin_key_file))
    return f"reloaded on {url}"


REPO_ARG = typer.Argument(DEFAULT_REPOSITORY, help="Model repository.")
MODEL_OPT = typer.Option("ugt_recommend", "--model", "-m", help="Model name.")
URL_OPT = typer.Option(
    None, "--url", help="HTTP endpoint (host:port) of a server in explicit mode to reload."
)


@versions_app.command("list")
@handle_errors
def versions_list(repository: Path = REPO_ARG, model_name: str = MODEL_OPT) -> None:
    """Versions of a model: served, available, or retired (by a rollback)."""
    from algorithm.serving.triton.repository import ModelVersionManager

    rows = ModelVersionManager(repository).describe(model_name)
    if STATE.json:
        emit({"model": model_name, "versions": rows}, "Versions")
        return
    columns = ("version", "status", "bytes", "modified")
    print_table(f"{model_name} in {repository}", columns, [[r[c] for c in columns] for r in rows])


@versions_app.command("deploy")
@handle_errors
def versions_deploy(
    model_file: Path = typer.Argument(
        ..., help="Artifact to publish (its sidecar <file>.json goes along)."
    ),
    repository: Path = REPO_ARG,
    model_name: str = MODEL_OPT,
    version: int | None = typer.Option(None, min=1, help="Version number (default: the next one)."),
    url: str | None = URL_OPT,
    admin_key_file: Path | None = ADMIN_KEY_FILE_OPT,
) -> None:
    """Publish an artifact as a new version (atomically) under the model's existing config."""
    from algorithm.serving.triton.repository import ModelVersionManager

    v = ModelVersionManager(repository).deploy_version(model_name, model_file, version=version)
    emit(
        {"model": model_name, "version": v, "server": _reload(url, model_name, admin_key_file)},
        "Published",
    )


@versions_app.command("rollback")
@handle_errors
def versions_rollback(
    version: int = typer.Argument(..., min=1, help="The version to serve."),
    repository: Path = REPO_ARG,
    model_name: str = MODEL_OPT,
    url: str | None = URL_OPT,
    admin_key_file: Path | None = ADMIN_KEY_FILE_OPT,
) -> None:
    """Serve VERSION again: newer versions move to .retired/ (a later rollback brings them back)."""
    from algorithm.serving.triton.repository import ModelVersionManager

    result = ModelVersionManager(repository).rollback(model_name, version)
    emit(
        {"model": model_name, **result, "server": _reload(url, model_name, admin_key_file)},
        "Rolled back",
    )


@versions_app.command("cleanup")
@handle_errors
def versions_cleanup(
    repository: Path = REPO_ARG,
    model_name: str = MODEL_OPT,
    keep: int = typer.Option(
        3, min=1, help="Newest versions to keep (the served one always stays)."
    ),
    keep_retired: bool = typer.Option(False, help="Keep versions retired by rollbacks."),
    url: str | None = URL_OPT,
    admin_key_file: Path | None = ADMIN_KEY_FILE_OPT,
) -> None:
    """Remove old versions, keeping the newest --keep and the served one."""
    from algorithm.serving.triton.repository import ModelVersionManager

    removed = ModelVersionManager(repository).cleanup_old_versions(
        model_name, keep=keep, include_retired=not keep_retired
    )
    emit(
        {
            "model": model_name,
            "removed": removed,
            "server": _reload(url, model_name, admin_key_file) if removed else "unchanged",
        },
        "Cleaned up",
    )
