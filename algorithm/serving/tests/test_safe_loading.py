"""Safe loading: checkpoints never unpickle code (weights-only or safetensors) on any path a
user reaches (API, runners, CLI); model names, versions and artifact file names are validated
wherever a path is built from them; the repository is written 0644/0755 whatever the umask.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from algorithm.errors import CheckpointError, ConfigError, RepositoryError
from algorithm.serving import (
    ExportConfig,
    ModelVersionManager,
    TritonConfig,
    TritonConfigGenerator,
    validate_deployment,
)
from algorithm.serving.cli import app

# The CLI as the ugt-serving script runs it (`python -m algorithm.serving.cli` runs cli.py as
# __main__, without the commands of the other cli modules).
CLI = "from algorithm.serving.cli import app; app()"

TRAVERSALS = ["../x", "a/b", "..", "/etc", "1/../../etc", "x\\..\\y", "", "ugt\0"]
PY = TritonConfig(platform="python", instance_kind="KIND_CPU", instance_count=1)


class _Payload:
    """Unpickling this runs code: it creates the marker file named in it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path: Path, model) -> dict[str, Path]:
    """Checkpoints in every pickle flavour, each with a code payload; the marker shows a run."""
    marker = tmp_path / "PWNED"
    state = {
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "x": _Payload(marker),
    }
    files = {}
    files["zip"] = tmp_path / "evil.pt"
    torch.save(state, files["zip"])
    files["legacy"] = tmp_path / "legacy.pt"
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    files["protocol0"] = tmp_path / "raw.pkl"  # starts with neither PK nor \x80
    files["protocol0"].write_bytes(pickle.dumps(state, protocol=0))
    files["disguised"] = tmp_path / "model.safetensors"  # a pickle under a safe name
    files["disguised"].write_bytes(files["zip"].read_bytes())
    return files


def test_pickled_code_is_refused_by_every_loader_without_running(trained, tmp_path):
    from algorithm.serving.runtime import create_runner
    from algorithm.serving.runtime.torch import TorchRunner
    from algorithm.ugt import UGTModel

    model, _, good = trained
    files = _evil_files(tmp_path, model)
    loaders = {
        "UGTModel.load": UGTModel.load,
        "TorchRunner.from_checkpoint": TorchRunner.from_checkpoint,
        "create_runner('torch')": lambda p: create_runner("torch", p),  # what model.py runs
    }
    for kind, path in files.items():
        for name, load in loaders.items():
            with pytest.raises(CheckpointError) as e:
                load(path)
            assert str(path) in str(e.value), (kind, name)
            assert not (tmp_path / "PWNED").exists(), f"{name} ran the payload of a {kind} pickle"
    # The safe formats still load.
    assert isinstance(UGTModel.load(good), UGTModel)
    plain = tmp_path / "plain.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, plain)
    assert isinstance(TorchRunner.from_checkpoint(plain), TorchRunner)


def test_cli_export_and_deploy_of_an_evil_checkpoint_exit_1_without_running_it(trained, tmp_path):
    model, _, _ = trained
    files = _evil_files(tmp_path, model)
    # A real process, as a user runs it: exit code 1, a message naming the file, no payload.
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "export",
            "-c",
            str(files["zip"]),
            "-o",
            str(tmp_path / "out.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "weights-only loading refuses" in res.stderr and "hint:" in res.stderr
    assert "Traceback" not in res.stderr
    for kind, path in files.items():
        for args in (
            ["export", "-c", str(path), "-o", str(tmp_path / "o.onnx")],
            ["deploy", "-c", str(path), "-r", str(tmp_path / "repo")],
        ):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 1, (kind, args, result.output)
            assert "error:" in result.output and str(path.name) in result.output, result.output
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "repo").exists()


@pytest.fixture
def repo(onnx_model, tmp_path):
    repo = tmp_path / "repo"
    TritonConfigGenerator(ExportConfig(model_name="ugt", max_batch_size=8), PY).generate(
        repo, model_file=onnx_model
    )
    return repo


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_names_are_refused_by_every_repository_api(repo, onnx_model, name):
    before = _tree(repo.parent)
    mgr = ModelVersionManager(repo)
    calls = [
        lambda: mgr.deploy_version(name, onnx_model),
        lambda: mgr.list_versions(name),
        lambda: mgr.describe(name),
        lambda: mgr.rollback(name, 1),
        lambda: mgr.cleanup_old_versions(name),
        lambda: mgr.model_dir(name),
    ]
    for call in calls:
        with pytest.raises(RepositoryError, match="model_name"):
            call()
    report = validate_deployment(repo, name)
    assert not report["valid"] and "model_name" in report["errors"][0]
    with pytest.raises(ConfigError, match="model_name"):
        TritonConfigGenerator(ExportConfig(model_name=name), PY)
    with pytest.raises(ConfigError, match="model_name"):
        ExportConfig().replace(model_name=name)
    assert _tree(repo.parent) == before  # nothing was written anywhere


@pytest.mark.parametrize(
    "version", ["1/../../etc", "../1", "-1", 0, -3, "1.5", 2.0, True, "", None]
)
def test_bad_versions_are_refused_before_any_path_is_built(repo, onnx_model, version):
    mgr = ModelVersionManager(repo)
    before = _tree(repo.parent)
    with pytest.raises(RepositoryError, match="not a positive integer"):
        mgr.rollback("ugt", version)
    if version is not None:  # None means "the next version" to deploy_version
        with pytest.raises(RepositoryError, match="not a positive integer"):
            mgr.deploy_version("ugt", onnx_model, version=version)
    assert _tree(repo.parent) == before


def test_server_and_reload_apis_refuse_traversal_names_before_any_request(repo):
    from algorithm.serving import TritonServer
    from algorithm.serving.triton.server import request_model_load

    try:
        server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    except Exception as e:  # no tritonserver binary: the constructor needs one
        pytest.skip(f"no tritonserver: {e}")
    for name in TRAVERSALS:
        for call in (
            server.load_model,
            server.unload_model,
            server.model_config,
            server.model_ready,
            server.statistics,
            server.wait_for_model,
        ):
            with pytest.raises(ConfigError, match="model_name"):
                call(name)
        with pytest.raises(ConfigError, match="model_name"):
            request_model_load("127.0.0.1:9", name)  # refused before connecting anywhere
        with pytest.raises(ConfigError, match="load_models"):
            TritonServer(repo, model_control="explicit", load_models=[name])


@pytest.mark.parametrize("name", ["../x", "a/b", "1/../../etc"])
def test_the_cli_refuses_traversal_names_with_exit_1(repo, onnx_model, trained, name):
    before = _tree(repo.parent)
    commands = [
        ["versions", "deploy", str(onnx_model), str(repo), "--model", name],
        ["versions", "rollback", "1", str(repo), "--model", name],
        ["versions", "cleanup", str(repo), "--model", name],
        ["versions", "list", str(repo), "--model", name],
        ["config", "-r", str(repo), "--model-name", name],
        ["export", "-c", str(trained[2]), "--model-name", name, "-o", str(repo / "o.onnx")],
    ]
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "error:" in result.output and "hint:" in result.output, (args, result.output)
    # A version is an integer option: a path there is a usage error (exit 2), nothing runs.
    result = CliRunner().invoke(app, ["versions", "rollback", name, str(repo), "--model", "ugt"])
    assert result.exit_code == 2
    assert _tree(repo.parent) == before


@pytest.mark.parametrize(
    "platform,field,value",
    [
        ("python", "artifact", "../../outside.onnx"),
        ("python", "artifact", "/etc/passwd"),
        ("onnxruntime_onnx", "default_model_filename", "../model.onnx"),
    ],
)
def test_artifact_names_from_a_config_cannot_leave_the_version_folder(
    tmp_path, onnx_model, platform, field, value
):
    from algorithm.serving.triton.schema import config_to_text, parse_config

    repo = tmp_path / "repo"
    tc = TritonConfig(platform=platform, instance_kind="KIND_CPU", instance_count=1)
    TritonConfigGenerator(ExportConfig(model_name="ugt", max_batch_size=8), tc).generate(
        repo, model_file=onnx_model
    )
    cfg_path = repo / "ugt" / "config.pbtxt"
    cfg = parse_config(cfg_path.read_text())
    if field == "artifact":
        cfg.parameters["artifact"].string_value = value
    else:
        cfg.default_model_filename = value
    cfg_path.write_text(config_to_text(cfg))
    before = _tree(tmp_path)
    with pytest.raises(RepositoryError, match="not a plain file name"):
        ModelVersionManager(repo).deploy_version("ugt", onnx_model)
    assert _tree(tmp_path) == before
    report = validate_deployment(repo, "ugt")
    assert not report["valid"] and any("not a plain file name" in e for e in report["errors"]), (
        report
    )


def test_the_repository_is_written_0644_and_0755_even_with_a_permissive_umask(onnx_model, tmp_path):
    """config, versions (artifact, model.py, sidecar), rollback's .retired and the folders the
    repository needs, checkpoints and JSON reports, written under umask 000 (in a child process:
    the umask is process-wide)."""
    code = textwrap.dedent(f"""
        import os
        os.umask(0)  # the most permissive
        from algorithm.serving import ExportConfig, ModelVersionManager, TritonConfig, TritonConfigGenerator
        from algorithm.serving.export_onnx import write_json
        from algorithm.ugt import UGTConfig, UGTModel
        repo = {str(tmp_path / "deep" / "repo")!r}
        TritonConfigGenerator(ExportConfig(model_name="ugt", max_batch_size=8),
                              TritonConfig(platform="python", instance_kind="KIND_CPU")).generate(
            repo, model_file={str(onnx_model)!r})
        mgr = ModelVersionManager(repo)
        mgr.deploy_version("ugt", {str(onnx_model)!r})
        mgr.rollback("ugt", 1)
        UGTModel(UGTConfig.tiny()).save({str(tmp_path / "m.safetensors")!r})
        write_json({str(tmp_path / "report.json")!r}, {{"ok": 1}})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    written = [p for p in tmp_path.rglob("*") if p.name != "__pycache__"]
    assert any(p.name == "model.py" for p in written) and any(p.name == ".retired" for p in written)
    for p in written:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert not mode & stat.S_IWOTH, f"{p} is world-writable ({oct(mode)})"
        if p.is_file() and (
            p.parent.name.isdigit() or p.suffix in (".pbtxt", ".json", ".safetensors")
        ):
            assert mode == 0o644, f"{p}: {oct(mode)}"
        if p.is_dir() and "repo" in p.parts:
            assert mode == 0o755, f"{p}: {oct(mode)}"
    assert not os.access(tmp_path / "deep" / "repo" / "ugt" / "1" / "model.py", os.X_OK)
