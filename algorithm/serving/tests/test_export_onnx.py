"""ONNX export: graph rules, dynamic shapes, parity with PyTorch, configs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from algorithm.serving import (
    ConfigError,
    ExportConfig,
    ModelWrapper,
    ONNXExporter,
    ParityError,
    ServingExporter,
    create_exporter,
    export_to_onnx,
)
from algorithm.serving.contract import read_sidecar
from algorithm.serving.export_onnx import check_graph
from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.ugt import UGTConfig, UGTModel, random_inputs


def test_graph_rules(onnx_model):
    proto = onnx.load(onnx_model)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Loop", "If", "Scan"}
    assert "TopK" in ops
    info = check_graph(proto)
    assert info["opset"] == 18
    dims = [
        [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    ]
    assert all(d == ["batch", "seq_len"] for d in dims)
    out = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in proto.graph.output
    }
    assert out["recommendations"][0] == "batch" and out["recommendations"][1:] == [50, 3]
    assert out["scores"][0] == "batch" and out["scores"][1:] == [50]


def test_parity_report_written(onnx_model):
    report = json.loads(Path(onnx_model).with_suffix(".parity.json").read_text())
    assert report["passed"]
    assert set(report["cases"]) == {"batch1_seq1", "batch64", "seq1024", "ragged"}
    assert report["worst"]["recall_overlap"] >= 0.99
    assert report["worst"]["max_common_item_score_diff"] <= 1e-3


def test_sidecar(onnx_model):
    meta = read_sidecar(onnx_model)
    assert [i["name"] for i in meta["inputs"]] == [
        "encoder_l1_ids",
        "encoder_l2_ids",
        "encoder_l3_ids",
        "attention_mask",
    ]
    assert [o["name"] for o in meta["outputs"]] == ["recommendations", "scores"]
    assert meta["num_recommendations"] == 50 and meta["codebook_sizes"] == [1024, 4096, 16384]


@pytest.mark.parametrize("batch,seq", [(1, 1), (64, 16), (2, 1024), (5, 300)])
def test_trained_model_parity_on_real_histories(trained, onnx_model, batch, seq):
    """Same items, same scores for the items both lists hold (a near-tie may prune a different
    beam early, which moves position-wise scores: the recall check judges that)."""
    from algorithm.serving.verify.parity import compare_outputs

    model, _, _ = trained
    x = random_inputs(batch, seq, ragged=True, rng=np.random.default_rng(batch * seq))
    m = compare_outputs(TorchRunner(model).infer(x), OnnxRuntimeRunner(onnx_model).infer(x))
    assert m["recall_overlap"] >= 0.99, m
    assert m["max_common_item_score_diff"] <= 1e-3, m


def test_onnx_treats_out_of_range_ids_as_padding(onnx_model):
    runner = OnnxRuntimeRunner(onnx_model)
    x = random_inputs(2, 6, rng=np.random.default_rng(3))
    bad = {k: v.copy() for k, v in x.items()}
    bad["encoder_l3_ids"][0, 2] = 16384
    bad["encoder_l1_ids"][1, 5] = -1
    masked = {k: v.copy() for k, v in x.items()}
    masked["attention_mask"][0, 2] = masked["attention_mask"][1, 5] = 0
    a, b = runner.infer(bad), runner.infer(masked)
    np.testing.assert_array_equal(a["recommendations"], b["recommendations"])
    all_masked = random_inputs(1, 4)
    all_masked["attention_mask"][:] = 0
    assert np.isfinite(runner.infer(all_masked)["scores"]).all()


def test_onnx_runner_slices_a_batch_without_changing_answers(onnx_model):
    x = random_inputs(5, 24, ragged=True, rng=np.random.default_rng(11))
    whole = OnnxRuntimeRunner(onnx_model, rows_per_run=0).infer(x)
    one_thread = OnnxRuntimeRunner(onnx_model, intra_op_threads=1)
    assert one_thread.rows_per_run == 2  # the default where one CPU thread runs it
    for runner in (one_thread, OnnxRuntimeRunner(onnx_model, rows_per_run=3)):
        sliced = runner.infer(x)
        for name in ("recommendations", "scores"):
            np.testing.assert_array_equal(sliced[name], whole[name])
    assert OnnxRuntimeRunner(onnx_model, intra_op_threads=2).rows_per_run == 0
    with pytest.raises(ConfigError, match="rows_per_run"):
        OnnxRuntimeRunner(onnx_model, rows_per_run=-1)


def test_non_default_config_parity(tmp_path):
    cfg = UGTConfig(
        codebook_sizes=(64, 128, 512),
        d_model=32,
        n_heads=2,
        n_encoder_layers=3,
        n_decoder_layers=2,
        d_ff=64,
        max_seq_length=200,
        num_recommendations=20,
    )
    torch.manual_seed(1)
    model = UGTModel(cfg)
    ec = ExportConfig(
        codebook_sizes=(64, 128, 512), num_recommendations=20, max_seq_length=200, max_batch_size=16
    )
    path = export_to_onnx(model, tmp_path / "odd.onnx", ec)
    proto = onnx.load(path)
    out = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in proto.graph.output
    }
    assert out["recommendations"][1:] == [20, 3]
    report = json.loads((tmp_path / "odd.parity.json").read_text())
    assert report["passed"] and set(report["cases"]) == {
        "batch1_seq1",
        "batch16",
        "seq200",
        "ragged",
    }


def test_export_refuses_mismatched_config(tmp_path):
    model = UGTModel(UGTConfig.tiny(num_recommendations=10))
    with pytest.raises(ConfigError, match="num_recommendations"):
        export_to_onnx(model, tmp_path / "m.onnx", ExportConfig())


def test_parity_failure_raises_with_numbers(trained, onnx_model, tmp_path):
    """A different model's weights against this ONNX file: ParityError with the observed numbers."""
    model, _, _ = trained
    other = UGTModel(model.config)
    exporter = ONNXExporter(ExportConfig())
    with pytest.raises(ParityError) as e:
        exporter.verify(other, onnx_model)
    assert "recall@K overlap" in str(e.value) and "allowed" in str(e.value)
    assert e.value.report["passed"] is False
    assert isinstance(e.value, RuntimeError)


def test_model_wrapper_accepts_dict_outputs():
    class DictModel(torch.nn.Module):
        def forward(self, a, b, c, m):
            return {
                "recommendations": torch.zeros(a.shape[0], 2, 3, dtype=torch.int32),
                "scores": torch.zeros(a.shape[0], 2, dtype=torch.float16),
            }

    recs, scores = ModelWrapper(DictModel())(*[torch.zeros(1, 2, dtype=torch.long)] * 4)
    assert recs.dtype == torch.int64 and scores.dtype == torch.float32


def test_serving_exporter_export(trained, tmp_path):
    model, _, _ = trained
    exporter = create_exporter(
        model_name="my_model", precision="fp16", max_batch_size=8, max_seq_length=64
    )
    assert isinstance(exporter, ServingExporter)
    path = exporter.export_onnx(model, str(tmp_path / "m.onnx"))
    assert Path(path).is_file() and read_sidecar(path)["model_name"] == "my_model"


def test_export_failure_leaves_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, a, b, c, m):
            raise RuntimeError("boom")

    from algorithm.serving import ExportError

    with pytest.raises(ExportError, match="boom"):
        export_to_onnx(Broken(), tmp_path / "b.onnx", ExportConfig(verify=False))
    assert not list(tmp_path.iterdir())
