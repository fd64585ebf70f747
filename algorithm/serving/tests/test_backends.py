"""Optimizer backends with real ONNX Runtime, OpenVINO (+ NNCF) and AOTInductor, behind the gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from algorithm.errors import InputFileNotFoundError
from algorithm.serving import ConfigError, ExportConfig, ParityError, ServingExporter
from algorithm.serving.backends import (
    available_backends,
    calibration_batches,
    get_backend,
    optimize,
)
from algorithm.serving.backends.rewrite import (
    flatten_beam_topk,
    fold_head_bias,
    head_matmuls,
    scoring_path_nodes,
)
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime import create_runner
from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.verify.accuracy import demo_catalog
from algorithm.serving.verify.parity import compare_outputs
from algorithm.ugt import UGTConfig, UGTModel

openvino_only = pytest.mark.skipif(
    not get_backend("openvino").is_available(),
    reason="needs openvino: pip install 'ugt-serving[openvino]'",
)


def config(precision: str, **kw) -> ExportConfig:
    # 32 held-out users keep each gate to a few seconds on 2 cores.
    return ExportConfig(
        precision=precision, max_batch_size=64, max_seq_length=1024, accuracy_samples=32, **kw
    )


def fresh_inputs(seed: int = 5, batch: int = 6, seq: int = 40) -> dict[str, np.ndarray]:
    b = demo_catalog().batch(batch, 1, seq, np.random.default_rng(seed))
    return {k: b[k] for k in INPUT_NAMES}


def published(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------ registry
def test_registry_declares_each_backend():
    assert available_backends() == ["onnxruntime", "openvino", "tensorrt", "torch"]
    expected = {
        "tensorrt": (".plan", "model.plan", "tensorrt_plan", "tensorrt"),
        "onnxruntime": (".onnx", "model.onnx", "onnxruntime_onnx", "onnxruntime"),
        "openvino": (".xml", "model.xml", "openvino", "openvino"),
        "torch": (".pt2", "model.pt2", "python", "torch_aot"),
    }
    for name, (suffix, artifact, platform, runtime) in expected.items():
        b = get_backend(name)
        assert (b.name, b.artifact_suffix, b.artifact_name, b.triton_platform, b.runtime) == (
            name,
            suffix,
            artifact,
            platform,
            runtime,
        )
    assert get_backend("onnxruntime").is_available() and "onnxruntime" in available_backends(
        installed_only=True
    )


def test_unknown_backend_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        get_backend("tflite")
    for name in ("onnxruntime", "openvino", "tensorrt", "torch"):
        assert name in err.value.allowed
    with pytest.raises(ConfigError, match="tflite"):
        ServingExporter().optimize("x.onnx", "y.onnx", backend="tflite")


def test_availability_is_checked_without_importing_the_library():
    code = (
        "import sys, algorithm.serving.backends as b\n"
        "print([b.get_backend(n).is_available() for n in b.available_backends()])\n"
        "print(sorted(m for m in ('openvino', 'onnxruntime', 'nncf', 'tensorrt') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[1] == "[]"


def test_bad_requests_fail_before_any_work(onnx_model, tmp_path):
    with pytest.raises(InputFileNotFoundError):
        optimize(tmp_path / "missing.onnx", tmp_path / "m.onnx", "onnxruntime", config("fp32"))
    with pytest.raises(ConfigError, match="precision"):
        optimize(onnx_model, tmp_path / "m.onnx", "onnxruntime", config("bf16"))
    with pytest.raises(ConfigError, match=r"ending in \.xml"):
        optimize(onnx_model, tmp_path / "m.onnx", "openvino", config("fp32"))
    with pytest.raises(ConfigError, match="reference_model"):
        optimize(onnx_model, tmp_path / "m.pt2", "torch", config("fp32"))
    assert published(tmp_path) == []


# ------------------------------------------------------------------------------ exact rewrite
def test_flattened_beam_topk_is_exact(onnx_model, tmp_path):
    proto = onnx.load(onnx_model)
    assert flatten_beam_topk(proto) == 2  # levels 2 and 3 of the beam search
    # Grouped: no TopK reads more than the 50 * 16384 / 64 group maxima of a history, and no
    # full-size [B, 50, C] beam-score sum is formed.
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.value_info
    }
    topk_rows = [
        int(np.prod(dims[n.input[0]][1:])) for n in proto.graph.node if n.op_type == "TopK"
    ]
    assert max(topk_rows) == 50 * 16384 // 64
    log_probs = {n.output[0] for n in proto.graph.node if n.op_type == "LogSoftmax"}
    assert not [n for n in proto.graph.node if n.op_type == "Add" and log_probs & set(n.input)]
    onnx.checker.check_model(proto)
    rewritten = tmp_path / "flat.onnx"
    onnx.save(proto, rewritten)
    a, b = OnnxRuntimeRunner(onnx_model), OnnxRuntimeRunner(rewritten)
    for seed, (batch, seq) in enumerate([(1, 1), (7, 33), (3, 300)]):
        x = fresh_inputs(seed, batch, seq)
        ra, rb = a.infer(x), b.infer(x)
        assert np.array_equal(ra["recommendations"], rb["recommendations"])
        assert np.array_equal(ra["scores"], rb["scores"])
    assert flatten_beam_topk(proto) == 0  # idempotent: nothing left to match


def test_beam_topk_groups_where_the_code_count_allows_and_is_flat_elsewhere(tmp_path):
    """Level 2 has 24 codes (groups of 8, 3 per beam); level 3 has 100 (no group size divides
    it: one flat TopK). Both stay exact."""
    from algorithm.serving import export_to_onnx

    sizes = (16, 24, 100)
    cfg = UGTConfig(
        codebook_sizes=sizes,
        d_model=16,
        n_heads=2,
        n_encoder_layers=1,
        n_decoder_layers=1,
        d_ff=32,
        max_seq_length=32,
        num_recommendations=8,
    )
    torch.manual_seed(2)
    ec = ExportConfig(
        codebook_sizes=sizes, num_recommendations=8, max_seq_length=32, max_batch_size=4
    )
    path = export_to_onnx(UGTModel(cfg).eval(), tmp_path / "odd.onnx", ec, verify=False)
    proto = onnx.load(path)
    assert flatten_beam_topk(proto) == 2
    names = [n.name for n in proto.graph.node if n.op_type == "TopK"]
    assert sum(n.endswith("/TopK_groups") for n in names) == 1
    assert sum(n.endswith("flat_beam/TopK") for n in names) == 1
    onnx.save(proto, tmp_path / "rewritten.onnx")
    a, b = OnnxRuntimeRunner(path), OnnxRuntimeRunner(tmp_path / "rewritten.onnx")
    rng = np.random.default_rng(4)
    x = {f"encoder_l{i + 1}_ids": rng.integers(0, c, (3, 20)) for i, c in enumerate(sizes)}
    x["attention_mask"] = np.ones((3, 20), np.int64)
    ra, rb = a.infer(x), b.infer(x)
    np.testing.assert_array_equal(ra["recommendations"], rb["recommendations"])
    np.testing.assert_array_equal(ra["scores"], rb["scores"])


def test_folded_head_bias_matches_the_bias_add(onnx_model, tmp_path):
    proto = onnx.load(onnx_model)
    assert fold_head_bias(proto) == 3
    assert fold_head_bias(proto) == 0
    heads = {n.name: n for n in proto.graph.node if n.name in set(head_matmuls(proto))}
    weights = {i.name: i.dims for i in proto.graph.initializer}
    assert sorted(tuple(weights[h.input[1]]) for h in heads.values()) == [
        (65, 1024),
        (65, 4096),
        (65, 16384),
    ]
    onnx.save(proto, tmp_path / "folded.onnx")
    a, b = OnnxRuntimeRunner(onnx_model), OnnxRuntimeRunner(tmp_path / "folded.onnx")
    x = fresh_inputs(3, 8, 64)
    ra, rb = a.infer(x), b.infer(x)
    m = compare_outputs(ra, rb)
    assert m["recall_overlap"] == 1.0 and m["max_score_diff"] < 1e-4


def test_scoring_path_is_logsoftmax_to_scores(onnx_model):
    proto = onnx.load(onnx_model)
    flatten_beam_topk(proto)
    ops = {n.name: n.op_type for n in proto.graph.node}
    path = scoring_path_nodes(proto)
    expected = {"LogSoftmax", "Gather", "TopK", "Unsqueeze", "Add", "Reshape"}
    assert {ops[n] for n in path} == expected | {"ReduceMax", "GatherElements"}  # grouped top-k
    heads = head_matmuls(proto)
    assert len(heads) == 3 and all(ops[h] == "MatMul" for h in heads)


# ------------------------------------------------------------------------------ ONNX Runtime
def test_onnxruntime_fp32_is_optimized_offline_and_gated(onnx_model, tmp_path, trained):
    model, _, _ = trained
    out = optimize(onnx_model, tmp_path, "onnxruntime", config("fp32"), reference_model=model)
    assert out == str(tmp_path / "model.onnx")
    assert published(tmp_path) == ["model.onnx", "model.onnx.accuracy.json", "model.onnx.json"]
    report = json.loads(Path(f"{out}.accuracy.json").read_text())
    assert report["passed"] and report["reference"]["kind"] == "pytorch-fp32"
    assert report["worst"]["recall_overlap"] >= 0.99
    assert report["worst"]["max_common_item_score_diff"] <= 1e-3
    assert report["cases"]["long_histories"]["seq_len"] == 512
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["backend"] == "onnxruntime" and sidecar["flattened_beam_topk"] == 2
    assert sidecar["folded_head_biases"] == 3
    assert sidecar["codebook_sizes"] == [1024, 4096, 16384]  # the ONNX contract travels along
    # Offline fusions are in the file (ONNX Runtime contrib ops), so loading skips that work.
    domains = {n.domain for n in onnx.load(out).graph.node}
    assert "com.microsoft" in domains
    x = fresh_inputs()
    got = create_runner("onnxruntime", out).infer(x)
    assert compare_outputs(TorchRunner(model).infer(x), got)["recall_overlap"] >= 0.99


@pytest.mark.parametrize("method", ["entropy", "minmax"])
def test_onnxruntime_int8_quantizes_only_encoder_decoder_matmuls(onnx_model, tmp_path, method):
    out = optimize(
        onnx_model,
        tmp_path / "model.onnx",
        "onnxruntime",
        config("int8", calibration_method=method),
    )
    report = json.loads(Path(f"{out}.accuracy.json").read_text())
    assert report["passed"] and report["worst"]["recall_overlap"] >= 0.90
    assert report["reference"]["kind"] == "onnx-fp32"
    proto = onnx.load(out)
    producer = {o: n for n in proto.graph.node for o in n.output}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 20
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    quantized = [
        m
        for m in matmuls
        if all(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
            for i in m.input
        )
    ]
    assert len(quantized) >= 20

    # Heads, LogSoftmax, TopK and embeddings see float inputs, never a dequantized tensor.
    def float_input(name: str) -> bool:
        return producer.get(name) is None or producer[name].op_type != "DequantizeLinear"

    heads = set(head_matmuls(proto))
    assert len(heads) == 3
    for n in proto.graph.node:
        if n.name in heads or n.op_type in ("LogSoftmax", "TopK", "Gather"):
            assert all(float_input(i) for i in n.input), n.name
    assert json.loads(Path(f"{out}.json").read_text())["calibration_method"] == method


def test_onnxruntime_int8_from_a_user_calibration_file(onnx_model, tmp_path):
    hist = demo_catalog().batch(40, 1, 96, np.random.default_rng(42))
    npz = tmp_path / "histories.npz"
    np.savez(npz, **{k: hist[k] for k in INPUT_NAMES})
    assert [len(b["attention_mask"]) for b in calibration_batches(npz, config("int8"))] == [
        16,
        16,
        8,
    ]
    out = optimize(
        onnx_model,
        tmp_path / "out",
        "onnxruntime",
        config("int8", calibration_method="percentile"),
        npz,
    )
    assert json.loads(Path(f"{out}.json").read_text())["calibration_batches"] == 3


def test_calibration_data_forms(tmp_path):
    cfg = config("int8", calibration_samples=40)
    default = calibration_batches(None, cfg)
    assert sum(len(b["attention_mask"]) for b in default) >= 40
    one = fresh_inputs()
    assert len(calibration_batches(one, cfg)) == 1
    assert len(calibration_batches(lambda: [one, one], cfg)) == 2
    np.savez(tmp_path / "bad.npz", encoder_l1_ids=one["encoder_l1_ids"])
    with pytest.raises(ConfigError, match="missing"):
        calibration_batches(tmp_path / "bad.npz", cfg)
    with pytest.raises(InputFileNotFoundError):
        calibration_batches(tmp_path / "none.npz", cfg)
    with pytest.raises(ConfigError, match="at least one batch"):
        calibration_batches([], cfg)


def test_onnxruntime_fp16_keeps_the_scoring_path_in_fp32(onnx_model, tmp_path):
    out = optimize(onnx_model, tmp_path / "model.onnx", "onnxruntime", config("fp16"))
    assert json.loads(Path(f"{out}.accuracy.json").read_text())["worst"]["recall_overlap"] >= 0.95
    proto = onnx.load(out)
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in set(inits.values())  # the network itself is fp16
    typed = onnx.shape_inference.infer_shapes(proto)
    dtype = {
        v.name: v.type.tensor_type.elem_type
        for v in list(typed.graph.value_info) + list(typed.graph.output)
    }
    scored = [n for n in proto.graph.node if n.op_type in ("LogSoftmax", "TopK")]
    assert scored and all(
        dtype.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in scored
    )
    assert dtype["scores"] == onnx.TensorProto.FLOAT


def test_fp32_layers_stay_float_in_the_onnx_runtime_fp16_graph(onnx_model, tmp_path):
    """Guide 9.2's "keep named layers in FP32" on ONNX Runtime: the matching nodes are blocked
    from the fp16 conversion (int8 excludes them from quantization the same way); a pattern
    matching nothing fails before anything is written."""
    import fnmatch

    from algorithm.serving.backends.onnxruntime import convert_fp16

    proto = onnx.load(onnx_model)
    keep = fnmatch.filter([n.name for n in proto.graph.node], "node_MatMul_8?")
    assert keep
    converted = convert_fp16(proto, keep)
    inits = {i.name: i.data_type for i in converted.graph.initializer}
    nodes = {n.name: n for n in converted.graph.node}
    for name in keep:  # their weights are still fp32 initializers
        weights = [i for i in nodes[name].input if i in inits]
        assert weights and all(inits[w] == onnx.TensorProto.FLOAT for w in weights)
    others = [n for n in converted.graph.node if n.op_type == "MatMul" and n.name not in keep]
    assert any(inits.get(i) == onnx.TensorProto.FLOAT16 for n in others for i in n.input)
    with pytest.raises(ConfigError) as e:
        cfg = config("fp16").replace(fp32_layers=("nope*",))
        optimize(onnx_model, tmp_path / "model.onnx", "onnxruntime", cfg)
    assert e.value.field == "fp32_layers" and e.value.value == "nope*"
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ the gate refuses
def damage(onnx_model, path: Path, scale: float = 0.5) -> Path:
    """Perturb the encoder's weight matrices: a plausible broken conversion."""
    proto = onnx.load(onnx_model)
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32 and w.shape[0] == 64 and "emb" not in init.name:
            init.CopyFrom(
                numpy_helper.from_array(
                    w + rng.normal(0, scale * w.std(), w.shape).astype(np.float32), init.name
                )
            )
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=openvino_only)])
def test_gate_refuses_a_damaged_artifact_and_leaves_nothing(onnx_model, tmp_path, trained, backend):
    model, _, _ = trained
    bad = damage(onnx_model, tmp_path / "damaged.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / get_backend(backend).artifact_name
    previous.write_text("the artifact already serving")
    with pytest.raises(ParityError) as err:
        optimize(bad, out_dir, backend, config("fp32"), reference_model=model)
    report = err.value.report
    assert report["passed"] is False and report["published"] is False
    assert report["worst"]["recall_overlap"] < 0.99 and "recall@K overlap" in str(err.value)
    # Nothing new left behind (no artifact, sidecar, report or staging folder); the old one intact.
    assert published(out_dir) == [previous.name]
    assert previous.read_text() == "the artifact already serving"


# ------------------------------------------------------------------------------ OpenVINO
@openvino_only
def test_openvino_fp32_ir_with_explicit_f32_inference(onnx_model, tmp_path, trained):
    import openvino as ov

    model, _, _ = trained
    out = optimize(onnx_model, tmp_path, "openvino", config("fp32"), reference_model=model)
    assert published(tmp_path) == [
        "model.bin",
        "model.xml",
        "model.xml.accuracy.json",
        "model.xml.json",
    ]
    report = json.loads(Path(f"{out}.accuracy.json").read_text())
    assert (
        report["passed"]
        and report["worst"]["recall_overlap"] >= 0.99
        and report["worst"]["max_common_item_score_diff"] <= 1e-3
    )
    runner = create_runner("openvino", out)  # Triton's python model passes no precision
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    x = fresh_inputs()
    assert compare_outputs(TorchRunner(model).infer(x), runner.infer(x))["recall_overlap"] >= 0.99


@openvino_only
def test_openvino_int8_through_nncf(onnx_model, tmp_path):
    out = optimize(onnx_model, tmp_path / "model.xml", "openvino", config("int8"))
    report = json.loads(Path(f"{out}.accuracy.json").read_text())
    assert report["passed"] and report["worst"]["recall_overlap"] >= 0.90
    import openvino as ov

    types = [op.get_type_name() for op in ov.Core().read_model(out).get_ordered_ops()]
    assert types.count("FakeQuantize") + types.count("FakeConvert") > 10
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["precision"] == "int8" and sidecar["float_nodes"] > 10


@openvino_only
def test_openvino_bf16_runs_in_bf16_behind_the_gate(onnx_model, tmp_path):
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support")
    out = optimize(onnx_model, tmp_path / "model.xml", "openvino", config("bf16"))
    report = json.loads(Path(f"{out}.accuracy.json").read_text())
    assert report["passed"] and report["worst"]["recall_overlap"] >= 0.95
    assert report["worst"]["max_score_diff"] > 1e-3  # it really ran in bf16
    runner = create_runner("openvino", out, precision="bf16")
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16


# ------------------------------------------------------------------------------ AOTInductor
def test_torch_aot_package_loads_without_the_model_code(tmp_path):
    cfg_model = UGTConfig.tiny(
        codebook_sizes=(64, 128, 256),
        d_model=32,
        n_heads=2,
        d_ff=64,
        num_recommendations=10,
        max_seq_length=64,
    )
    model = UGTModel(cfg_model).eval()
    cfg = ExportConfig(
        precision="fp32",
        codebook_sizes=(64, 128, 256),
        num_recommendations=10,
        max_batch_size=8,
        max_seq_length=64,
        accuracy_samples=8,
    )
    out = optimize(None, tmp_path, "torch", cfg, reference_model=model)
    assert out == str(tmp_path / "model.pt2")
    assert json.loads(Path(f"{out}.accuracy.json").read_text())["worst"]["recall_overlap"] >= 0.99
    assert json.loads(Path(f"{out}.json").read_text())["device"] == "cpu"
    with pytest.raises(ConfigError, match="device"):  # compiled for CPU: not a CUDA artifact
        create_runner("torch_aot", out, device="cuda:0")
    assert (
        next(model.parameters()).dtype.is_floating_point
        and next(model.parameters()).device.type == "cpu"
    )
    # A fresh interpreter with only torch: dynamic shapes, and no algorithm.ugt import.
    code = (
        "import sys, torch\n"
        f"m = torch._inductor.aoti_load_package({out!r})\n"
        "for b, s in ((1, 1), (5, 33), (8, 64)):\n"
        "    x = [torch.randint(0, 64, (b, s)) for _ in range(3)] + [torch.ones(b, s, dtype=torch.int64)]\n"
        "    recs, scores = m(*x)\n"
        "    assert recs.shape == (b, 10, 3) and scores.shape == (b, 10), (recs.shape, scores.shape)\n"
        "print('algorithm.ugt' in sys.modules, 'algorithm' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------ CLI
def test_cli_optimize_reports_the_gate_as_json(onnx_model, tmp_path):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    res = CliRunner().invoke(
        app,
        [
            "--json",
            "optimize",
            "--onnx",
            onnx_model,
            "--output",
            str(tmp_path),
            "--backend",
            "onnxruntime",
            "--precision",
            "fp32",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["artifact"] == str(tmp_path / "model.onnx") and data["passed"] is True
    assert (
        data["recall@K overlap (worst case)"] >= 0.99
        and data["triton_platform"] == "onnxruntime_onnx"
    )
    res = CliRunner().invoke(
        app, ["optimize", "--onnx", onnx_model, "--backend", "tensorrt", "--output", str(tmp_path)]
    )
    if not get_backend("tensorrt").is_available():
        assert res.exit_code == 1 and "ugt-serving[tensorrt]" in res.output
