"""The accuracy gate: held-out inputs of the demo distribution, ranking metrics, thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from algorithm.serving import ConfigError, ExportConfig, ParityError
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.verify.accuracy import (
    HOLDOUT_SEED,
    demo_catalog,
    evaluate,
    hit_rate,
    holdout_cases,
    reference_runner,
    run_batched,
    summarize,
)


class Perturbed:
    """A candidate that returns the reference's answer with its lower half of the list replaced."""

    def __init__(self, runner, replace: int = 0, score_noise: float = 0.0):
        self.runner, self.replace, self.noise = runner, replace, score_noise

    def infer(self, inputs):
        out = {k: v.copy() for k, v in self.runner.infer(inputs).items()}
        if self.replace:
            # Codes far outside any catalog id: never equal to a reference item.
            out["recommendations"][:, -self.replace :, 2] = 16383 - np.arange(self.replace)
        out["scores"] = out["scores"] + self.noise
        return out


def test_holdout_cases_are_catalog_walks_within_the_config_shapes():
    cfg = ExportConfig(max_batch_size=8, max_seq_length=300, min_batch_size=2, accuracy_samples=10)
    cases = holdout_cases(cfg)
    assert set(cases) == {"single_request", "short_histories", "long_histories"}
    assert len(cases["single_request"]["attention_mask"]) == 2  # the smallest batch allowed
    assert sum(len(c["target"]) for name, c in cases.items() if name != "single_request") == 10
    catalog = demo_catalog(cfg.codebook_sizes)
    items = {tuple(x) for x in catalog.ids}
    for case in cases.values():
        assert case["attention_mask"].shape[1] <= 300
        assert case["attention_mask"].sum(1).min() >= 1
        ids = np.stack([case[f"encoder_l{i}_ids"] for i in (1, 2, 3)], -1)
        real = ids[case["attention_mask"] > 0]
        # Every history item is a catalog item (uniform noise would almost never be).
        assert all(tuple(x) in items for x in real)
        assert all(tuple(t) in items for t in case["target"])
    # Deterministic, and held out from other seeds.
    again = holdout_cases(cfg)
    assert all(
        np.array_equal(again[k]["encoder_l1_ids"], cases[k]["encoder_l1_ids"]) for k in cases
    )
    other = holdout_cases(cfg, seed=HOLDOUT_SEED + 1)
    assert not np.array_equal(
        other["long_histories"]["encoder_l1_ids"], cases["long_histories"]["encoder_l1_ids"]
    )


def test_walks_follow_the_catalog_successors():
    cfg = ExportConfig(accuracy_samples=64)
    catalog = demo_catalog(cfg.codebook_sizes)
    index = {tuple(x): i for i, x in enumerate(catalog.ids)}
    case = holdout_cases(cfg)["long_histories"]
    ids = np.stack([case[f"encoder_l{i}_ids"] for i in (1, 2, 3)], -1)
    follows = total = 0
    for row, mask in zip(ids, case["attention_mask"], strict=True):
        seq = [index[tuple(x)] for x in row[mask > 0]]
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            total += 1
            follows += b in catalog.successor_table[a]
    # 90% of steps follow a successor (10% random jumps): structure a ranking can be tested on.
    assert follows / total > 0.8


def test_hit_rate_counts_the_true_next_item_in_the_list():
    recs = np.zeros((2, 3, 3), dtype=np.int64)
    recs[0, 1] = (1, 2, 3)
    assert hit_rate({"recommendations": recs}, np.array([[1, 2, 3], [1, 2, 3]])) == 0.5


def test_run_batched_splits_by_max_batch(trained):
    model, _, _ = trained
    calls = []

    class Counting:
        def infer(self, inputs):
            calls.append(len(inputs["attention_mask"]))
            return TorchRunner(model).infer(inputs)

    x = holdout_cases(ExportConfig(accuracy_samples=10))["short_histories"]
    out = run_batched(Counting(), {k: x[k] for k in INPUT_NAMES}, max_batch=2)
    assert calls == [2, 2, 1]
    assert out["recommendations"].shape == (5, 50, 3)


def test_identical_runtime_passes_with_full_numbers(trained):
    model, _, _ = trained
    ref = TorchRunner(model)
    cfg = ExportConfig(precision="fp32", accuracy_samples=8, max_seq_length=128)
    report = evaluate(ref, ref, cfg, reference_info={"kind": "pytorch-fp32"})
    assert report["passed"] is True
    w = report["worst"]
    assert w["recall_overlap"] == 1.0 and w["top1_agreement"] == 1.0 and w["max_score_diff"] == 0.0
    assert w["hit_rate_reference"] == w["hit_rate_candidate"] > 0.05  # trained: well above chance
    assert report["thresholds"] == {"min_recall_overlap": 0.99, "max_score_diff": 1e-3}
    table = summarize(report)
    assert table["passed"] is True and table["reference"] == "pytorch-fp32"


def test_lost_items_are_refused_with_the_numbers(trained):
    model, _, _ = trained
    ref = TorchRunner(model)
    cfg = ExportConfig(precision="int8", accuracy_samples=8, max_seq_length=128)
    # 10 of 50 items replaced: overlap 0.8 < 0.90 allowed for int8.
    with pytest.raises(ParityError) as err:
        evaluate(Perturbed(ref, replace=10), ref, cfg, what="the test artifact")
    assert "0.8000 < allowed 0.9000" in str(err.value)
    assert err.value.report["passed"] is False
    assert err.value.report["worst"]["recall_overlap"] == pytest.approx(0.8)
    # 3 of 50 (overlap 0.94) passes int8 but not fp16 (0.95).
    assert evaluate(Perturbed(ref, replace=3), ref, cfg)["passed"]
    with pytest.raises(ParityError):
        evaluate(Perturbed(ref, replace=3), ref, cfg.replace(precision="fp16"))


def test_score_error_is_enforced_for_fp32_only(trained):
    model, _, _ = trained
    ref = TorchRunner(model)
    cfg = ExportConfig(accuracy_samples=4, max_seq_length=64)
    shifted = Perturbed(ref, score_noise=0.01)
    with pytest.raises(ParityError, match="score diff"):
        evaluate(shifted, ref, cfg.replace(precision="fp32"))
    report = evaluate(shifted, ref, cfg.replace(precision="fp16"))
    assert report["worst"]["max_score_diff"] == pytest.approx(0.01, rel=1e-3)
    assert report["thresholds"]["max_score_diff"] is None


def test_reference_runner_choices(trained, onnx_model):
    model, _, _ = trained
    runner, info = reference_runner(onnx_model, model)
    assert isinstance(runner, TorchRunner) and info == {"kind": "pytorch-fp32"}
    runner, info = reference_runner(onnx_model)
    assert isinstance(runner, OnnxRuntimeRunner) and info["kind"] == "onnx-fp32"
    # The ONNX stand-in carries its own parity against PyTorch from the export.
    assert info["export_parity_vs_pytorch"]["recall_overlap"] >= 0.99
    with pytest.raises(ConfigError, match="reference_model"):
        reference_runner(None, None)
