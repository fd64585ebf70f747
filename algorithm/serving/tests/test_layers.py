"""The house's layers hold: no import runs up a layer or closes a circle (the import-linter
contract in pyproject.toml), and the guide's public API (section 4.1) imports from
``algorithm.serving`` with the guide's signatures."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("lint-imports (import-linter, a dev extra) is not installed")
    return found


def test_import_contracts_are_kept():
    run = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout
    assert run.stdout.count("KEPT") >= 2


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is not vacuous: a copy of the package where the runtime layer imports the
    CLI (a layer far above it) is reported broken."""
    src = ROOT / "algorithm"
    copy = tmp_path / "algorithm"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("tests", "__pycache__"))
    victim = copy / "serving" / "runtime" / "onnxruntime.py"
    victim.write_text(victim.read_text() + "\nfrom algorithm.serving.cli import app  # noqa\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    run = subprocess.run(
        [_lint_imports()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode != 0
    assert "BROKEN" in run.stdout
    assert "algorithm.serving.runtime.onnxruntime -> algorithm.serving.cli" in run.stdout


GUIDE_41 = (
    "ExportConfig",
    "TritonConfig",
    "BenchmarkConfig",
    "ServingExporter",
    "ONNXExporter",
    "TensorRTOptimizer",
    "TritonConfigGenerator",
    "TritonBenchmark",
    "export_to_onnx",
    "build_trt_engine",
    "generate_triton_config",
    "run_benchmark",
    "create_exporter",
)


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_guide_public_api_imports_with_its_signatures():
    import algorithm.serving as serving

    for name in GUIDE_41:
        assert name in serving.__all__, name
        assert getattr(serving, name) is not None
    ex = serving.ServingExporter
    # guide 4.2: ServingExporter's methods, parameters in the guide's order
    assert _params(ex.export_onnx)[:3] == ["model", "save_path", "config"]
    assert _params(ex.optimize_tensorrt)[:3] == ["onnx_path", "engine_path", "config"]
    assert _params(ex.generate_triton_config)[:2] == ["model_repository", "config"]
    assert _params(ex.benchmark)[:3] == ["triton_url", "model_name", "num_requests"]
    assert _params(ex.deploy_full_pipeline)[:2] == ["model", "model_repository"]
    assert _params(serving.export_to_onnx)[:3] == ["model", "save_path", "config"]
    assert _params(serving.build_trt_engine)[:3] == ["onnx_path", "engine_path", "config"]
    assert _params(serving.TensorRTOptimizer.optimize)[:3] == [
        "onnx_path",
        "engine_path",
        "calibration_data",
    ]
    assert _params(serving.TritonBenchmark.run)[:2] == ["triton_url", "model_name"]


def test_the_model_package_does_not_need_the_serving_package():
    """``algorithm.ugt`` imports (and its I/O names load without torch) in a process that never
    imports ``algorithm.serving``."""
    code = (
        "import sys; import algorithm.ugt.config as c; assert 'torch' not in sys.modules; "
        "from algorithm.ugt import UGTModel; "
        "assert not any(m.startswith('algorithm.serving') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('algorithm.serving')); print(c.INPUT_NAMES)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "encoder_l1_ids" in run.stdout
