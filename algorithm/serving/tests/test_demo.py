"""The main job end to end (`ugt-serving demo`), shortened: real server, tiny sweep."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from algorithm.serving.cli import app
from algorithm.serving.demo import STAGES, DemoConfig, run_demo


@pytest.fixture
def demo_dir(trained, onnx_model, tmp_path):
    """An output folder that already holds the session's checkpoint and its ONNX export."""

    _, _, ckpt = trained
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy2(ckpt, out / "ugt_tiny.safetensors")
    onnx = Path(onnx_model)
    for f in (onnx, onnx.with_suffix(".parity.json"), Path(f"{onnx}.json")):
        if f.is_file():
            shutil.copy(f, out / f.name.replace(onnx.stem, "model"))  # copies are newer: reused
    return out


@pytest.mark.server
@pytest.mark.timeout(600)
def test_demo_runs_every_stage_and_writes_the_report(demo_dir, tmp_path):
    events = []
    cfg = DemoConfig(
        output=str(demo_dir),
        candidates=(("onnxruntime", "fp32"),),
        concurrency_levels=(1, 3),
        measurement_window_s=0.3,
        max_trials=3,
        num_requests=10,
        num_warmup_requests=5,
        record_dir=str(tmp_path / "record"),
    )
    summary = run_demo(cfg, lambda *e: events.append(e))
    assert [s for s in STAGES if any(e[0] == s for e in events)] == list(STAGES)
    messages = {e[0]: e[3] for e in events}
    assert "reused" in messages["checkpoint"] and "reused" in messages["export"]
    rows = summary["rows"]
    assert [(r["model"], r["concurrency"]) for r in rows] == [
        ("ugt_tiny", 1),
        ("ugt_tiny", 3),
        ("ugt_tiny_torch_eager", 1),
        ("ugt_tiny_torch_eager", 3),
    ]
    for r in rows:
        assert r["ok"] == r["total"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    goals = summary["goals"]
    assert goals["p99_ms_at_lowest_concurrency"] == rows[0]["p99_ms"]
    assert goals["speedup_at_highest_concurrency"] == pytest.approx(
        rows[1]["throughput"] / rows[3]["throughput"]
    )
    chosen = summary["optimization"]["chosen"]
    assert chosen["backend"] == "onnxruntime" and chosen["recall_overlap"] >= 0.99
    served = summary["served"]
    assert served["ugt_tiny"]["python_runtime"] == "onnxruntime"
    assert served["ugt_tiny_torch_eager"]["python_runtime"] == "torch"
    paths = summary["paths"]
    text = (demo_dir / "report.md").read_text()
    assert "ugt_tiny vs ugt_tiny_torch_eager" in text and len(paths["plots"]) == 5
    record = json.loads(Path(paths["record"]).read_text())
    assert (
        set(record["results"]) == {"bs1_seq128_c1", "bs1_seq128_c3"}
        and record["demo"]["goals"] == goals
    )
    assert json.loads((demo_dir / "summary.json").read_text())["rows"] == rows
    assert (demo_dir / "model_repository" / "ugt_tiny_torch_eager" / "config.pbtxt").is_file()


def test_demo_cli_rejects_bad_levels(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path), "--concurrency", "1,x"])
    assert result.exit_code == 1
    assert "concurrency" in result.output and "comma-separated" in result.output
