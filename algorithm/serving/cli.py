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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (for scripts)."),
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
            console.print(f"[bold red]error:[/] {first}", highlight=False)
            for line in rest:
                console.print(line, highlight=False, markup=False)
            if e.hint:
                console.print(f"[yellow]hint:[/] {e.hint}", highlight=False)
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
    output: Path = typer.Option(DEFAULT_CHECKPOINT, "--output", "-o", help="Checkpoint to write (safetensors)."),
    preset: str = typer.Option("tiny", help="Model size: tiny (CPU demo) or base (GPU size)."),
    steps: int = typer.Option(1000, min=1, help="Training steps."),
    batch_size: int = typer.Option(64, min=1, help="Users per step."),
    seed: int = typer.Option(0, help="Random seed (data and weights)."),
    time_budget: float = typer.Option(0.0, min=0.0, help="Stop after this many seconds (0 = no limit)."),
) -> None:
    """Train a UGT model on synthetic interactions; report held-out recall@K next to chance."""
    from algorithm.ugt import TrainConfig, UGTConfig, train_tiny

    presets = {"tiny": UGTConfig.tiny, "base": UGTConfig.base}
    if preset not in presets:
        from .errors import ConfigError

        raise ConfigError("preset", preset, "tiny or base")
    tc = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, time_budget_s=time_budget or None)
    with progress() as p:
        task = p.add_task("Training", total=steps)
        model, report = train_tiny(presets[preset](), tc, lambda s, n, loss: p.update(task, completed=s, description=f"Training (loss {loss:.2f})"))
    report["checkpoint"] = model.save(output)
    emit(report, "Trained")


# -------------------------------------------------------------------------------------- export
@app.command()
@handle_errors
def export(
    checkpoint: Path = typer.Option(DEFAULT_CHECKPOINT, "--checkpoint", "-c", help="Model checkpoint to export."),
    output: Path = typer.Option(Path("demo-output/model.onnx"), "--output", "-o", help="ONNX file to write."),
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
        result.update({f"parity_{k}": v for k, v in json.loads(parity.read_text())["worst"].items()})
        result["parity_report"] = str(parity)
    emit(result, "Exported")


# ----------------------------------------------------------------------------------- manifests
@app.command()
@handle_errors
def manifests(
    output: Path = typer.Option(Path("deploy"), "--output", "-o", help="Folder for docker/, k8s/, prometheus-adapter/."),
    config: Path | None = typer.Option(None, help="JSON with optional 'export', 'triton', 'manifest' objects; flags override it."),
    model_name: str | None = typer.Option(None, help="Triton model name (default ugt_recommend)."),
    gpus: int | None = typer.Option(None, min=0, help="GPUs per pod; Triton instances on devices 0..N-1 (0: KIND_CPU)."),
    platform: str | None = typer.Option(None, help="tensorrt_plan, onnxruntime_onnx, openvino or python."),
    image: str | None = typer.Option(None, help="Image the Deployment runs (default: the Triton image + the PVC)."),
    triton_image: str | None = typer.Option(None, help="Official Triton image the Dockerfile builds FROM."),
    replicas: int | None = typer.Option(None, min=1, help="Replicas (the autoscaler's minimum)."),
    max_replicas: int | None = typer.Option(None, min=1, help="The autoscaler's maximum."),
    namespace: str | None = typer.Option(None, help="Kubernetes namespace."),
    model_pvc: str | None = typer.Option(None, help="PVC holding the model repository; '' = baked into --image."),
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
            raise ConfigError("config", str(config), "a JSON object with keys among export, triton, manifest")
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


if __name__ == "__main__":  # pragma: no cover
    app()
