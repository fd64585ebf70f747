#!/usr/bin/env python3
"""Fail when a stage module is below its coverage target (the module guide's section 7.4).

`make test` runs the whole suite under pytest-cov (``[tool.coverage.run]`` in pyproject.toml
traces the top-level modules of algorithm/serving) and writes .coverage.json; this prints every
measured module with its figure and exits 1 naming each module under its target. A target
module that was never imported counts as 0%.

    python .ci/check_coverage.py .coverage.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# guide 7.4: module -> minimum line coverage (%)
TARGETS = {
    "algorithm/serving/config.py": 95.0,
    "algorithm/serving/export_onnx.py": 85.0,
    "algorithm/serving/optimize_trt.py": 80.0,
    "algorithm/serving/triton_config.py": 90.0,
    "algorithm/serving/benchmark.py": 85.0,
    "algorithm/serving/exporter.py": 90.0,
}


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else ".coverage.json")
    if not path.is_file():
        print(f"coverage data not found: {path} (run pytest with --cov-report=json:{path})")
        return 2
    files = json.loads(path.read_text())["files"]
    figures = {name: data["summary"]["percent_covered"] for name, data in files.items()}
    below = []
    print(f"{'module':<45} {'covered':>8} {'target':>7}")
    for name in sorted(set(figures) | set(TARGETS)):
        got, want = figures.get(name, 0.0), TARGETS.get(name)
        mark = ""
        if want is not None and got < want:
            below.append(f"{name} {got:.1f}% < {want:.0f}%")
            mark = "  BELOW TARGET"
        target = f"{want:.0f}%" if want is not None else "-"
        print(f"{name:<45} {got:>7.1f}% {target:>7}{mark}")
    if below:
        print("coverage below the guide's 7.4 targets: " + "; ".join(below))
        return 1
    print("every module meets its coverage target (guide 7.4)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
