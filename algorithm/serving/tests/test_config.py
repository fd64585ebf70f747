"""Every config field is validated with a message naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from algorithm.serving import BenchmarkConfig, ConfigError, ExportConfig, TritonConfig

EXPORT_BAD = [
    ("model_name", "bad name!"),
    ("model_name", "../escape"),
    ("model_name", ""),
    ("precision", "fp8"),
    ("max_batch_size", 0),
    ("min_batch_size", 0),
    ("opt_batch_size", 0),
    ("max_seq_length", 0),
    ("min_seq_length", 0),
    ("opt_seq_length", -3),
    ("opset_version", 11),
    ("do_constant_folding", "yes"),
    ("workspace_size_gb", 0),
    ("codebook_sizes", (1024, 4096)),
    ("codebook_sizes", (1024, 1, 5)),
    ("num_recommendations", 0),
    ("num_recommendations", 5000),
    ("parity_min_recall", 1.5),
    ("parity_max_score_diff", -1.0),
    ("min_recall_fp16", -0.1),
    ("min_recall_int8", 2),
    ("accuracy_samples", 0),
    ("seq_length_buckets", (512, 128)),
    ("seq_length_buckets", (4096,)),
    ("calibration_method", "magic"),
    ("calibration_samples", 0),
]


@pytest.mark.parametrize("field,value", EXPORT_BAD)
def test_export_config_rejects(field, value):
    with pytest.raises(ConfigError) as e:
        ExportConfig(**{field: value})
    assert e.value.field == field
    assert field in str(e.value) and repr(value) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_export_config_guide_defaults():
    c = ExportConfig()
    assert (c.model_name, c.precision, c.max_batch_size, c.max_seq_length) == (
        "ugt_recommend",
        "fp16",
        64,
        1024,
    )
    assert (c.min_batch_size, c.opt_batch_size, c.min_seq_length, c.opt_seq_length) == (
        1,
        32,
        1,
        512,
    )
    assert c.do_constant_folding is True and c.workspace_size_gb == 4
    assert c.codebook_sizes == (1024, 4096, 16384) and c.num_recommendations == 50
    assert c.min_recall("fp16") == 0.95 and c.min_recall("int8") == 0.90


@pytest.mark.parametrize(
    "field,value",
    [
        ("platform", "tensorflow"),
        ("instance_count", 0),
        ("preferred_batch_sizes", (0,)),
        ("max_queue_delay_us", -1),
        ("gpus", (-1,)),
        ("instance_kind", "KIND_TPU"),
        ("python_runtime", "jax"),
        ("max_queue_size", -5),
        ("default_queue_timeout_us", -1),
        ("trt_accelerator_precision", "int4"),
        ("version_policy", "some"),
    ],
)
def test_triton_config_rejects(field, value):
    with pytest.raises(ConfigError) as e:
        TritonConfig(**{field: value})
    assert e.value.field == field


def test_triton_config_guide_defaults():
    c = TritonConfig()
    assert (c.platform, c.instance_count, c.preferred_batch_sizes) == (
        "tensorrt_plan",
        2,
        (8, 16, 32, 64),
    )
    assert (c.max_queue_delay_us, c.gpus, c.instance_kind, c.enable_dynamic_batching) == (
        100,
        (0,),
        "KIND_GPU",
        True,
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("triton_url", ""),
        ("num_warmup_requests", -1),
        ("num_requests", 0),
        ("concurrency", 0),
        ("test_batch_sizes", ()),
        ("test_seq_lengths", (0,)),
        ("protocol", "udp"),
        ("mode", "burst"),
        ("request_rates", (-1.0,)),
        ("seq_len_distribution", "zipf"),
        ("measurement_window_s", 0),
        ("stability_percent", 200),
        ("max_trials", 0),
        ("timeout_s", 0),
    ],
)
def test_benchmark_config_rejects(field, value):
    with pytest.raises(ConfigError) as e:
        BenchmarkConfig(**{field: value})
    assert e.value.field == field


def test_benchmark_config_guide_defaults():
    c = BenchmarkConfig()
    assert (c.triton_url, c.num_warmup_requests, c.num_requests, c.concurrency) == (
        "localhost:8001",
        100,
        10000,
        1,
    )
    assert c.test_batch_sizes == (1, 8, 16, 32) and c.test_seq_lengths == (32, 64, 128, 256)


def test_request_rate_mode_needs_rates():
    with pytest.raises(ConfigError, match="request_rates"):
        BenchmarkConfig(mode="request_rate")


def test_round_trip_dict():
    c = ExportConfig(seq_length_buckets=(128, 512))
    assert ExportConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="known fields"):
        ExportConfig.from_dict({"nope": 1})
