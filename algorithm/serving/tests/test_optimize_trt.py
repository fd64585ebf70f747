"""TensorRT: profiles, calibration data, trtexec, plan compatibility, the build, error paths.

TensorRT cannot be installed on the development machines. The build logic runs here against
``trt_standin.py`` (guide 7.3's mock import: TensorRT's Python API names and signatures,
recording every call, building no engine): the tests check what the real builder would be asked
for. The accuracy gate never publishes a stand-in plan (it cannot run one). The ``tensorrt``
tests build real engines where TensorRT and a GPU exist and skip with the reason elsewhere.
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
            "--fp32-layers",
            "node_MatMul_8?",
            "--emit-trtexec",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("trtexec ") and "--fp16" in result.output
    assert "node_MatMul_8" in result.output.split("--layerPrecisions=")[1]
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


# ------------------------------------------------------------------------------ the build, on the stand-in
def _pinned(plan: dict) -> set[str]:
    return {n for n, layer in plan["layers"].items() if layer["precision_set"]}


def test_fp16_build_has_one_profile_per_bucket_and_pins_scoring_and_named_layers(
    onnx_model, tmp_path, trt_standin
):
    import fnmatch

    from algorithm.serving.tests.trt_standin import read_plan

    cfg = ExportConfig(
        precision="fp16",
        max_batch_size=64,
        max_seq_length=1024,
        seq_length_buckets=(128, 512),
        workspace_size_gb=2,
        fp32_layers=("node_MatMul_8?",),
    )
    path = TensorRTOptimizer(cfg).optimize(onnx_model, tmp_path / "model.plan")
    plan = read_plan(path)
    # one profile per bucket, the same (batch, seq_len) bounds on the 4 inputs
    assert len(plan["profiles"]) == 3
    for p, want in zip(plan["profiles"], optimization_profiles(cfg), strict=True):
        assert set(p) == set(INPUT_NAMES)
        for name in INPUT_NAMES:
            assert (tuple(p[name]["min"]), tuple(p[name]["opt"]), tuple(p[name]["max"])) == (
                want["min"],
                want["opt"],
                want["max"],
            )
    assert [p["attention_mask"]["max"][1] for p in plan["profiles"]] == [128, 512, 1024]
    assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= set(plan["flags"]) and "INT8" not in plan[
        "flags"
    ]
    assert plan["memory_pools"] == {"WORKSPACE": 2 << 30}
    # fp32: every scoring layer, every TopK, and the layers fp32_layers names; others run fp16
    layers = plan["layers"]
    user = fnmatch.filter(layers, "node_MatMul_8?")
    assert user and all(layers[n]["op"] == "MatMul" for n in user)
    scoring = set(scoring_layer_names(onnx_model))
    topk = {n for n, layer in layers.items() if layer["type"] == "TOPK"}
    assert _pinned(plan) == scoring | topk | set(user)
    for n in _pinned(plan):
        assert layers[n]["precision"] == "FLOAT"
        assert set(layers[n]["output_types"].values()) <= {"FLOAT"}
    others = [n for n, layer in layers.items() if layer["op"] == "MatMul" and n not in user]
    assert others and all(layers[n]["precision"] == "HALF" for n in others)
    # the sidecar says what was built; the timing cache is kept for the next build
    meta = json.loads((tmp_path / "model.plan.json").read_text())
    assert meta["precision"] == "fp16" and meta["tensorrt_version"] == "10.8.0.43"
    assert meta["pinned_fp32_layers"] == len(_pinned(plan)) and meta["fp32_layers"] == [
        "node_MatMul_8?"
    ]
    assert [tuple(p["max"]) for p in meta["profiles"]] == [(64, 128), (64, 512), (64, 1024)]
    assert (tmp_path / "tensorrt.timing.cache").read_bytes().startswith(b"TRT-STANDIN-TIMING")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.plan",
        "model.plan.json",
        "tensorrt.timing.cache",
    ]  # written atomically: no temp files
    calls = [c[:2] for c in trt_standin.CALLS]
    assert calls.index(("OnnxParser", "parse_from_file")) < calls.index(
        ("Builder", "build_serialized_network")
    )


def test_fp32_build_clears_tf32_and_pins_nothing(onnx_model, tmp_path, trt_standin):
    from algorithm.serving.tests.trt_standin import read_plan

    cfg = ExportConfig(precision="fp32", max_batch_size=8, max_seq_length=256, opt_seq_length=64)
    plan = read_plan(build_trt_engine(onnx_model, tmp_path / "m.plan", cfg))
    assert not {"TF32", "FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"} & set(plan["flags"])
    assert not _pinned(plan) and {v["precision"] for v in plan["layers"].values()} == {"FLOAT"}
    assert [(p["encoder_l1_ids"]["opt"]) for p in plan["profiles"]] == [[8, 64]]


@pytest.mark.parametrize(
    "method,algorithm", [("entropy", "ENTROPY_CALIBRATION_2"), ("minmax", "MINMAX_CALIBRATION")]
)
def test_int8_build_calibrates_on_every_batch_then_reuses_the_cache(
    onnx_model, tmp_path, trt_standin, method, algorithm
):
    from algorithm.serving.tests.trt_standin import CALIB_MAGIC, read_plan

    cfg = ExportConfig(
        precision="int8", max_batch_size=32, max_seq_length=256, calibration_method=method
    )
    gen = create_calibration_data_generator(num_samples=64, batch_size=16, seq_length=128)
    path = TensorRTOptimizer(cfg).optimize(onnx_model, tmp_path / "model.plan", gen)
    plan = read_plan(path)
    assert {"INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"} <= set(plan["flags"])
    assert plan["calibration"] == {
        "algorithm": algorithm,
        "from_cache": False,
        "batches": 4,  # 64 samples / 16
        "batch_size": 16,
    }
    batches = [c for c in trt_standin.CALLS if c[1] == "get_batch"]
    assert len(batches) == 5 and batches[0][2][0] == list(INPUT_NAMES)  # 4 batches, then None
    (cache,) = tmp_path.glob(f"model.{method}-*.calib")
    assert cache.read_bytes().startswith(CALIB_MAGIC)
    assert json.loads((tmp_path / "model.plan.json").read_text())["calibration_cache"] == str(cache)
    # A second build of the same model reads the cache and asks for no batch.
    trt_standin.CALLS.clear()
    again = read_plan(TensorRTOptimizer(cfg).optimize(onnx_model, tmp_path / "model.plan", gen))
    assert again["calibration"]["from_cache"] is True
    assert not [c for c in trt_standin.CALLS if c[1] == "get_batch"]


def _onnx_with_custom_op(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y])), str(path))
    return path


def test_parser_failures_are_clear_errors_and_write_nothing(tmp_path, trt_standin):
    bad = tmp_path / "src" / "not_onnx.onnx"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a protobuf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OptimizationError) as err:
        TensorRTOptimizer(ExportConfig(precision="fp16")).optimize(bad, out / "m.plan")
    assert "could not parse" in str(err.value) and "Failed to parse ONNX model" in str(err.value)
    assert "opset 18" in err.value.hint
    custom = _onnx_with_custom_op(tmp_path / "src" / "custom.onnx")
    with pytest.raises(OptimizationError) as err:
        TensorRTOptimizer(ExportConfig(precision="fp16")).optimize(custom, out / "m.plan")
    msg = str(err.value)
    assert "No importer registered for op: FancyOp" in msg and "node 0 'fancy', op FancyOp" in msg
    assert not list(out.iterdir())


def test_failed_build_keeps_the_previous_plan_and_sidecar(
    onnx_model, tmp_path, trt_standin, monkeypatch
):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"the plan that serves today")
    (tmp_path / "model.plan.json").write_text('{"old": true}')

    def out_of_memory(self, network, config):
        self.logger.log(
            trt_standin.ILogger.ERROR, "Requested amount of GPU memory could not be allocated"
        )
        return None

    monkeypatch.setattr(trt_standin.Builder, "build_serialized_network", out_of_memory)
    with pytest.raises(OptimizationError, match="could not be allocated"):
        TensorRTOptimizer(ExportConfig(precision="fp16")).optimize(onnx_model, plan)
    assert plan.read_bytes() == b"the plan that serves today"
    assert json.loads((tmp_path / "model.plan.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan", "model.plan.json"]


def test_fp32_layers_that_match_nothing_fail_before_building(onnx_model, tmp_path, trt_standin):
    cfg = ExportConfig(precision="fp16", fp32_layers=("node_MatMul_8?", "decoder_head_typo"))
    with pytest.raises(ConfigError) as err:
        TensorRTOptimizer(cfg).optimize(onnx_model, tmp_path / "m.plan")
    assert err.value.field == "fp32_layers" and err.value.value == "decoder_head_typo"
    assert "node_" in err.value.allowed  # a few real names to pick from
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="fp32_layers"):
        ExportConfig(fp32_layers=("",))
    assert ExportConfig(fp32_layers="node_MatMul_1").fp32_layers == ("node_MatMul_1",)


def test_trtexec_lists_the_named_layers_too(onnx_model, tmp_path):
    cfg = ExportConfig(precision="fp16", fp32_layers=("node_MatMul_8?",))
    args = shlex.split(trtexec_command(onnx_model, tmp_path / "m.plan", cfg))
    precisions = next(a for a in args if a.startswith("--layerPrecisions="))
    assert "node_MatMul_84:fp32" in precisions or "node_MatMul_86:fp32" in precisions
    assert "node_log_softmax:fp32" in precisions


def test_the_gate_never_publishes_a_plan_it_cannot_run(onnx_model, tmp_path, trt_standin):
    """backends.optimize loads the artifact in its runtime before publishing: the stand-in's
    plan cannot run, so it is refused and nothing is left (no fake TensorRT result)."""
    from algorithm.serving.backends import optimize

    with pytest.raises(OptimizationError, match="does not load in its runtime"):
        optimize(onnx_model, tmp_path / "model.plan", "tensorrt", ExportConfig(precision="fp16"))
    assert not list(tmp_path.glob("model.plan*")) and not list(
        tmp_path.glob(".model.plan.staging-*")
    )


def test_tensorrt_older_than_10_is_refused(monkeypatch, onnx_model, tmp_path):
    import sys

    from algorithm.serving.tests import trt_standin as standin

    monkeypatch.setitem(sys.modules, "tensorrt", standin.make_module("8.6.1"))
    with pytest.raises(DependencyError, match=r"tensorrt>=10 \(found 8.6.1\)"):
        TensorRTOptimizer(ExportConfig(precision="fp16")).optimize(onnx_model, tmp_path / "m.plan")
