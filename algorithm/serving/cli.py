"""`ugt-serving`: the command line. It owns all output: progress, tables, --json, exit codes.

Every command turns a ServingError into one line of message plus a hint and exit code 1
(traceback only with -v); other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ServingError

app = typer.Typer(
    name="ugt-serving",
    help="Take a trained UGT recommender from PyTorch to a live, measured Triton Inference Server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

DEFAULT_CHECKPOINT = Path("demo-output/ugt_tiny.safetensors")


class State:
    verbose: bool = False
    json: bool = False


STATE = State()


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging and full tracebacks."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout (for scripts)."
    ),
) -> None:
    STATE.verbose, STATE.json = verbose, json_output
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def handle_errors(fn: Callable) -> Callable:
    """ServingError -> one line + hint, exit 1; traceback only with -v."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServingError as e:
            if STATE.verbose:
                console.print_exception()
            first, *rest = str(e).splitlines() or [type(e).__name__]
            console.print(f"[bold red]error:[/] {escape(first)}", highlight=False)
            for line in rest:
                console.print(line, highlight=False, markup=False)
            if e.hint:
                console.print(f"[yellow]hint:[/] {escape(e.hint)}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=STATE.json,
    )


def stage(description: str):
    """A spinner for a step with no measurable progress."""
    return console.status(f"[bold]{description}...", spinner="dots") if not STATE.json else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def emit(data: dict[str, Any], title: str) -> None:
    """--json: one JSON object on stdout; else a two-column table."""
    if STATE.json:
        out.print_json(json.dumps(data, default=str))
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        table.add_row(str(k), str(v))
    out.print(table)


def load_model(checkpoint: Path):
    from algorithm.ugt import UGTModel

    with stage(f"Loading {checkpoint}"):
        return UGTModel.load(checkpoint)


# --------------------------------------------------------------------------------------- train
@app.command()
@handle_errors
def train(
    output: Path = typer.Option(
        DEFAULT_CHECKPOINT, "--output", "-o", help="Checkpoint to write (safetensors)."
    ),
    preset: str = typer.Option("tiny", help="Model size: tiny (CPU demo) or base (GPU size)."),
    steps: int = typer.Option(1000, min=1, help="Training steps."),
    batch_size: int = typer.Option(64, min=1, help="Users per step."),
    seed: int = typer.Option(0, help="Random seed (data and weights)."),
    time_budget: float = typer.Option(
        0.0, min=0.0, help="Stop after this many seconds (0 = no limit)."
    ),
) -> None:
    """Train a UGT model on synthetic interactions; report held-out recall@K next to chance."""
    from algorithm.ugt import TrainConfig, UGTConfig, train_tiny

    presets = {"tiny": UGTConfig.tiny, "base": UGTConfig.base}
    if preset not in presets:
        from .errors import ConfigError

        raise ConfigError("preset", preset, "tiny or base")
    tc = TrainConfig(
        steps=steps, batch_size=batch_size, seed=seed, time_budget_s=time_budget or None
    )
    with progress() as p:
        task = p.add_task("Training", total=steps)
        model, report = train_tiny(
            presets[preset](),
            tc,
            lambda s, n, loss: p.update(
                task, completed=s, description=f"Training (loss {loss:.2f})"
            ),
        )
    report["checkpoint"] = model.save(output)
    emit(report, "Trained")


# -------------------------------------------------------------------------------------- export
@app.command()
@handle_errors
def export(
    checkpoint: Path = typer.Option(
        DEFAULT_CHECKPOINT, "--checkpoint", "-c", help="Model checkpoint to export."
    ),
    output: Path = typer.Option(
        Path("demo-output/model.onnx"), "--output", "-o", help="ONNX file to write."
    ),
    max_batch_size: int = typer.Option(64, min=1, help="Largest batch the graph accepts."),
    max_seq_length: int = typer.Option(1024, min=1, help="Longest history the graph accepts."),
    opset: int = typer.Option(18, help="ONNX opset (18-23)."),
    model_name: str = typer.Option("ugt_recommend", help="Model name recorded in the sidecar."),
    verify: bool = typer.Option(True, help="Run the ONNX Runtime vs PyTorch parity check."),
) -> None:
    """Export a checkpoint to ONNX (dynamic batch and seq_len) and check parity with PyTorch."""
    from .config import ExportConfig
    from .export_onnx import ONNXExporter

    model = load_model(checkpoint)
    cfg = ExportConfig(
        model_name=model_name,
        max_batch_size=max_batch_size,
        max_seq_length=max_seq_length,
        opset_version=opset,
        codebook_sizes=tuple(model.config.codebook_sizes),
        num_recommendations=model.config.num_recommendations,
        verify=verify,
    )
    with stage("Exporting to ONNX and checking parity"):
        path = ONNXExporter(cfg).export(model, output)
    result: dict[str, Any] = {"onnx_path": path}
    parity = Path(path).with_suffix(".parity.json")
    if verify and parity.is_file():
        result.update(
            {f"parity_{k}": v for k, v in json.loads(parity.read_text())["worst"].items()}
        )
        result["parity_report"] = str(parity)
    emit(result, "Exported")


# ------------------------------------------------------------------------------------ optimize
@app.command()
@handle_errors
def optimize(
    onnx: Path = typer.Option(
        Path("demo-output/model.onnx"), "--onnx", help="Exported ONNX model (from `export`)."
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Artifact file or folder (default: <onnx folder>/<backend>-<precision>/).",
    ),
    backend: str = typer.Option("onnxruntime", help="tensorrt, onnxruntime, openvino or torch."),
    precision: str = typer.Option(
        "fp32", help="fp32, fp16, bf16 (openvino, tensorrt, torch) or int8."
    ),
    calibration_data: Path | None = typer.Option(
        None, help="int8: .npz with the 4 inputs [N, seq_len] (default: synthetic histories)."
    ),
    calibration_method: str = typer.Option(
        "entropy", help="int8 calibration: entropy, minmax or percentile (onnxruntime)."
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="PyTorch checkpoint: the gate's fp32 reference; required by --backend torch.",
    ),
    opt_batch_size: int = typer.Option(32, min=1, help="TensorRT: batch size to tune for."),
    opt_seq_length: int = typer.Option(512, min=1, help="TensorRT: history length to tune for."),
    seq_length_buckets: str = typer.Option(
        "", help="TensorRT: one profile per bucket, e.g. 128,512,1024."
    ),
    workspace_gb: int = typer.Option(4, min=1, help="TensorRT builder workspace (GiB)."),
    emit_trtexec: bool = typer.Option(
        False, "--emit-trtexec", help="TensorRT: print the equivalent trtexec command and exit."
    ),
) -> None:
    """Optimize the ONNX model for a runtime; the artifact is kept only if it passes the accuracy gate."""
    from .accuracy import summarize
    from .backends import get_backend
    from .backends import optimize as optimize_artifact
    from .config import ExportConfig
    from .errors import ConfigError, ParityError
    from .export_onnx import read_sidecar

    b = get_backend(backend)
    meta = read_sidecar(onnx)
    try:
        buckets = tuple(int(s) for s in seq_length_buckets.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            "seq_length_buckets", seq_length_buckets, "comma-separated integers, e.g. 128,512,1024"
        ) from None
    contract = {
        k: meta[k] for k in ("max_batch_size", "max_seq_length", "num_recommendations") if k in meta
    }
    if meta.get("codebook_sizes"):
        contract["codebook_sizes"] = tuple(meta["codebook_sizes"])
    if meta.get("model_name"):
        contract["model_name"] = meta["model_name"]
    cfg = ExportConfig(
        precision=precision,
        calibration_method=calibration_method,
        opt_batch_size=opt_batch_size,
        opt_seq_length=opt_seq_length,
        seq_length_buckets=buckets,
        workspace_size_gb=workspace_gb,
        **contract,
    )
    out = output or onnx.parent / f"{b.name}-{precision}" / b.artifact_name
    if emit_trtexec:
        if b.name != "tensorrt":
            raise ConfigError("--emit-trtexec", backend, "--backend tensorrt")
        from .optimize_trt import trtexec_command

        command = trtexec_command(onnx, out, cfg)
        if STATE.json:
            emit({"trtexec": command}, "trtexec")
        else:
            out_console = Console(soft_wrap=True)
            out_console.print(command, markup=False, highlight=False)
        return
    try:
        with stage(f"Optimizing with {b.name} ({precision}) and checking accuracy"):
            path = optimize_artifact(
                onnx,
                out,
                b.name,
                cfg,
                str(calibration_data) if calibration_data else None,
                checkpoint=checkpoint,
            )
    except ParityError as e:
        if e.report.get("worst"):
            emit(
                summarize(e.report),
                f"Accuracy gate: {b.name} {precision} REFUSED (artifact not written)",
            )
        raise
    report = json.loads(Path(f"{path}.accuracy.json").read_text())
    emit(
        {
            "artifact": path,
            "backend": b.name,
            "triton_platform": b.triton_platform,
            "accuracy_report": f"{path}.accuracy.json",
            **summarize(report),
        },
        "Optimized",
    )


# ----------------------------------------------------------------------------------- manifests
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
) -> None:
    """Write the Dockerfile and Kubernetes manifests (Deployment, Service, HPA, PDB, NetworkPolicy)."""
    from .config import ExportConfig, TritonConfig
    from .errors import ConfigError, InputFileNotFoundError
    from .manifests import ManifestConfig, write_manifests

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
             "max_replicas": max_replicas, "namespace": namespace, "model_pvc": model_pvc}  # fmt: skip
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


# config, deploy, validate, serve, versions (cli_deploy); benchmark, demo (cli_bench):
# registered on `app` by importing the modules.
from . import cli_bench, cli_deploy  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    # `python -m algorithm.serving.cli`: run the package module's app, on which cli_bench and
    # cli_deploy registered their commands (this __main__ copy is a different module object).
    from algorithm.serving.cli import app as _app

    _app()
