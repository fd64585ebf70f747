"""`ugt-serving train`, `export` and `optimize`: the model and its artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from algorithm.serving.cli.app import (
    DEFAULT_CHECKPOINT,
    STATE,
    app,
    emit,
    handle_errors,
    load_model,
    progress,
    stage,
    warn,
)
from algorithm.serving.config import check_output_path
from algorithm.serving.contract import accuracy_report_path, parity_report_path


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
        from algorithm.errors import ConfigError

        raise ConfigError("preset", preset, "tiny or base")
    check_output_path("--output", output, "file")
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
    if "warning" in report:
        warn(report["warning"])


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
    from algorithm.serving.config import ExportConfig
    from algorithm.serving.export_onnx import ONNXExporter

    check_output_path("--output", output, "file")
    model = load_model(checkpoint)
    cfg = ExportConfig.for_model(
        model,
        model_name=model_name,
        max_batch_size=max_batch_size,
        max_seq_length=max_seq_length,
        opset_version=opset,
        verify=verify,
    )
    with stage("Exporting to ONNX and checking parity"):
        path = ONNXExporter(cfg).export(model, output)
    result: dict[str, Any] = {"onnx_path": path}
    parity = parity_report_path(path)
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
    fp32_layers: str = typer.Option(
        "",
        help="Layer-name patterns kept in fp32 below fp32 precision, comma list ('*', '?'), "
        "e.g. 'node_MatMul_8?' (tensorrt; onnxruntime fp16/int8; openvino int8).",
    ),
    emit_trtexec: bool = typer.Option(
        False, "--emit-trtexec", help="TensorRT: print the equivalent trtexec command and exit."
    ),
) -> None:
    """Optimize the ONNX model for a runtime; the artifact is kept only if it passes the accuracy gate."""
    from algorithm.errors import ConfigError, ParityError
    from algorithm.serving.backends import get_backend
    from algorithm.serving.backends import optimize as optimize_artifact
    from algorithm.serving.config import ExportConfig
    from algorithm.serving.contract import read_sidecar
    from algorithm.serving.verify.accuracy import summarize

    b = get_backend(backend)
    meta = read_sidecar(onnx)
    try:
        buckets = tuple(int(s) for s in seq_length_buckets.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            "seq_length_buckets", seq_length_buckets, "comma-separated integers, e.g. 128,512,1024"
        ) from None
    cfg = ExportConfig.from_sidecar(
        meta,
        precision=precision,
        calibration_method=calibration_method,
        opt_batch_size=opt_batch_size,
        opt_seq_length=opt_seq_length,
        seq_length_buckets=buckets,
        workspace_size_gb=workspace_gb,
        fp32_layers=tuple(p.strip() for p in fp32_layers.split(",") if p.strip()),
    )
    out = output or onnx.parent / f"{b.name}-{precision}" / b.artifact_name
    if emit_trtexec:
        if b.name != "tensorrt":
            raise ConfigError("--emit-trtexec", backend, "--backend tensorrt")
        from algorithm.serving.optimize_trt import trtexec_command

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
        if e.report.get("worst") and not STATE.json:  # --json: the report is in the error object
            emit(
                summarize(e.report),
                f"Accuracy gate: {b.name} {precision} REFUSED (artifact not written)",
            )
        raise
    report = json.loads(accuracy_report_path(path).read_text())
    emit(
        {
            "artifact": path,
            "backend": b.name,
            "triton_platform": b.triton_platform,
            "accuracy_report": str(accuracy_report_path(path)),
            **summarize(report),
        },
        "Optimized",
    )


# ----------------------------------------------------------------------------------- manifests
