"""The edges a newcomer hits (issue 16) that need the real tritonserver or a real deployment:
hints from the cause (a batch larger than the served model's, a taken gRPC port), JSON errors of
`benchmark`, a report whose columns agree, and `export.sh` re-runs that publish nothing new.
One server (the trained tiny model on ONNX Runtime) is shared by the module."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from algorithm.errors import ServerError
from algorithm.serving import (
    ExportConfig,
    ModelVersionManager,
    TritonConfig,
    TritonConfigGenerator,
    TritonServer,
)
from algorithm.serving.cli import app

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CLI = [sys.executable, "-m", "algorithm.serving.cli"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def served(onnx_model, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    TritonConfigGenerator(
        ExportConfig(model_name="ugt", max_batch_size=64),
        TritonConfig(platform="python", instance_kind="KIND_CPU", instance_count=1, gpus=()),
    ).generate(repo, model_file=onnx_model)
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        yield server, repo


@pytest.mark.server
def test_a_batch_larger_than_the_served_model_is_named_as_such(served):
    server, _ = served
    result = run("benchmark", "--url", server.grpc_url, "--model", "ugt", "--batch-sizes", "65")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "max_batch_size of ugt on the server" in result.stderr
    assert "--batch-sizes up to 64" in result.stderr
    assert "server is up" not in result.stderr
    data = json.loads(
        run("benchmark", "--url", server.grpc_url, "-m", "ugt", "-b", "65", "--json").stdout
    )
    assert data["type"] == "ConfigError" and "64" in data["error"]


@pytest.mark.server
def test_benchmark_and_serve_errors_are_json_on_stdout(served, tmp_path):
    server, repo = served
    bad = run("benchmark", "--url", server.grpc_url, "--model", "nope", "--warmup", "1", "--json")
    data = json.loads(bad.stdout)
    assert bad.exit_code == 1 and data["type"] == "BenchmarkError" and "nope" in data["error"]
    assert "http://127.0.0.1:8000" in data["hint"] or "<" not in data["hint"]
    text = tmp_path / "afile.txt"
    text.write_text("x")
    data = json.loads(run("serve", text, "--json").stdout)
    assert data["type"] == "RepositoryError" and "is a file" in data["error"]


@pytest.mark.server
def test_a_taken_grpc_port_is_reported_as_a_taken_port(served):
    """The gRPC server says "Socket ... already in use" with "Unavailable" in the line; that is
    a port, not a model that failed to load."""
    _, repo = served
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = TritonServer(repo, http_port=0, grpc_port=port, metrics_port=0)
        with pytest.raises(ServerError) as e:
            server.start()
    assert "already in use" in e.value.log_tail
    assert "port is taken" in e.value.hint and "validate" not in e.value.hint


@pytest.mark.server
def test_the_report_columns_agree(served, tmp_path):
    server, _ = served
    out = tmp_path / "bench"
    result = run(
        "benchmark", "--url", server.grpc_url, "--model", "ugt", "--batch-sizes", "8,16",
        "--seq-lengths", "16", "--concurrency", "1", "--requests", "20", "--window", "0.3",
        "--max-trials", "3", "--warmup", "5", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not set("│┃…") & set(result.stdout), result.stdout  # plain off a terminal
    md = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    # Stability wording matches the rule (windows may go past max_trials to reach --requests).
    assert "windows go on past 3 while fewer than 20 requests are measured" in md
    for r in data["results"].values():
        assert r["stable"] or r["trials"] >= 3
    # The SLO table: numeric order and the concurrency as given.
    slo = md[md.index("## SLO") : md.index("## Where")]
    assert slo.index("batch 8,") < slo.index("batch 16,")
    assert not re.search(r"\| 1\.00 \|", slo)
    # One unit (ms) in the breakdown, a split that is never negative, server CPU measured.
    where = md[md.index("## Where") : md.index("## GPU")]
    assert "All times in ms" in where and " us)" not in where
    header = next(x for x in where.splitlines() if x.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = [
        [c.strip() for c in x.strip("|").split("|")]
        for x in where.splitlines()
        if x.startswith("| ugt")
    ]
    assert len(rows) == 2
    for row in rows:
        cell = dict(zip(cols, row, strict=True))
        assert float(cell["outside Triton"]) >= 0
        assert float(cell["infer"]) < 1000  # ms, not us
        assert cell["server CPU %"] != "-", cell  # the local server, found by its port
    assert json.loads((out / "report.json").read_text())["plots"]


@pytest.mark.slow
def test_export_sh_reruns_publish_nothing_new(trained, tmp_path):
    """`export.sh --skip-trt` twice: one version, the second run says unchanged, no build folder
    left beside the repository, no third-party warnings."""
    _, _, checkpoint = trained
    repo = tmp_path / "model_repository"
    env = {
        **os.environ,
        "CHECKPOINT_PATH": str(checkpoint),
        "MODEL_REPOSITORY": str(repo),
        "MAX_SEQ_LENGTH": "64",
        "PRECISION": "fp32",
        "UGT_SERVING": " ".join(CLI),
    }
    outputs = []
    for _ in range(2):
        res = subprocess.run(
            ["bash", SCRIPTS / "export.sh", "--skip-trt"],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
        outputs.append(res)
    assert "status: published" in outputs[0].stdout
    assert "status: unchanged" in outputs[1].stdout and "Unchanged" in outputs[1].stdout
    assert ModelVersionManager(repo).list_versions("ugt_recommend") == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]
    for noise in ("torchvision", "Warning", "axis name"):
        assert noise not in outputs[0].stderr, outputs[0].stderr
