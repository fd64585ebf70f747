"""Model repository: atomic versions, rollback, cleanup, name/version safety, validation."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from algorithm.errors import ConfigError, InputFileNotFoundError, RepositoryError
from algorithm.serving import (
    ExportConfig,
    ModelVersionManager,
    TritonConfig,
    TritonConfigGenerator,
    validate_deployment,
)
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.tests.onnx_standin import write_standin_onnx

EC = ExportConfig(model_name="ugt", max_batch_size=16, num_recommendations=50)
SIDECAR = {
    "inputs": [{"name": n, "dtype": "int64"} for n in INPUT_NAMES],
    "outputs": [
        {"name": "recommendations", "dtype": "int64"},
        {"name": "scores", "dtype": "float32"},
    ],
    "num_recommendations": 50,
    "max_batch_size": 64,
}


def _artifact(tmp_path, name: str, tag: bytes) -> str:
    """A stand-in ONNX file (the contract's I/O, no model) with its sidecar; ``tag`` tells
    versions apart."""
    path = tmp_path / "artifacts" / name
    path.parent.mkdir(exist_ok=True)
    write_standin_onnx(path, tag)
    (path.parent / f"{name}.json").write_text(json.dumps(SIDECAR))
    return str(path)


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    TritonConfigGenerator(EC, TritonConfig(platform="python", instance_kind="KIND_CPU")).generate(r)
    return r


def _content(repo, version, where=""):
    """The tag the published stand-in was written with."""
    import onnx

    path = repo / "ugt" / where / str(version) / "model.onnx"
    return onnx.load(str(path)).graph.doc_string.encode("latin-1")


def test_deploy_numbers_versions_and_publishes_complete_folders(repo, tmp_path):
    mgr = ModelVersionManager(repo)
    assert mgr.list_versions("ugt") == []
    assert [
        mgr.deploy_version("ugt", _artifact(tmp_path, f"a{i}.onnx", b"%d" % i)) for i in range(3)
    ] == [1, 2, 3]
    assert mgr.list_versions("ugt") == [1, 2, 3]
    assert sorted(p.name for p in (repo / "ugt" / "3").iterdir()) == [
        "model.onnx",
        "model.py",
        "ugt_model.json",
    ]
    assert json.loads((repo / "ugt" / "ugt_model.json").read_text()) == SIDECAR
    assert mgr.served_versions("ugt") == [3] and mgr.default_version("ugt") == 3
    assert not list((repo / "ugt").glob(".staging-*"))
    with pytest.raises(RepositoryError, match="already exists"):
        mgr.deploy_version("ugt", _artifact(tmp_path, "b.onnx", b"x"), version=2)
    new = _artifact(tmp_path, "b.onnx", b"new")
    assert mgr.deploy_version("ugt", new, version=2, replace=True) == 2
    assert _content(repo, 2) == b"new"


def test_a_failed_publish_leaves_nothing_behind(repo, tmp_path):
    xml = tmp_path / "ov.xml"
    xml.write_text("<net/>")  # weights (.bin) missing
    TritonConfigGenerator(
        EC.replace(model_name="ov"), TritonConfig(platform="openvino", instance_kind="KIND_CPU")
    ).generate(repo)
    with pytest.raises(InputFileNotFoundError, match="weights"):
        ModelVersionManager(repo).deploy_version("ov", xml)
    assert sorted(p.name for p in (repo / "ov").iterdir()) == ["config.pbtxt"]


def test_readers_never_see_a_half_written_version(repo, tmp_path):
    """A thread polling like Triton sees each version folder either absent or complete."""
    mgr = ModelVersionManager(repo)
    big = tmp_path / "big.onnx"
    write_standin_onnx(big, b"w", size=4 << 20)
    seen_incomplete, done = [], threading.Event()

    def poll():
        while not done.is_set():
            for v in (repo / "ugt").iterdir():
                if v.name.isdigit():
                    files = {p.name: p.stat().st_size for p in v.iterdir()} if v.exists() else None
                    if files is not None and files.get("model.onnx") != big.stat().st_size:
                        seen_incomplete.append((v.name, files))

    t = threading.Thread(target=poll)
    t.start()
    try:
        for _ in range(5):
            mgr.deploy_version("ugt", big)
    finally:
        done.set()
        t.join()
    assert mgr.list_versions("ugt") == [1, 2, 3, 4, 5]
    assert seen_incomplete == []


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 200, "name with space"])
def test_unsafe_model_names_are_refused_everywhere(repo, tmp_path, name):
    mgr = ModelVersionManager(repo)
    art = _artifact(tmp_path, "a.onnx", b"1")
    for call in (
        lambda: mgr.deploy_version(name, art),
        lambda: mgr.rollback(name, 1),
        lambda: mgr.cleanup_old_versions(name),
        lambda: mgr.list_versions(name),
    ):
        with pytest.raises(RepositoryError):
            call()
    result = validate_deployment(repo, name)
    assert not result["valid"] and result["errors"]


@pytest.mark.parametrize("version", [0, -1, True, 1.5, "../1", "x"])
def test_versions_must_be_positive_integers(repo, tmp_path, version):
    mgr = ModelVersionManager(repo)
    with pytest.raises(RepositoryError, match="positive integer"):
        mgr.deploy_version("ugt", _artifact(tmp_path, "a.onnx", b"1"), version=version)
    with pytest.raises(RepositoryError, match="positive integer"):
        mgr.rollback("ugt", version)
    assert not [p for p in (repo / "ugt").iterdir() if p.is_dir()]


def test_rollback_serves_the_old_version_and_can_roll_forward(repo, tmp_path):
    mgr = ModelVersionManager(repo)
    for i in range(1, 4):
        mgr.deploy_version("ugt", _artifact(tmp_path, f"a{i}.onnx", b"v%d" % i))
    result = mgr.rollback("ugt", 1)
    assert result == {"served": 1, "retired": [2, 3], "restored": False}
    assert mgr.list_versions("ugt") == [1] and mgr.retired_versions("ugt") == [2, 3]
    assert _content(repo, 3, ".retired") == b"v3"  # kept, out of Triton's sight
    # A new deployment never reuses a retired number.
    assert mgr.deploy_version("ugt", _artifact(tmp_path, "a4.onnx", b"v4")) == 4
    result = mgr.rollback("ugt", 3)  # roll forward to a retired version
    assert result == {"served": 3, "retired": [4], "restored": True}
    assert mgr.list_versions("ugt") == [1, 3] and _content(repo, 3) == b"v3"
    statuses = {r["version"]: r["status"] for r in mgr.describe("ugt")}
    assert statuses == {1: "available", 2: "retired", 3: "served", 4: "retired"}
    with pytest.raises(RepositoryError, match="no version 9"):
        mgr.rollback("ugt", 9)
    assert validate_deployment(repo, "ugt")["valid"]


def test_cleanup_keeps_the_newest_and_never_the_served_version(repo, tmp_path):
    mgr = ModelVersionManager(repo)
    for i in range(1, 6):
        mgr.deploy_version("ugt", _artifact(tmp_path, f"a{i}.onnx", b"v%d" % i))
    assert mgr.cleanup_old_versions("ugt", keep=2) == [1, 2, 3]
    assert mgr.list_versions("ugt") == [4, 5]
    mgr.rollback("ugt", 4)
    assert mgr.cleanup_old_versions("ugt", keep=1) == [5]  # the retired one goes
    assert mgr.list_versions("ugt") == [4] and mgr.retired_versions("ugt") == []
    assert mgr.cleanup_old_versions("ugt", keep=1) == []
    assert not [p for p in (repo / "ugt").iterdir() if p.name.startswith(".trash")]
    with pytest.raises(ConfigError):
        mgr.cleanup_old_versions("ugt", keep=0)


def test_served_versions_follow_the_version_policy(tmp_path):
    repo = tmp_path / "repo"
    TritonConfigGenerator(
        EC, TritonConfig(platform="python", instance_kind="KIND_CPU", version_policy="all")
    ).generate(repo)
    mgr = ModelVersionManager(repo)
    for i in range(1, 4):
        mgr.deploy_version("ugt", _artifact(tmp_path, f"a{i}.onnx", b"v%d" % i))
    assert mgr.served_versions("ugt") == [1, 2, 3] and mgr.default_version("ugt") == 3
    assert mgr.cleanup_old_versions("ugt", keep=1) == [1, 2]


def test_deploy_needs_a_config_first(tmp_path):
    with pytest.raises(RepositoryError, match="config.pbtxt") as e:
        ModelVersionManager(tmp_path).deploy_version("ugt", _artifact(tmp_path, "a.onnx", b"1"))
    assert "ugt-serving config" in e.value.hint


# ---------------------------------------------------------------------------- validation
@pytest.fixture
def valid_repo(repo, tmp_path):
    ModelVersionManager(repo).deploy_version("ugt", _artifact(tmp_path, "a.onnx", b"1"))
    ModelVersionManager(repo).deploy_version("ugt", _artifact(tmp_path, "b.onnx", b"2"))
    return repo


def test_a_generated_repository_is_valid(valid_repo):
    result = validate_deployment(valid_repo, "ugt")
    assert result["valid"], result["errors"]
    info = result["info"]
    assert info["versions"] == [1, 2] and info["served_versions"] == [2]
    assert info["platform"] == "python" and info["python_runtime"] == "onnxruntime"
    assert info["inputs"] == list(INPUT_NAMES) and info["warnings"] == []
    whole = validate_deployment(valid_repo)
    assert whole["valid"] and whole["info"]["versions"] == {"ugt": [1, 2]}


def _break(repo, how):
    model = repo / "ugt"
    if how == "no_config":
        (model / "config.pbtxt").unlink()
    elif how == "bad_config":
        (model / "config.pbtxt").write_text(
            (model / "config.pbtxt").read_text() + "\nbogus_field: 3\n"
        )
    elif how == "empty_artifact":
        (model / "2" / "model.onnx").write_bytes(b"")
    elif how == "missing_artifact":
        (model / "2" / "model.onnx").unlink()
    elif how == "not_onnx":
        (model / "2" / "model.onnx").write_bytes(b"<html>")
    elif how == "non_numeric_version":
        (model / "latest").mkdir()
    elif how == "no_versions":
        shutil.rmtree(model / "1")
        shutil.rmtree(model / "2")
    elif how == "name_mismatch":
        sidecar = dict(
            SIDECAR,
            outputs=[{"name": "items", "dtype": "int64"}, {"name": "scores", "dtype": "float32"}],
        )
        (model / "2" / "ugt_model.json").write_text(json.dumps(sidecar))
    elif how == "k_mismatch":
        (model / "2" / "ugt_model.json").write_text(
            json.dumps(dict(SIDECAR, num_recommendations=10))
        )
    elif how == "platform_mismatch":
        cfg = (
            (model / "config.pbtxt")
            .read_text()
            .replace('backend: "python"', 'platform: "tensorrt_plan"')
        )
        (model / "config.pbtxt").write_text(cfg)


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("no_config", "config.pbtxt missing"),
        ("bad_config", "does not parse"),
        ("empty_artifact", "is empty"),
        ("missing_artifact", "model.onnx missing"),
        ("not_onnx", "does not parse as an ONNX model"),
        ("non_numeric_version", "'latest' is not a version"),
        ("no_versions", "no version folders"),
        ("name_mismatch", "output names"),
        ("k_mismatch", "K=10"),
        ("platform_mismatch", "expects model.plan"),
    ],
)
def test_validation_names_what_is_wrong(valid_repo, how, expected):
    _break(valid_repo, how)
    result = validate_deployment(valid_repo, "ugt")
    assert not result["valid"]
    assert any(expected in e for e in result["errors"]), result["errors"]


def test_validation_of_missing_things(tmp_path, valid_repo):
    assert not validate_deployment(tmp_path / "nope")["valid"]
    result = validate_deployment(valid_repo, "other")
    assert not result["valid"] and "present: ['ugt']" in result["errors"][0]
    (valid_repo / "ugt" / "ugt_model.json").unlink()
    for v in ("1", "2"):
        (valid_repo / "ugt" / v / "ugt_model.json").unlink()
    result = validate_deployment(valid_repo, "ugt")
    assert result["valid"] and len(result["info"]["warnings"]) == 2


# ----------------------------------------------------------------------------------- the CLI
def _cli(*args):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    return CliRunner().invoke(app, ["--json", *map(str, args)])


def test_cli_config_prints_or_writes_a_schema_valid_config(tmp_path):
    from algorithm.serving.triton.schema import parse_config

    printed = _cli(
        "config",
        "--platform",
        "onnxruntime_onnx",
        "--instance-kind",
        "KIND_GPU",
        "--gpus",
        "0,1",
        "--trt-precision",
        "fp16",
        "--model-name",
        "rec",
    )
    assert printed.exit_code == 0, printed.output
    cfg = parse_config(json.loads(printed.stdout)["config"])
    assert cfg.name == "rec" and list(cfg.instance_group[0].gpus) == [0, 1]
    written = _cli(
        "config",
        "-r",
        tmp_path,
        "--platform",
        "python",
        "--instance-kind",
        "KIND_CPU",
        "--preferred-batch-sizes",
        "2,4",
        "--max-batch-size",
        "4",
    )
    assert written.exit_code == 0, written.output
    cfg = parse_config((tmp_path / "ugt_recommend" / "config.pbtxt").read_text())
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4] and cfg.backend == "python"
    bad = _cli("config", "--platform", "openvino", "--instance-kind", "KIND_GPU")
    assert bad.exit_code == 1 and "CPU instances only" in bad.output
    bad = _cli("config", "--preferred-batch-sizes", "8,x")
    assert bad.exit_code == 1 and "comma-separated integers" in bad.output
    gpu = _cli(
        "config",
        *("--python-runtime", "torch", "--instance-kind", "KIND_GPU", "--length-mix", "120,0.5"),
        *("--pipeline-depth", "2", "--continuous-batching"),
    )
    assert gpu.exit_code == 0, gpu.output
    params = parse_config(json.loads(gpu.stdout)["config"]).parameters
    assert json.loads(params["warmup"].string_value)[-1]["lognormal"] == [120.0, 0.5, 1024]
    assert params["pipeline_depth"].string_value == "2"
    assert params["continuous_batching"].string_value == "true"
    bad = _cli("config", "--python-runtime", "torch", "--continuous-batching")
    assert bad.exit_code == 1 and "set pipeline_depth=1" in bad.output
    bad = _cli("config", "--pipeline-depth", "2")  # the onnxruntime runner cannot queue a batch
    assert bad.exit_code == 1 and "python_runtime='torch'" in bad.output
    bad = _cli("config", "--length-mix", "200")
    assert bad.exit_code == 1 and "median,sigma" in bad.output


def test_cli_validate_and_versions(valid_repo, tmp_path):
    ok = _cli("validate", valid_repo, "--model", "ugt")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["valid"]
    listed = _cli("versions", "list", valid_repo, "-m", "ugt")
    assert [(r["version"], r["status"]) for r in json.loads(listed.stdout)["versions"]] == [
        (1, "available"),
        (2, "served"),
    ]
    published = _cli(
        "versions", "deploy", _artifact(tmp_path, "c.onnx", b"3"), valid_repo, "-m", "ugt"
    )
    assert published.exit_code == 0 and json.loads(published.stdout)["version"] == 3
    rolled = _cli("versions", "rollback", "1", valid_repo, "-m", "ugt")
    assert rolled.exit_code == 0 and json.loads(rolled.stdout)["served"] == 1
    cleaned = _cli("versions", "cleanup", valid_repo, "-m", "ugt", "--keep", "1")
    assert json.loads(cleaned.stdout)["removed"] == [2, 3]
    assert ModelVersionManager(valid_repo).list_versions("ugt") == [1]
    missing = _cli("versions", "rollback", "7", valid_repo, "-m", "ugt")
    assert missing.exit_code == 1 and "no version 7" in missing.output
    unreachable = _cli("versions", "rollback", "1", valid_repo, "-m", "ugt", "--url", "127.0.0.1:9")
    assert unreachable.exit_code == 1 and "no Triton server answers" in unreachable.output
    (valid_repo / "ugt" / "1" / "model.onnx").write_bytes(b"")
    bad = _cli("validate", valid_repo)
    assert bad.exit_code == 1 and "is empty" in bad.output
