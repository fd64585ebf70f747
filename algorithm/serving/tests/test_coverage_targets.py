"""`make test`'s coverage check (.ci/check_coverage.py): the guide's 7.4 targets, per module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / ".ci" / "check_coverage.py"


def _run(tmp_path, figures: dict[str, float]):
    data = {"files": {k: {"summary": {"percent_covered": v}} for k, v in figures.items()}}
    path = tmp_path / "coverage.json"
    path.write_text(json.dumps(data))
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)


def test_a_module_below_its_target_fails_by_name(tmp_path):
    ok = {
        "algorithm/serving/config.py": 97.0,
        "algorithm/serving/export_onnx.py": 90.0,
        "algorithm/serving/optimize_trt.py": 100.0,
        "algorithm/serving/triton_config.py": 95.0,
        "algorithm/serving/benchmark.py": 88.0,
        "algorithm/serving/exporter.py": 93.0,
        "algorithm/serving/pipeline.py": 40.0,  # reported, no target
    }
    run = _run(tmp_path, ok)
    assert run.returncode == 0, run.stdout
    assert "algorithm/serving/pipeline.py" in run.stdout
    run = _run(tmp_path, {**ok, "algorithm/serving/benchmark.py": 84.9})
    assert run.returncode == 1
    assert "algorithm/serving/benchmark.py 84.9% < 85%" in run.stdout
    missing = dict(ok)
    del missing["algorithm/serving/exporter.py"]  # never imported: 0%
    run = _run(tmp_path, missing)
    assert run.returncode == 1 and "exporter.py 0.0% < 90%" in run.stdout
