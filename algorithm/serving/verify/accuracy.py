"""The accuracy gate: an optimized artifact against the fp32 reference on held-out histories.

Every ``backends.optimize`` call ends here. The inputs are held-out user histories of the demo
distribution (random walks over ``SyntheticCatalog``, the distribution the demo model was
trained on, with a seed the trainer and the calibrators never use), not uniform noise: a
quantized model can agree on noise and still reorder the items real users get, and vice versa.
The checks are ranking-aware (``parity.compare_outputs``): recall@K overlap, top-1 agreement,
rank correlation on the common items, max/mean score error, plus how often the true next item
is in the top K for the reference and for the artifact.

The reference is the PyTorch model in fp32 when the caller passes it (``reference_model=``),
else the exported ONNX model run in fp32 by ONNX Runtime. The ONNX model was checked against
PyTorch when it was exported (``<model>.parity.json``: recall overlap >= 0.99, score error <=
1e-3), so it stands in for PyTorch without needing the weights or the model's Python code; the
report says which reference was used and carries the export's parity numbers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from algorithm.errors import ConfigError
from algorithm.serving.config import ExportConfig
from algorithm.serving.contract import INPUT_NAMES, parity_report_path
from algorithm.serving.verify.parity import compare_outputs, enforce, merge_reports

logger = logging.getLogger(__name__)

# Held-out: train_tiny draws its walks from seed 0, calibration from backends.base.CALIBRATION_SEED.
HOLDOUT_SEED = 7_777_001
SHORT_HISTORY = 48  # the trainer's longest history
LONG_HISTORY = 512


def demo_catalog(codebook_sizes=(1024, 4096, 16384)):
    """The demo distribution's catalog for these codebooks (the one ``train_tiny`` samples)."""
    from algorithm.ugt import SyntheticCatalog

    cb = tuple(int(c) for c in codebook_sizes)
    return SyntheticCatalog(codebook_sizes=cb, num_clusters=min(64, cb[0]))


def holdout_cases(
    config: ExportConfig, seed: int = HOLDOUT_SEED
) -> dict[str, dict[str, np.ndarray]]:
    """Named held-out input sets (the four inputs plus ``target``) inside the config's shapes.

    ``config.accuracy_samples`` users in all: one request of the smallest batch, short histories
    (the training lengths) and long ones (up to 512 items or max_seq_length), each padded to
    its set's longest history.
    """
    cfg = config
    catalog = demo_catalog(cfg.codebook_sizes)
    rng = np.random.default_rng(seed)

    def clamp_len(n: int) -> int:
        return min(max(n, cfg.min_seq_length), cfg.max_seq_length)

    short, long = clamp_len(SHORT_HISTORY), clamp_len(LONG_HISTORY)
    n = max(cfg.accuracy_samples, 2)
    return {
        "single_request": catalog.batch(cfg.min_batch_size, 1, short, rng),
        "short_histories": catalog.batch(n // 2, 1, short, rng),
        "long_histories": catalog.batch(n - n // 2, max(1, long // 4), long, rng),
    }


def run_batched(runner, inputs: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
    """``runner.infer`` in chunks of at most ``max_batch`` users, outputs concatenated."""
    n = len(inputs[INPUT_NAMES[0]])
    parts = [
        runner.infer({k: inputs[k][s : s + max_batch] for k in INPUT_NAMES})
        for s in range(0, n, max_batch)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("recommendations", "scores")}


def hit_rate(outputs: dict[str, np.ndarray], target: np.ndarray) -> float:
    """Fraction of users whose true next item (3 codes) is among the K recommendations."""
    recs = outputs["recommendations"]
    return float((recs == target[:, None, :]).all(-1).any(-1).mean())


def reference_runner(onnx_path=None, reference_model=None) -> tuple[Any, dict[str, Any]]:
    """The fp32 reference runner and a description of it for the report."""
    from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
    from algorithm.serving.runtime.torch import TorchRunner

    if reference_model is not None:
        return TorchRunner(reference_model, device="cpu", dtype="fp32"), {"kind": "pytorch-fp32"}
    if onnx_path is None:
        raise ConfigError(
            "reference_model",
            None,
            "a UGTModel, or an ONNX model to use as the fp32 reference",
            hint="Pass reference_model=<UGTModel> (CLI: --checkpoint) or the exported ONNX file.",
        )
    info: dict[str, Any] = {"kind": "onnx-fp32", "runtime": "onnxruntime", "path": str(onnx_path)}
    parity = parity_report_path(onnx_path)
    if parity.is_file():
        try:
            info["export_parity_vs_pytorch"] = json.loads(parity.read_text()).get("worst")
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable %s", parity)
    return OnnxRuntimeRunner(onnx_path), info


def evaluate(
    candidate,
    reference,
    config: ExportConfig,
    precision: str | None = None,
    *,
    what: str = "the artifact",
    reference_info: dict | None = None,
    cases: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` on the held-out cases; ParityError when outside.

    The recall threshold is ``config.min_recall(precision)``. The score error is enforced for
    fp32 artifacts (``parity_max_score_diff``) and reported, not enforced, for reduced
    precisions, whose scores move by design while the ranking must hold.
    """
    cfg = config
    precision = precision or cfg.precision
    cases = cases if cases is not None else holdout_cases(cfg)
    named = {}
    for name, batch in cases.items():
        inputs = {k: batch[k] for k in INPUT_NAMES}
        ref = run_batched(reference, inputs, cfg.max_batch_size)
        cand = run_batched(candidate, inputs, cfg.max_batch_size)
        metrics = compare_outputs(ref, cand)
        metrics["seq_len"] = int(inputs[INPUT_NAMES[0]].shape[1])
        if "target" in batch:
            metrics["reference_hit_rate"] = hit_rate(ref, batch["target"])
            metrics["candidate_hit_rate"] = hit_rate(cand, batch["target"])
        named[name] = metrics
    report = merge_reports(named)
    users = sum(m["users"] for m in named.values())
    hits = [m for m in named.values() if "reference_hit_rate" in m]
    if hits:
        report["worst"]["hit_rate_reference"] = (
            sum(m["reference_hit_rate"] * m["users"] for m in hits) / users
        )
        report["worst"]["hit_rate_candidate"] = (
            sum(m["candidate_hit_rate"] * m["users"] for m in hits) / users
        )
    report.update(
        {
            "precision": precision,
            "reference": reference_info or {},
            "users": users,
            "holdout_seed": HOLDOUT_SEED,
            "distribution": "SyntheticCatalog random walks (the demo distribution), held out",
        }
    )
    max_diff = cfg.parity_max_score_diff if precision == "fp32" else None
    return enforce(report, cfg.min_recall(precision), max_diff, what)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers the CLI shows as a table."""
    w = report.get("worst", {})
    th = report.get("thresholds", {})
    out = {
        "passed": report.get("passed"),
        "precision": report.get("precision"),
        "reference": report.get("reference", {}).get("kind"),
        "users": report.get("users"),
        "recall@K overlap (worst case)": w.get("recall_overlap"),
        "min recall@K overlap allowed": th.get("min_recall_overlap"),
        "top-1 agreement": w.get("top1_agreement"),
        "rank correlation (common items)": w.get("rank_correlation"),
        "max |score diff|": w.get("max_score_diff"),
        "mean |score diff|": w.get("mean_score_diff"),
    }
    if th.get("max_score_diff") is not None:
        out["max |score diff| allowed"] = th["max_score_diff"]
    if "hit_rate_reference" in w:
        out["next-item hit rate@K reference"] = w["hit_rate_reference"]
        out["next-item hit rate@K artifact"] = w["hit_rate_candidate"]
    return out
