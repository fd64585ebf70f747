"""TensorRT: profiles, calibration data, trtexec, plan compatibility and error paths.

TensorRT cannot be installed on the development machines: these tests cover everything that
runs without it, and never fake an engine. The ``tensorrt`` tests build real engines where
TensorRT and a GPU exist and skip with the reason elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil

import numpy as np
import pytest

from algorithm.errors import InputFileNotFoundError
from algorithm.serving import (
    ConfigError,
    DependencyError,
    ExportConfig,
    OptimizationError,
    ServingExporter,
    TensorRTOptimizer,
    build_trt_engine,
    create_calibration_data_generator,
)
from algorithm.serving.backends.tensorrt import (
    calibration_cache_path,
    optimization_profiles,
    scoring_layer_names,
)
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.optimize_trt import check_plan_compatible, trtexec_command
from algorithm.serving.runtime.tensorrt import profile_for_shape

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# ------------------------------------------------------------------------------ profiles
def test_one_profile_spans_the_config():
    cfg = ExportConfig(
        min_batch_size=2,
        opt_batch_size=8,
        max_batch_size=16,
        min_seq_length=4,
        opt_seq_length=100,
        max_seq_length=256,
    )
    assert optimization_profiles(cfg) == [{"min": (2, 4), "opt": (8, 100), "max": (16, 256)}]


def test_buckets_make_contiguous_profiles_tuned_at_each_bucket_top():
    cfg = ExportConfig(max_seq_length=1024, seq_length_buckets=(128, 512))
    profiles = optimization_profiles(cfg)
    assert [(p["min"][1], p["opt"][1], p["max"][1]) for p in profiles] == [
        (1, 128, 128),
        (129, 512, 512),
        (513, 1024, 1024),
    ]
    assert all(p["min"][0] == 1 and p["opt"][0] == 32 and p["max"][0] == 64 for p in profiles)
    # Every length in [min, max] has exactly one profile.
    for s in (1, 128, 129, 512, 513, 1024):
        assert sum(p["min"][1] <= s <= p["max"][1] for p in profiles) == 1
    # A last bucket at max_seq_length adds no empty profile.
    assert len(optimization_profiles(cfg.replace(seq_length_buckets=(256, 1024)))) == 2


def test_profile_for_shape_picks_the_covering_profile():
    profiles = optimization_profiles(
        ExportConfig(max_seq_length=1024, seq_length_buckets=(128, 512))
    )
    assert profile_for_shape(profiles, 8, 100) == 0
    assert profile_for_shape(profiles, 64, 129) == 1
    assert profile_for_shape(profiles, 1, 1024) == 2
    with pytest.raises(ConfigError, match="within one engine profile"):
        profile_for_shape(profiles, 65, 10)


# ------------------------------------------------------------------------------ calibration
def test_calibration_generator_yields_fixed_shape_walk_batches():
    gen = create_calibration_data_generator(
        num_samples=70, batch_size=32, seq_length=64, codebook_sizes=(1024, 4096, 16384)
    )
    batches = list(gen())
    assert len(batches) == len(gen) == 3  # ceil(70 / 32), the last one filled
    for b in batches:
        assert set(b) == set(INPUT_NAMES)
        assert all(v.shape == (32, 64) and v.dtype == np.int64 for v in b.values())
        assert b["attention_mask"].sum(1).min() >= 1
        assert b["encoder_l3_ids"].max() < 16384 and b["encoder_l1_ids"].min() >= 0
    # Histories vary in length (walks padded to seq_length), not all full.
    assert len(np.unique(batches[0]["attention_mask"].sum(1))) > 5
    # Deterministic: the guide's call twice gives the same data.
    assert np.array_equal(next(iter(gen))["encoder_l2_ids"], batches[0]["encoder_l2_ids"])


def test_calibration_generator_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        create_calibration_data_generator(batch_size=0)
    with pytest.raises(ConfigError, match="codebook_sizes"):
        create_calibration_data_generator(codebook_sizes=(10, 20))


def test_calibration_cache_is_keyed_by_model_content(onnx_model, tmp_path):
    cfg = ExportConfig(precision="int8")
    a = calibration_cache_path(onnx_model, cfg, tmp_path / "model.plan", "entropy")
    copy = tmp_path / "other.onnx"
    shutil.copyfile(onnx_model, copy)
    assert calibration_cache_path(copy, cfg, tmp_path / "model.plan", "entropy") == a
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert calibration_cache_path(copy, cfg, tmp_path / "model.plan", "entropy") != a
    assert a.parent == tmp_path and a.name.startswith("model.entropy-")


# ------------------------------------------------------------------------------ scoring layers and trtexec
def test_scoring_layers_are_the_logsoftmax_to_scores_path(onnx_model):
    import onnx

    names = scoring_layer_names(onnx_model)
    ops = {n.name: n.op_type for n in onnx.load(onnx_model).graph.node}
    kinds = {ops[n] for n in names}
    assert {"LogSoftmax", "TopK", "Add"} <= kinds
    assert sum(ops[n] == "LogSoftmax" for n in names) == 3
    assert not kinds & {
        "MatMul",
        "Shape",
        "Cast",
        "Softmax",
    }  # heads, indices and attention excluded


def test_trtexec_command_matches_the_config(onnx_model, tmp_path):
    engine = tmp_path / "model.plan"
    cfg = ExportConfig(
        precision="fp16", max_seq_length=1024, seq_length_buckets=(128,), workspace_size_gb=6
    )
    args = shlex.split(trtexec_command(onnx_model, engine, cfg))
    assert (
        args[0] == "trtexec" and f"--onnx={onnx_model}" in args and f"--saveEngine={engine}" in args
    )
    assert args.count("--profile=0") == 1 and args.count("--profile=1") == 1
    mins = [a for a in args if a.startswith("--minShapes=")]
    assert mins[0] == "--minShapes=" + ",".join(f"{n}:1x1" for n in INPUT_NAMES)
    assert [a for a in args if a.startswith("--maxShapes=")][1].endswith("attention_mask:64x1024")
    assert "--fp16" in args and "--int8" not in args and "--memPoolSize=workspace:6G" in args
    assert "--precisionConstraints=obey" in args
    precisions = next(a for a in args if a.startswith("--layerPrecisions="))
    assert "node_log_softmax:fp32" in precisions
    assert f"--timingCacheFile={tmp_path / 'tensorrt.timing.cache'}" in args

    fp32 = shlex.split(
        trtexec_command(onnx_model, engine, cfg.replace(precision="fp32", seq_length_buckets=()))
    )
    assert not {"--fp16", "--int8", "--precisionConstraints=obey"} & set(fp32)
    assert not any(a.startswith("--profile") for a in fp32)
    int8 = shlex.split(trtexec_command(onnx_model, engine, cfg.replace(precision="int8")))
    assert (
        "--int8" in int8
        and "--fp16" in int8
        and any(a.startswith("--calib=") and a.endswith(".calib") for a in int8)
    )


def test_cli_emits_the_trtexec_command(onnx_model, tmp_path):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    result = CliRunner().invoke(
        app,
        [
            "optimize",
            "--onnx",
            onnx_model,
            "--backend",
            "tensorrt",
            "--precision",
            "fp16",
            "--output",
            str(tmp_path / "m.plan"),
            "--emit-trtexec",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("trtexec ") and "--fp16" in result.output
    assert not (tmp_path / "m.plan").exists()


# ------------------------------------------------------------------------------ plan compatibility
def _plan(tmp_path, **meta):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine: only the sidecar is read")
    (tmp_path / "model.plan.json").write_text(json.dumps(meta))
    return plan


def test_plan_from_another_tensorrt_version_is_refused(tmp_path):
    plan = _plan(
        tmp_path, tensorrt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability="9.0"
    )
    with pytest.raises(OptimizationError) as err:
        check_plan_compatible(
            plan,
            {"tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"},
        )
    assert "TensorRT 10.3.0 built it" in str(err.value) and "10.8.0" in str(err.value)
    assert "Rebuild" in err.value.hint


def test_plan_for_another_gpu_is_refused(tmp_path):
    plan = _plan(
        tmp_path, tensorrt_version="10.8.0", gpu_name="NVIDIA A100", compute_capability="8.0"
    )
    with pytest.raises(
        OptimizationError, match=r"A100 \(compute capability 8.0\).*H100 \(compute capability 9.0\)"
    ):
        check_plan_compatible(
            plan,
            {"tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"},
        )


def test_matching_plan_is_accepted_and_unknown_ones_refused(tmp_path):
    env = {"tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    plan = _plan(tmp_path, **env, precision="fp16")
    assert check_plan_compatible(plan, env)["precision"] == "fp16"
    (tmp_path / "model.plan.json").unlink()
    with pytest.raises(OptimizationError, match="cannot tell which GPU"):
        check_plan_compatible(plan, env)
    with pytest.raises(InputFileNotFoundError):
        check_plan_compatible(tmp_path / "missing.plan", env)


# ------------------------------------------------------------------------------ error paths
def test_missing_onnx_is_a_file_not_found_error(tmp_path):
    for call in (
        lambda: TensorRTOptimizer(ExportConfig()).optimize(
            tmp_path / "nope.onnx", tmp_path / "m.plan"
        ),
        lambda: build_trt_engine(tmp_path / "nope.onnx", tmp_path / "m.plan"),
        lambda: ServingExporter().optimize_tensorrt(tmp_path / "nope.onnx", tmp_path / "m.plan"),
    ):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert isinstance(err.value, InputFileNotFoundError) and "nope.onnx" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_percentile_calibration_is_not_a_tensorrt_calibrator(onnx_model, tmp_path):
    cfg = ExportConfig(precision="int8", calibration_method="percentile")
    with pytest.raises(ConfigError, match="entropy, minmax"):
        TensorRTOptimizer(cfg).optimize(onnx_model, tmp_path / "m.plan")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_error_names_the_package_and_extra(onnx_model, tmp_path):
    from algorithm.serving.backends import optimize

    with pytest.raises(DependencyError) as err:
        TensorRTOptimizer(ExportConfig(precision="fp16")).optimize(onnx_model, tmp_path / "m.plan")
    assert err.value.package == "tensorrt" and "ugt-serving[tensorrt]" in err.value.hint
    with pytest.raises(DependencyError):
        optimize(onnx_model, tmp_path / "m.plan", "tensorrt", ExportConfig(precision="fp16"))
    assert not list(tmp_path.iterdir())  # no staging folder, no partial plan


# ------------------------------------------------------------------------------ real engines
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_passes_the_gate_and_records_its_gpu(onnx_model, tmp_path, precision):
    from algorithm.serving.backends import optimize

    cfg = ExportConfig(
        precision=precision,
        max_batch_size=64,
        max_seq_length=1024,
        opt_seq_length=128,
        seq_length_buckets=(128,),
        accuracy_samples=32,
        workspace_size_gb=2,
    )
    plan = optimize(onnx_model, tmp_path / "model.plan", "tensorrt", cfg)
    meta = json.loads((tmp_path / "model.plan.json").read_text())
    assert (
        meta["precision"] == precision and meta["tensorrt_version"] and meta["compute_capability"]
    )
    assert len(meta["profiles"]) == 2
    assert check_plan_compatible(plan)["gpu_name"] == meta["gpu_name"]
    report = json.loads((tmp_path / "model.plan.accuracy.json").read_text())
    assert report["passed"] and report["worst"]["recall_overlap"] >= cfg.min_recall(precision)
    assert (tmp_path / "tensorrt.timing.cache").stat().st_size > 0  # persisted for the next build


@pytest.mark.tensorrt
def test_real_int8_engine_with_calibration_cache(onnx_model, tmp_path):
    from algorithm.serving.backends import optimize

    cfg = ExportConfig(
        precision="int8",
        max_batch_size=32,
        max_seq_length=256,
        opt_seq_length=128,
        accuracy_samples=32,
    )
    gen = create_calibration_data_generator(num_samples=64, batch_size=16, seq_length=128)
    optimize(onnx_model, tmp_path / "model.plan", "tensorrt", cfg, gen)
    assert list(tmp_path.glob("model.entropy-*.calib"))
    assert json.loads((tmp_path / "model.plan.json").read_text())["pinned_fp32_layers"] > 0
