"""Eager PyTorch vs ONNX Runtime latency of the trained tiny model on this machine (issue 2).

    .venv/bin/python -m benchmarks.model_cpu [--checkpoint demo-output/ugt_tiny.safetensors]

Writes benchmarks/results/model_cpu-<stamp>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from algorithm.serving import ExportConfig, export_to_onnx
from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.verify.parity import compare_outputs
from algorithm.ugt import SyntheticCatalog, TrainConfig, UGTModel, train_tiny

from .common import environment, time_call, write_result

POINTS = [(1, 32), (1, 128), (8, 128), (32, 128), (8, 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", type=Path, default=Path("demo-output/ugt_tiny.safetensors"))
    ap.add_argument(
        "--threads", type=int, default=0, help="torch/ORT intra-op threads (0 = default)"
    )
    args = ap.parse_args()
    if args.checkpoint.is_file():
        model = UGTModel.load(args.checkpoint)
        source = str(args.checkpoint)
    else:
        model, _ = train_tiny(train=TrainConfig(steps=1000))
        source = "trained in this run (1000 steps)"
    if args.threads:
        torch.set_num_threads(args.threads)
    catalog = SyntheticCatalog()
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_to_onnx(model, Path(tmp) / "model.onnx", ExportConfig(max_batch_size=64))
        ort = OnnxRuntimeRunner(onnx_path, intra_op_threads=args.threads)
        ref = TorchRunner(model)
        rows = []
        for batch, seq in POINTS:
            x = catalog.batch(batch, seq, seq, rng)
            x.pop("target")
            t_torch = time_call(lambda x=x: ref.infer(x))
            t_ort = time_call(lambda x=x: ort.infer(x))
            acc = compare_outputs(ref.infer(x), ort.infer(x))
            rows.append(
                {
                    "batch": batch,
                    "seq_len": seq,
                    "torch_eager_fp32": t_torch,
                    "onnxruntime_fp32": t_ort,
                    "speedup": t_torch["median_ms"] / t_ort["median_ms"],
                    "recall_overlap": acc["recall_overlap"],
                    "max_score_diff": acc["max_score_diff"],
                }
            )
    data = {
        "benchmark": "model_cpu",
        "environment": environment(),
        "model": model.config.to_dict(),
        "checkpoint": source,
        "threads": args.threads or torch.get_num_threads(),
        "points": rows,
    }
    path = write_result("model_cpu", data)
    print(
        "| batch | seq_len | PyTorch eager fp32 median ms | ONNX Runtime fp32 median ms | speed-up | recall@50 overlap |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['seq_len']} | {r['torch_eager_fp32']['median_ms']:.2f} | "
            f"{r['onnxruntime_fp32']['median_ms']:.2f} | {r['speedup']:.2f}x | {r['recall_overlap']:.3f} |"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
