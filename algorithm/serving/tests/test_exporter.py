"""ServingExporter and the module guide's examples 5.1-5.5, run as written.

On this machine (no GPU, no TensorRT) the examples run with the CPU platform settings: the
python backend with ONNX Runtime (or OpenVINO) on KIND_CPU instances, the published repository
served by the real tritonserver and answered as PyTorch answers. The TensorRT steps of 5.2 and
5.4 also run as written against the TensorRT stand-in (``trt_standin.py``), which shows what
would be built and placed, never a result. Sizes are scaled down where the guide's would take
minutes on 2 cores (request counts, calibration samples); every call and argument name is the
guide's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from algorithm.serving import (
    BenchmarkConfig,
    ConfigError,
    ExportConfig,
    ServingExporter,
    TritonBenchmark,
    TritonConfig,
)
from algorithm.serving.tests.reliability_helpers import grpc_inputs, outputs, valid_request

# The CPU platform settings that stand in for tensorrt_plan on GPUs (guide 5.x's TritonConfig).
CPU = dict(
    platform="python",
    python_runtime="onnxruntime",
    instance_kind="KIND_CPU",
    gpus=(),
    instance_count=1,
    runtime_threads=1,
    model_warmup=False,
)


@pytest.fixture(scope="module")
def guide(trained, tmp_path_factory):
    """One repository built the guide's ways: 5.1 (deploy_full_pipeline), 5.2 (step by step),
    10.1 (OpenVINO, served by the python backend's OpenVINO runner)."""
    from algorithm.ugt import UGTModel

    _, _, checkpoint = trained
    work = tmp_path_factory.mktemp("guide")
    repo = work / "model_repository"
    model = UGTModel.load(checkpoint)  # guide: load_your_trained_model("checkpoints/...")

    # -- 5.1 basic use -----------------------------------------------------------------------
    config = ExportConfig(
        model_name="ugt_recommend",
        precision="fp32",  # CPU variant (the guide: fp16 for TensorRT)
        max_batch_size=64,
        max_seq_length=1024,
        accuracy_samples=16,
    )
    exporter = ServingExporter(config, TritonConfig(**CPU))
    paths = exporter.deploy_full_pipeline(model, str(repo))

    # -- 5.2 step by step ----------------------------------------------------------------------
    export_config = ExportConfig(model_name="ugt_step", precision="fp32", accuracy_samples=16)
    triton_config = TritonConfig(**CPU)  # guide: instance_count=4, gpus=(0, 1, 2, 3)
    step = ServingExporter(export_config, triton_config)
    onnx_path = step.export_onnx(model, str(work / "models" / "ugt.onnx"))
    # Step 2 on CPU: the ONNX Runtime backend (5.2's optimize_tensorrt needs a GPU)
    artifact = step.optimize(
        onnx_path, str(work / "models" / "ugt_opt.onnx"), backend="onnxruntime"
    )
    step_config = step.generate_triton_config(str(repo))

    # -- 10.1 OpenVINO, placed the same way ---------------------------------------------------
    ov = ServingExporter(
        ExportConfig(model_name="ugt_openvino", precision="fp32", accuracy_samples=16),
        TritonConfig(**{**CPU, "python_runtime": "openvino"}),
    )
    xml = ov.optimize_openvino(onnx_path, str(work / "models" / "openvino"))
    ov_config = ov.generate_triton_config(str(repo))
    return {
        "repo": repo,
        "model": model,
        "paths": paths,
        "onnx_path": onnx_path,
        "artifact": artifact,
        "step_config": step_config,
        "xml": xml,
        "ov_config": ov_config,
        "work": work,
    }


@pytest.fixture(scope="module")
def server(guide):
    from algorithm.serving.triton.server import TritonServer

    with TritonServer(guide["repo"], 0, 0, 0) as s:
        yield s


class TestGuideExamples:
    def test_5_1_full_pipeline_returns_the_guides_paths(self, guide):
        paths = guide["paths"]
        assert set(paths) >= {"onnx_path", "engine_path", "config_path", "model_repository"}
        # the export is a work file in a temporary folder (removed) unless onnx_path is given
        assert paths["onnx_path"] == "" or Path(paths["onnx_path"]).is_file()
        assert Path(paths["engine_path"]).is_file()
        assert paths["config_path"] == str(guide["repo"] / "ugt_recommend" / "config.pbtxt")
        version = guide["repo"] / "ugt_recommend" / "1"
        assert {"model.py", "model.onnx", "ugt_model.json"} <= {p.name for p in version.iterdir()}

    def test_5_2_step_by_step_places_the_optimized_artifact(self, guide):
        assert guide["step_config"] == str(guide["repo"] / "ugt_step" / "config.pbtxt")
        version = guide["repo"] / "ugt_step" / "1"
        assert sorted(p.name for p in version.iterdir()) == [
            "model.onnx",
            "model.py",
            "ugt_model.json",
        ]
        # the artifact is the optimized one (not the plain export), with its sidecar
        assert (version / "model.onnx").read_bytes() == Path(guide["artifact"]).read_bytes()
        meta = json.loads((version / "ugt_model.json").read_text())
        assert meta["backend"] == "onnxruntime" and meta["precision"] == "fp32"

    def test_10_1_openvino_ir_is_placed_with_its_weights(self, guide):
        assert guide["xml"] == str(guide["work"] / "models" / "openvino" / "model.xml")
        report = json.loads(Path(guide["xml"] + ".accuracy.json").read_text())
        assert report["passed"] and report["backend"] == "openvino"
        version = guide["repo"] / "ugt_openvino" / "1"
        assert {"model.xml", "model.bin", "model.py", "ugt_model.json"} == {
            p.name for p in version.iterdir()
        }

    @pytest.mark.server
    @pytest.mark.timeout(600)
    def test_every_published_model_is_served_and_answers_as_pytorch(self, guide, server):
        import tritonclient.grpc as grpcclient

        from algorithm.serving.runtime.torch import TorchRunner

        request = valid_request(np.random.default_rng(5), 3, 24)
        want = TorchRunner(guide["model"]).infer(request)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for name in ("ugt_recommend", "ugt_step", "ugt_openvino"):
            got = outputs(client.infer(name, grpc_inputs(request)))
            overlap = np.mean(
                [
                    len({tuple(r) for r in a} & {tuple(r) for r in b}) / len(a)
                    for a, b in zip(got["recommendations"], want["recommendations"], strict=True)
                ]
            )
            assert got["recommendations"].shape == want["recommendations"].shape
            assert overlap >= 0.99, (name, overlap)

    @pytest.mark.server
    @pytest.mark.timeout(600)
    def test_5_3_benchmark_run_sweep_and_report(self, server, tmp_path):
        config = BenchmarkConfig(
            triton_url=server.grpc_url,
            num_warmup_requests=10,  # guide: 100 and 10000 (minutes on 2 cores)
            num_requests=20,
            concurrency=4,
            test_batch_sizes=(1, 16),
            test_seq_lengths=(32, 64),
            measurement_window_s=0.5,
            max_trials=3,
        )
        benchmark = TritonBenchmark(config)
        result = benchmark.run(server.grpc_url, "ugt_recommend", batch_size=16, seq_length=256)
        assert "batch 16, seq_len 256, concurrency 4" in result.summary()
        assert result.failed_requests == 0 and result.batch_size == 16
        results = benchmark.run_sweep(server.grpc_url, "ugt_recommend")
        assert set(results) == {f"bs{b}_seq{s}_c4" for b in (1, 16) for s in (32, 64)}
        report = benchmark.generate_report(results, str(tmp_path / "benchmark_report.txt"))
        assert (tmp_path / "benchmark_report.txt").read_text() == report
        assert "## Results" in report and "bs16_seq64_c4" in report

    def test_5_5_validate_deployment(self, guide):
        exporter = ServingExporter()
        result = exporter.validate_deployment(str(guide["repo"]), "ugt_recommend")
        assert result["valid"], result["errors"]
        assert result["info"]["versions"] == [1]
        every = exporter.validate_deployment(str(guide["repo"]))
        assert every["valid"], every["errors"]


class TestTensorRTAsWritten:
    """5.2 and 5.4 exactly as the guide writes them, on the TensorRT stand-in."""

    def test_5_2_optimize_tensorrt_then_generate_places_the_plan(
        self, onnx_model, tmp_path, trt_standin
    ):
        from algorithm.serving.triton.schema import parse_config

        export_config = ExportConfig(model_name="ugt_recommend", precision="fp16")
        triton_config = TritonConfig(instance_count=4, gpus=(0, 1, 2, 3))
        exporter = ServingExporter(export_config, triton_config)
        engine_path = exporter.optimize_tensorrt(onnx_model, str(tmp_path / "models" / "ugt.plan"))
        config_path = exporter.generate_triton_config(str(tmp_path / "model_repository"))
        version = tmp_path / "model_repository" / "ugt_recommend" / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model.plan", "ugt_model.json"]
        assert (version / "model.plan").read_bytes() == Path(engine_path).read_bytes()
        cfg = parse_config(Path(config_path).read_text())
        assert cfg.platform == "tensorrt_plan" and list(cfg.instance_group[0].gpus) == [0, 1, 2, 3]
        meta = json.loads((version / "ugt_model.json").read_text())
        assert meta["backend"] == "tensorrt" and meta["precision"] == "fp16"

    def test_5_4_int8_with_the_calibration_generator(self, onnx_model, tmp_path, trt_standin):
        from algorithm.serving import TensorRTOptimizer, create_calibration_data_generator
        from algorithm.serving.tests.trt_standin import read_plan

        config = ExportConfig(model_name="ugt_recommend", precision="int8")
        calibration_gen = create_calibration_data_generator(
            num_samples=100,
            batch_size=32,
            seq_length=512,
            codebook_sizes=(1024, 4096, 16384),
        )
        optimizer = TensorRTOptimizer(config)
        engine_path = optimizer.optimize(
            onnx_model, str(tmp_path / "models" / "ugt_int8.plan"), calibration_data=calibration_gen
        )
        plan = read_plan(engine_path)
        assert plan["calibration"]["batches"] == 4 and plan["calibration"]["batch_size"] == 32
        assert "INT8" in plan["flags"]

    def test_5_4_cpu_variant_int8_on_onnx_runtime(self, onnx_model, tmp_path):
        from algorithm.serving import create_calibration_data_generator

        calibration_gen = create_calibration_data_generator(
            num_samples=32, batch_size=16, seq_length=64, codebook_sizes=(1024, 4096, 16384)
        )
        exporter = ServingExporter(
            ExportConfig(precision="int8", accuracy_samples=16), TritonConfig(**CPU)
        )
        path = exporter.optimize(
            onnx_model,
            str(tmp_path / "ugt_int8.onnx"),
            backend="onnxruntime",
            calibration_data=calibration_gen,
        )
        meta = json.loads(Path(path + ".json").read_text())
        assert meta["precision"] == "int8" and meta["calibration_batches"] == 2
        assert exporter.last_artifact == Path(path)


class TestGenerateTritonConfig:
    def test_nothing_to_place_is_an_error_that_says_what_to_pass(self, tmp_path):
        exporter = ServingExporter(ExportConfig(model_name="m"), TritonConfig(**CPU))
        with pytest.raises(ConfigError) as e:
            exporter.generate_triton_config(str(tmp_path / "repo"))
        assert e.value.field == "model_file" and "optimize_tensorrt" in e.value.hint
        assert "model_file='path/to/model.onnx'" in e.value.hint
        assert not (tmp_path / "repo" / "m" / "config.pbtxt").exists()

    def test_an_artifact_the_platform_does_not_serve_is_refused(
        self, onnx_model, tmp_path, trt_standin
    ):
        exporter = ServingExporter(ExportConfig(model_name="m"), TritonConfig(**CPU))
        exporter.optimize_tensorrt(onnx_model, str(tmp_path / "m.plan"))
        with pytest.raises(ConfigError) as e:
            exporter.generate_triton_config(str(tmp_path / "repo"))
        assert e.value.field == "model_file" and "m.plan" in str(e.value)
        assert "platform 'python' with python_runtime='onnxruntime' serves model.onnx" in str(
            e.value
        )
        assert not (tmp_path / "repo").exists()

    def test_export_alone_is_placed_where_the_platform_serves_onnx_and_config_can_be_rewritten(
        self, onnx_model, tmp_path
    ):
        exporter = ServingExporter(ExportConfig(model_name="m"), TritonConfig(**CPU))
        exporter.last_onnx = Path(onnx_model)  # what export_onnx records
        repo = tmp_path / "repo"
        exporter.generate_triton_config(str(repo))
        assert (repo / "m" / "1" / "model.onnx").read_bytes() == Path(onnx_model).read_bytes()
        # the version is there: a fresh exporter rewrites only its configuration
        fresh = ServingExporter(ExportConfig(model_name="m"), TritonConfig(**CPU))
        (repo / "m" / "config.pbtxt").unlink()
        assert Path(fresh.generate_triton_config(str(repo))).is_file()

    def test_openvino_optimizer_as_the_guide_writes_it(self, onnx_model, tmp_path):
        from algorithm.serving import OpenVINOOptimizer

        with pytest.raises(ConfigError, match="output_dir"):
            OpenVINOOptimizer(ExportConfig(precision="fp32")).optimize(
                onnx_model, str(tmp_path / "model.xml")
            )
        with pytest.raises(ConfigError, match="fp32_layers"):
            OpenVINOOptimizer(
                ExportConfig(precision="fp16", fp32_layers=("node_MatMul_*",))
            ).optimize(onnx_model, str(tmp_path / "ov"))
        assert not (tmp_path / "ov" / "model.xml").exists()


def test_create_exporter_builds_the_export_config():
    from algorithm.serving import create_exporter

    exporter = create_exporter("my_model", precision="int8", max_batch_size=8, accuracy_samples=4)
    c = exporter.export_config
    assert (c.model_name, c.precision, c.max_batch_size, c.accuracy_samples) == (
        "my_model",
        "int8",
        8,
        4,
    )
    assert exporter.backend_for_platform() == "tensorrt"
    cpu = ServingExporter(triton_config=TritonConfig(**{**CPU, "python_runtime": "torch"}))
    assert cpu.backend_for_platform() is None
