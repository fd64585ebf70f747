"""The edges a newcomer hits (issue 16), without a running server: one error path for every
command (one line + a hint, or one JSON object with --json anywhere), validation that refuses
what the server would fail to load, preflight before long work, plain output off a terminal,
full option names in --help, scripts' help, and the API's config mix-ups.

The commands are the ones the issue names; ``trunc.onnx`` is a real ONNX file cut short and
``afile.txt`` a text file. Items needing a server are in test_cli_edges_server.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from algorithm.serving import ModelVersionManager, TritonConfig, generate_triton_config
from algorithm.serving.cli import app
from algorithm.serving.tests.onnx_standin import write_standin_onnx

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CLI = [sys.executable, "-m", "algorithm.serving.cli"]


def run(*args, cwd=None):
    """The CLI in this process (stdout is not a terminal, as in a pipe or CI)."""
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def json_error(result) -> dict:
    """The one JSON object an error prints on stdout, checked for the three fields."""
    assert result.exit_code != 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert {"error", "hint", "type"} <= set(data), data
    assert data["error"] and data["hint"] and "\n" not in data["error"], data
    assert "Traceback" not in result.output
    return data


def one_line_error(result) -> tuple[str, str]:
    """(error line, hint line): exit 1, no traceback, each on one line (not wrapped at 80)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    hints = [x for x in lines if x.startswith("hint: ")]
    assert errors and len(hints) == 1, result.stderr
    assert "<command>" not in hints[0] and "<repository>" not in hints[0], hints[0]
    return errors[0], hints[0]


@pytest.fixture
def files(tmp_path):
    """A truncated ONNX model, a text file, a repository whose model has a config, and a
    checkpoint of an untrained tiny model (loading it is all the preflight tests need)."""
    from algorithm.ugt import UGTConfig, UGTModel

    good = write_standin_onnx(tmp_path / "good.onnx")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "afile.txt"
    text.write_text("hello\n")
    repo = tmp_path / "repo"
    assert run("config", "-r", repo, "--instance-kind", "KIND_CPU").exit_code == 0
    ckpt = tmp_path / "ckpt.safetensors"
    UGTModel(UGTConfig.tiny()).save(ckpt)
    return {"good": good, "trunc": trunc, "text": text, "repo": repo, "ckpt": ckpt, "tmp": tmp_path}


# ------------------------------------------------------------ every command, --json, bad input
def _bad_inputs(f) -> dict[str, list]:
    return {
        "train": ["train", "--preset", "huge", "-o", f["tmp"] / "c.safetensors"],
        "export": ["export", "-c", f["tmp"] / "missing.safetensors", "-o", f["tmp"] / "m.onnx"],
        "optimize": ["optimize", "--onnx", f["trunc"]],
        "config": ["config", "-r", f["text"]],
        "deploy": ["deploy", "-c", f["ckpt"], "-r", f["text"]],
        "validate": ["validate", f["text"]],
        "serve": ["serve", f["text"]],
        "versions list": ["versions", "list", f["repo"], "--model", "../x"],
        "versions deploy": ["versions", "deploy", f["trunc"], f["repo"]],
        "versions rollback": ["versions", "rollback", "7", f["repo"]],
        "versions cleanup": ["versions", "cleanup", f["repo"], "--model", "missing"],
        "benchmark": ["benchmark", "--output", f["text"]],
        "manifests": ["manifests", "--output", f["text"]],
        "demo": ["demo", "--output", f["text"]],
    }


def _commands() -> list[str]:
    group = get_command(app)
    names = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        names += [f"{name} {s}" for s in sub] if sub else [name]
    return names


def test_every_command_gives_a_json_error_for_a_bad_input(files):
    bad = _bad_inputs(files)
    for command in _commands():
        # --json after the command (scripts append it); a command added later without a case
        # here still has to answer an unknown option with a JSON usage error.
        args = bad.get(command, [*command.split(), "--no-such-option"])
        data = json_error(run(*args, "--json"))
        assert not data["hint"].startswith("This is a bug"), (command, data)
        usage = run(*command.split(), "--no-such-option", "--json")
        assert usage.exit_code == 2 and json_error(usage)["type"] == "NoSuchOption", command
    assert set(bad) <= set(_commands())  # the table names real commands


def test_json_is_accepted_anywhere_and_success_is_one_object(files):
    for args in (
        ["--json", "versions", "list", files["repo"]],
        ["versions", "--json", "list", files["repo"]],
        ["versions", "list", files["repo"], "--json"],
    ):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"model": "ugt_recommend", "versions": []}


def test_the_real_entry_point_takes_json_after_the_command(files):
    """`ugt-serving export ... --json`: the issue's exact form, through sys.argv."""
    res = subprocess.run(
        [*CLI, "export", "-c", files["tmp"] / "missing.safetensors", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    data = json.loads(res.stdout)
    assert data["type"] == "InputFileNotFoundError" and "missing.safetensors" in data["error"]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------- item 2: validation before publish
def test_a_truncated_or_foreign_file_is_never_published(files):
    repo = files["repo"]
    for artifact in (files["trunc"], files["text"]):
        error, hint = one_line_error(run("versions", "deploy", artifact, repo))
        assert artifact.name in error and "hint:" in hint
    assert ModelVersionManager(repo).list_versions("ugt_recommend") == []
    other = files["tmp"] / "other"
    error, _ = one_line_error(run("config", "-r", other, "--model-file", files["trunc"]))
    assert "does not parse as an ONNX model" in error
    assert not other.exists()  # refused before anything was written
    ok = run("--json", "versions", "deploy", files["good"], repo)
    assert ok.exit_code == 0 and json.loads(ok.stdout)["version"] == 1


def test_validate_runs_what_loading_runs_and_serve_refuses_before_starting(files):
    repo = files["repo"]
    assert run("versions", "deploy", files["good"], repo).exit_code == 0
    assert run("validate", repo).exit_code == 0
    # A file damaged after publishing (a copy cut short): validate and serve both say so.
    published = repo / "ugt_recommend" / "1" / "model.onnx"
    published.write_bytes(files["trunc"].read_bytes())
    result = run("validate", repo)
    error, hint = one_line_error(result)
    assert "does not parse as an ONNX model" in error and "rollback" in hint
    data = json_error(run("--json", "validate", repo))
    assert data["valid"] is False and data["type"] == "RepositoryError"
    error, hint = one_line_error(run("serve", repo, "--http-port", "0", "--grpc-port", "0"))
    assert "does not parse as an ONNX model" in error
    # serve checks what the server will load: a damaged version no longer served does not
    # block it, while validate still reports it (a rollback would serve it).
    from algorithm.serving import validate_deployment

    assert run("versions", "deploy", files["good"], repo).exit_code == 0
    assert validate_deployment(repo, served_only=True)["valid"]
    assert not validate_deployment(repo)["valid"]


# ------------------------------------------------------------------- item 3: no tracebacks
def test_paths_that_are_files_fail_at_once_with_one_line(files):
    text = files["text"]
    cases = [
        ["optimize", "--onnx", files["trunc"]],
        ["optimize", "--onnx", text],
        ["config", "-r", text],
        ["deploy", "-c", files["ckpt"], "-r", text],
        ["manifests", "--output", text],
        ["benchmark", "--output", text, "--url", "127.0.0.1:9"],
    ]
    for args in cases:
        error, hint = one_line_error(run(*args))
        assert text.name in error or files["trunc"].name in error, (args, error)
    # deploy stopped before exporting: no build folder beside the "repository"
    assert sorted(p.name for p in files["tmp"].iterdir() if p.name.startswith(".")) == []


def test_a_failed_optimize_leaves_no_empty_folders(files):
    out = files["tmp"] / "built" / "deep" / "model.onnx"
    result = run(
        "optimize", "--onnx", files["good"], "-o", out, "--precision", "int8",
        "--calibration-data", files["tmp"] / "missing.npz",
    )  # fmt: skip
    one_line_error(result)
    assert not (files["tmp"] / "built").exists()
    result = run("optimize", "--onnx", files["trunc"])
    one_line_error(result)
    assert sorted(p.name for p in files["tmp"].iterdir() if p.is_dir()) == ["repo"]


# ------------------------------------------------------------------------- item 5: the hints
def test_hints_come_from_the_cause(files):
    error, hint = one_line_error(run("versions", "rollback", "7", files["repo"]))
    assert "no version 7" in error and "versions list" in hint and "Names may use" not in hint
    error, hint = one_line_error(run("serve", files["text"]))
    assert "is a file, not a folder" in error and "not found" not in error
    error, hint = one_line_error(run("config", "--platform", "nope"))
    assert "ugt-serving config --help" in hint
    assert run("versions", "deploy", files["good"], files["repo"]).exit_code == 0
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        error, hint = one_line_error(
            run("serve", files["repo"], "--http-port", port, "--grpc-port", "0")
        )
    assert f"127.0.0.1:{port} is in use" in error and "--http-port" in hint
    assert "failed to load" not in error + hint


# ------------------------------------------------------------------ item 7: off a terminal
def test_plain_output_and_full_option_names_at_80_columns(files):
    assert run("versions", "deploy", files["good"], files["repo"]).exit_code == 0
    listed = run("versions", "list", files["repo"])
    assert listed.exit_code == 0
    assert not set("│┃━─…") & set(listed.stdout), listed.stdout
    assert listed.stdout.splitlines()[1].split() == ["version", "status", "bytes", "modified"]
    assert listed.stdout.splitlines()[2].split()[:2] == ["1", "served"]
    for command in _commands():
        res = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "80"})
        assert res.exit_code == 0 and "…" not in res.stdout
        assert max(len(x) for x in res.stdout.splitlines()) <= 80, command
        if " " not in command:  # every option name of the command appears in full
            params = get_command(app).commands[command].params
            names = {o for p in params for o in p.opts if o.startswith("--")}
            assert all(n in res.stdout for n in names), (command, names)
    assert "--preferred-batch-sizes" in run("deploy", "--help").stdout
    # A long error stays on one line (a terminal wraps it, not us).
    deep = files["text"] / ("x" * 120) / "repo"
    error, _ = one_line_error(run("config", "-r", deep))
    assert str(deep) in error


# ---------------------------------------------------------- item 8: devices of this host
@pytest.mark.skipif(
    __import__("algorithm.serving.triton.validation", fromlist=["x"]).gpu_count() > 0,
    reason="checks the refusal on a host without a GPU",
)
def test_a_gpu_instance_kind_is_refused_on_a_host_without_one(files):
    repo = files["tmp"] / "gpu_repo"
    error, hint = one_line_error(
        run("deploy", "-c", files["ckpt"], "-r", repo, "--instance-kind", "KIND_GPU")
    )
    assert "no CUDA GPU" in error and "--instance-kind KIND_CPU" in hint
    assert not repo.exists()  # refused before the export
    # A repository meant for a GPU host elsewhere validates with --target other, not for here.
    assert run("config", "-r", repo, "--instance-kind", "KIND_GPU").exit_code == 0
    assert run("versions", "deploy", files["good"], repo).exit_code == 0
    assert run("validate", repo, "--target", "other").exit_code == 0
    error, _ = one_line_error(run("validate", repo))
    assert "KIND_GPU" in error


# ------------------------------------------------------------------------- item 9: scripts
def test_script_help_is_the_usage_text():
    export = subprocess.run(
        ["bash", SCRIPTS / "export.sh", "--help"], capture_output=True, text=True, timeout=30
    )
    assert export.returncode == 0 and "set -euo" not in export.stdout
    assert "--skip-trt" in export.stdout and "--start-server" in export.stdout
    bench = subprocess.run(
        ["bash", SCRIPTS / "benchmark.sh", "--help"], capture_output=True, text=True, timeout=30
    )
    assert bench.returncode == 0 and "--output" in bench.stdout and "set -euo" not in bench.stdout
    # The defaults it states are the CLI's.
    defaults = {p.name: p.default for p in get_command(app).commands["benchmark"].params}
    for option in ("requests", "url", "model"):
        assert f"(default {defaults[option]}" in bench.stdout, option
    assert f"(default {defaults['concurrency'][0]})" in bench.stdout


def test_export_sh_without_tensorrt_stops_before_any_work(files):
    """`export.sh` (no --skip-trt) asks for TensorRT: said in seconds, nothing left behind."""
    pytest.importorskip("algorithm.serving.backends")
    from algorithm.serving.backends import get_backend

    if get_backend("tensorrt").is_available():
        pytest.skip("TensorRT is installed here")
    repo = files["tmp"] / "trt_repo"
    env = {
        **os.environ,
        "CHECKPOINT_PATH": str(files["ckpt"]),
        "MODEL_REPOSITORY": str(repo),
        "UGT_SERVING": " ".join(CLI),
    }
    res = subprocess.run(
        ["bash", SCRIPTS / "export.sh"], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 1, res.stderr
    assert "tensorrt is not installed" in res.stderr and "pip install" in res.stderr
    assert "Traceback" not in res.stderr
    assert not repo.exists() and not list(files["tmp"].glob(".trt_repo-build*"))


# ------------------------------------------------------------------- item 10: noise, chance
@pytest.mark.slow
def test_train_warns_when_the_model_is_not_above_chance(tmp_path):
    # The issue's `train --steps 100` ends below chance too; 2 steps reach the same report.
    result = run("train", "--steps", "2", "--batch-size", "8", "-o", tmp_path / "c.safetensors")
    assert result.exit_code == 0, result.output
    warning = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert len(warning) == 1 and "below chance (0.0250)" in warning[0], result.stderr
    assert "warning: held-out recall" in result.stdout  # and in the report itself


@pytest.mark.slow
def test_export_prints_no_third_party_warnings_without_v(files):
    out = files["tmp"] / "m.onnx"
    res = subprocess.run(
        [*CLI, "export", "-c", files["ckpt"], "-o", out, "--max-seq-length", "32", "--no-verify"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    for noise in ("torchvision", "Warning", "W1", "axis name"):
        assert noise not in res.stderr, res.stderr


# ---------------------------------------------------------------------------- item 11: API
def test_generate_triton_config_takes_a_triton_config_second():
    text = generate_triton_config(
        "my_model", TritonConfig(platform="python", instance_kind="KIND_CPU", gpus=())
    )
    assert 'name: "my_model"' in text and 'backend: "python"' in text
    from algorithm.errors import ConfigError
    from algorithm.serving import TritonConfigGenerator

    with pytest.raises(ConfigError, match="ExportConfig") as e:
        TritonConfigGenerator(TritonConfig())
    assert "export config first" in e.value.hint
