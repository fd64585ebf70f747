"""config.pbtxt generation: every platform and instance kind parses strictly against Triton's
ModelConfig schema and says what the exported model is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format

from algorithm.errors import ConfigError, InputFileNotFoundError
from algorithm.serving import (
    ExportConfig,
    TritonConfig,
    TritonConfigGenerator,
    generate_triton_config,
)
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.tests.onnx_standin import write_standin_onnx
from algorithm.serving.triton.schema import model_config_pb2, parse_config

pb = model_config_pb2()

COMBINATIONS = [
    ("tensorrt_plan", "KIND_GPU"),
    ("onnxruntime_onnx", "KIND_GPU"),
    ("onnxruntime_onnx", "KIND_CPU"),
    ("openvino", "KIND_CPU"),
    ("python", "KIND_GPU"),
    ("python", "KIND_CPU"),
]
EC = ExportConfig(
    model_name="ugt_test", max_batch_size=32, num_recommendations=20, opt_seq_length=128
)


def _strict(text: str):
    """Parse with the protobuf schema; unknown fields or bad enums raise."""
    return text_format.Parse(text, pb.ModelConfig())


@pytest.mark.parametrize(("platform", "kind"), COMBINATIONS)
def test_every_platform_and_kind_parses_strictly_and_matches_the_model(platform, kind):
    tc = TritonConfig(
        platform=platform,
        instance_kind=kind,
        gpus=(0, 1) if kind == "KIND_GPU" else (),
        instance_count=3,
        preferred_batch_sizes=(4, 8, 16, 64),
        max_queue_delay_us=500,
        max_queue_size=128,
        default_queue_timeout_us=20_000,
        trt_accelerator_precision="fp16"
        if platform == "onnxruntime_onnx" and kind == "KIND_GPU"
        else None,
    )
    cfg = _strict(TritonConfigGenerator(EC, tc).config_text())

    assert cfg.name == "ugt_test" and cfg.max_batch_size == 32
    assert [i.name for i in cfg.input] == list(INPUT_NAMES)
    assert all(i.data_type == pb.TYPE_INT64 and list(i.dims) == [-1] for i in cfg.input)
    outputs = {o.name: o for o in cfg.output}
    assert outputs["recommendations"].data_type == pb.TYPE_INT64 and list(
        outputs["recommendations"].dims
    ) == [20, 3]
    assert outputs["scores"].data_type == pb.TYPE_FP32 and list(outputs["scores"].dims) == [20]
    # Preferred sizes above max_batch_size are left out; queue policy rejects on timeout.
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8, 16] and db.max_queue_delay_microseconds == 500
    assert db.default_queue_policy.timeout_action == pb.ModelQueuePolicy.REJECT
    assert db.default_queue_policy.max_queue_size == 128
    assert db.default_queue_policy.default_timeout_microseconds == 20_000
    (group,) = cfg.instance_group
    assert group.kind == getattr(pb.ModelInstanceGroup, kind) and group.count == 3
    assert list(group.gpus) == ([0, 1] if kind == "KIND_GPU" else [])
    assert cfg.version_policy.latest.num_versions == 1
    assert [w.batch_size for w in cfg.model_warmup] == [1]
    assert all(
        list(w.inputs[n].dims) == [128] and w.inputs[n].zero_data
        for w in cfg.model_warmup
        for n in INPUT_NAMES
    )

    if platform == "tensorrt_plan":
        assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
        assert cfg.optimization.cuda.graphs
        assert {s.batch_size for s in cfg.optimization.cuda.graph_spec} == {4, 8, 16}
    elif platform == "onnxruntime_onnx":
        assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        if kind == "KIND_GPU":
            assert accel[0].name == "tensorrt" and accel[0].parameters["precision_mode"] == "FP16"
        else:
            assert len(accel) == 0
    elif platform == "openvino":
        assert cfg.backend == "openvino" and cfg.default_model_filename == "model.xml"
    else:
        assert cfg.backend == "python" and not cfg.platform
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["runtime"] == "onnxruntime" and params["artifact"] == "model.onnx"
        assert params["codebook_sizes"] == "1024,4096,16384" and params["max_seq_length"] == "1024"
        # Only the python model pads ragged batches itself.
        assert all(i.allow_ragged_batch for i in cfg.input)
    if platform != "python":
        assert not any(i.allow_ragged_batch for i in cfg.input)


def test_strict_parse_rejects_unknown_fields_and_bad_enums():
    text = TritonConfigGenerator(
        EC, TritonConfig(platform="python", instance_kind="KIND_CPU")
    ).config_text()
    with pytest.raises(text_format.ParseError):
        parse_config(text + "\nnot_a_field: 1\n")
    with pytest.raises(text_format.ParseError):
        parse_config(text.replace("KIND_CPU", "KIND_TPU"))


def test_options_switch_sections_on_and_off():
    tc = TritonConfig(
        platform="tensorrt_plan",
        enable_dynamic_batching=False,
        model_warmup=False,
        cuda_graphs=False,
        version_policy="all",
        response_cache=True,
    )
    cfg = _strict(TritonConfigGenerator(EC, tc).config_text())
    assert not cfg.HasField("dynamic_batching") and len(cfg.model_warmup) == 0
    assert not cfg.optimization.cuda.graphs
    assert cfg.version_policy.WhichOneof("policy_choice") == "all"
    assert cfg.response_cache.enable
    # No queue limits configured: no queue policy written.
    cfg = _strict(
        TritonConfigGenerator(EC, TritonConfig(platform="onnxruntime_onnx")).config_text()
    )
    assert not cfg.dynamic_batching.HasField("default_queue_policy")


def test_buckets_give_one_warmup_and_graph_per_length():
    ec = EC.replace(seq_length_buckets=(64, 256))
    cfg = _strict(TritonConfigGenerator(ec, TritonConfig(preferred_batch_sizes=(8,))).config_text())
    assert [list(w.inputs["attention_mask"].dims) for w in cfg.model_warmup] == [[64], [256]]
    assert [list(s.input["encoder_l1_ids"].dim) for s in cfg.optimization.cuda.graph_spec] == [
        [64],
        [256],
    ]


def test_gpu_torch_config_warms_the_engine_for_full_and_mixed_lengths():
    ec = EC.replace(seq_length_buckets=(128, 1024), max_batch_size=4)
    tc = TritonConfig(platform="python", python_runtime="torch", length_mix=(300, 0.6))
    params = _strict(TritonConfigGenerator(ec, tc).config_text()).parameters
    assert params["batching"].string_value == "length_aware"
    assert json.loads(params["engine"].string_value) == {"capture_new_shapes": False}
    plan = json.loads(params["warmup"].string_value)
    assert plan[:4] == [[1, 1024], [2, 1024], [3, 1024], [4, 1024]]
    assert plan[4] == {"lognormal": [300.0, 0.6, 1024], "coverage": 0.9995, "max_users": 4}
    plan = TritonConfigGenerator(ec, tc.replace(length_mix=None)).gpu_warmup()
    assert plan == [[b, 1024] for b in (1, 2, 3, 4)]  # full-length batches only
    # the model.py side: the torch runner gets the plan (and the engine options) as arguments
    from algorithm.serving.triton.python_model.standin import model_py_module

    with model_py_module("ugt_model_py_for_config_test") as model_py:
        options = model_py.TritonPythonModel._runner_options(
            "torch", "cuda:0", 0, "bf16", {k: v.string_value for k, v in params.items()}
        )
    assert options["warmup"] == plan + [json.loads(params["warmup"].string_value)[-1]]
    assert options["engine"] == {"capture_new_shapes": False} and options["dtype"] == "bf16"
    assert "pipeline_depth" not in params  # off unless asked for
    piped = _strict(TritonConfigGenerator(ec, tc.replace(pipeline_depth=2)).config_text())
    assert piped.parameters["pipeline_depth"].string_value == "2"
    assert "continuous_batching" not in piped.parameters
    merged = tc.replace(pipeline_depth=1, continuous_batching=True)
    merged = _strict(TritonConfigGenerator(ec, merged).config_text()).parameters
    assert merged["continuous_batching"].string_value == "true"
    # a pipeline's host waits on the GPU block instead of spinning
    for piped_params in (piped.parameters, merged):
        engine = json.loads(piped_params["engine"].string_value)
        assert engine == {"capture_new_shapes": False, "blocking_sync": True}
    for kind, runtime in (("KIND_CPU", "torch"), ("KIND_GPU", "onnxruntime")):
        cpu = TritonConfig(platform="python", python_runtime=runtime, instance_kind=kind)
        cpu = _strict(TritonConfigGenerator(ec, cpu).config_text()).parameters
        assert "warmup" not in cpu and "engine" not in cpu


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"length_mix": (0.5, 0.8)}, "length_mix median"),
        ({"length_mix": (200, 0)}, "length_mix sigma"),
        ({"length_mix": (200,)}, "length_mix"),
        ({"warmup_coverage": 1.5}, "warmup_coverage"),
        ({"pipeline_depth": 2}, "pipeline_depth"),  # tensorrt_plan: Triton's own backend
        ({"platform": "python", "pipeline_depth": 2}, "pipeline_depth"),  # onnxruntime runner
        ({"platform": "python", "python_runtime": "torch", "pipeline_depth": -1}, "pipeline_depth"),
        (  # continuous batching queues what it merges: it needs a pipeline
            {"platform": "python", "python_runtime": "torch", "continuous_batching": True},
            "continuous_batching",
        ),
        ({"platform": "openvino", "instance_kind": "KIND_GPU"}, "instance_kind"),
        ({"platform": "python", "trt_accelerator_precision": "fp16"}, "trt_accelerator_precision"),
        (
            {
                "platform": "onnxruntime_onnx",
                "instance_kind": "KIND_CPU",
                "trt_accelerator_precision": "fp16",
            },
            "trt_accelerator_precision",
        ),
    ],
)
def test_impossible_combinations_name_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        TritonConfigGenerator(EC, TritonConfig(**changes))
    assert e.value.field == field


def test_guide_convenience_function_returns_text_for_a_name(tmp_path):
    text = generate_triton_config("my_model", EC)
    assert _strict(text).name == "my_model"
    assert not (tmp_path / "my_model").exists()


def test_generate_writes_the_repository_entry_for_each_platform(tmp_path):
    # Artifacts that parse as what they claim (publishing refuses anything else); TensorRT
    # plans are checked only for not being another format (deserializing needs a GPU).
    import openvino as ov

    from algorithm.serving.tests.onnx_standin import write_standin_onnx

    onnx = tmp_path / "src" / "exported.onnx"
    onnx.parent.mkdir()
    write_standin_onnx(onnx)
    (tmp_path / "src" / "exported.onnx.json").write_text(json.dumps({"inputs": [{"name": "x"}]}))
    plan = tmp_path / "src" / "engine.plan"
    plan.write_bytes(b"ftrt-engine")
    xml = tmp_path / "src" / "model_ov.xml"
    ov.save_model(ov.convert_model(str(onnx)), str(xml))
    repo = tmp_path / "repo"
    cases = {
        "python": (onnx, ["model.py", "model.onnx", "ugt_model.json"]),
        "onnxruntime_onnx": (onnx, ["model.onnx", "ugt_model.json"]),
        "tensorrt_plan": (plan, ["model.plan"]),
        "openvino": (xml, ["model.bin", "model.xml"]),
    }
    for platform, (artifact, files) in cases.items():
        kind = "KIND_CPU" if platform in ("python", "openvino") else "KIND_GPU"
        ec = EC.replace(model_name=f"m_{platform}")
        path = generate_triton_config(
            repo,
            ec,
            TritonConfig(platform=platform, instance_kind=kind),
            model_file=artifact,
            version=2,
        )
        assert path == str(repo / f"m_{platform}" / "config.pbtxt")
        assert _strict(Path(path).read_text()).name == f"m_{platform}"
        assert sorted(p.name for p in (repo / f"m_{platform}" / "2").iterdir()) == sorted(files)
    shipped = (repo / "m_python" / "2" / "model.py").read_text()
    assert "class TritonPythonModel" in shipped
    # No staging folders left behind.
    assert not [p for p in repo.rglob(".staging-*")]


def test_generate_without_artifact_writes_only_the_config(tmp_path):
    path = TritonConfigGenerator(EC, TritonConfig()).generate(tmp_path)
    assert sorted(p.name for p in (tmp_path / "ugt_test").iterdir()) == ["config.pbtxt"]
    assert _strict(Path(path).read_text()).platform == "tensorrt_plan"
    with pytest.raises(InputFileNotFoundError):
        TritonConfigGenerator(EC, TritonConfig()).generate(
            tmp_path, model_file=tmp_path / "missing.plan"
        )


def test_exporter_facade_generates_the_same_config(tmp_path):
    from algorithm.serving import ServingExporter

    tc = TritonConfig(platform="python", instance_kind="KIND_CPU")
    onnx = write_standin_onnx(tmp_path / "exported.onnx", k=EC.num_recommendations)
    path = ServingExporter(EC, tc).generate_triton_config(tmp_path / "repo", model_file=onnx)
    assert Path(path).read_text() == TritonConfigGenerator(EC, tc).config_text("model.onnx")


def test_every_platform_states_the_models_contract_for_clients():
    """The benchmark (any client) reads codebooks, longest history and max batch from the
    config; Triton's other backends read their parameters by name and leave these alone."""
    ec = EC.replace(codebook_sizes=(64, 128, 256), max_seq_length=48, max_batch_size=4)
    for platform, kind in (
        ("tensorrt_plan", "KIND_GPU"),
        ("onnxruntime_onnx", "KIND_CPU"),
        ("openvino", "KIND_CPU"),
        ("python", "KIND_CPU"),
    ):
        cfg = _strict(
            TritonConfigGenerator(
                ec, TritonConfig(platform=platform, instance_kind=kind)
            ).config_text()
        )
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["codebook_sizes"] == "64,128,256" and params["max_seq_length"] == "48"
        assert params["num_recommendations"] == str(ec.num_recommendations)
        assert cfg.max_batch_size == 4
        if platform != "python":
            assert "runtime" not in params and "artifact" not in params


def test_an_artifact_of_another_platform_is_refused(tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"engine")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    from algorithm.ugt import UGTConfig, UGTModel

    ckpt = tmp_path / "m.safetensors"
    UGTModel(UGTConfig.tiny(num_recommendations=EC.num_recommendations)).save(ckpt)
    py = TritonConfig(platform="python", instance_kind="KIND_CPU")
    with pytest.raises(ConfigError) as e:
        TritonConfigGenerator(EC, py).generate(tmp_path / "repo", model_file=plan)
    assert e.value.field == "model_file" and "serves model.onnx" in str(e.value)
    with pytest.raises(ConfigError, match="platform 'tensorrt_plan' serves model.plan"):
        TritonConfigGenerator(EC, TritonConfig()).generate(tmp_path / "repo", model_file=onnx)
    assert not (tmp_path / "repo").exists()
    torch_py = py.replace(python_runtime="torch")  # the torch runner reads any checkpoint form
    TritonConfigGenerator(EC, torch_py).generate(tmp_path / "repo", model_file=ckpt)
    assert (tmp_path / "repo" / "ugt_test" / "1" / "model.safetensors").is_file()
