"""Every config field is validated with a message naming the field, the value and what is allowed.

Class per config, as the guide's 7.1 runs them:
``pytest algorithm/serving/tests/test_config.py::TestExportConfig::test_default_values``.
"""

from __future__ import annotations

import logging

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

TRITON_BAD = [
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
    ("length_mix", (200,)),
    ("warmup_coverage", 0.1),
    ("runtime_threads", -1),
]

BENCHMARK_BAD = [
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
    ("seq_len_max", 0),
    ("codebook_sizes", (10, 20)),
    ("metrics_url", "localhost:8002"),
    ("slo_p99_ms", 0),
]


class TestExportConfig:
    """ExportConfig (guide 3.1): export, optimization and accuracy-gate settings."""

    @pytest.fixture
    def config(self):
        return ExportConfig(model_name="test")

    def test_default_values(self):
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
        assert c.opset_version == 18  # guide: 17; torch >= 2.9 exports 18 and newer only
        assert c.min_recall("fp16") == 0.95 and c.min_recall("int8") == 0.90
        assert c.min_recall("bf16") == 0.95 and c.min_recall("fp32") == 0.99
        assert c.fp32_layers == () and c.seq_length_buckets == ()

    def test_initialization(self, config):
        assert config.model_name == "test" and config.validate() is config

    @pytest.mark.parametrize("field,value", EXPORT_BAD)
    def test_rejects(self, field, value):
        with pytest.raises(ConfigError) as e:
            ExportConfig(**{field: value})
        assert e.value.field == field
        assert field in str(e.value) and repr(value) in str(e.value)
        assert isinstance(e.value, ValueError)

    def test_opt_hints_outside_min_max_are_moved_in_with_a_warning(self, caplog):
        """A chosen opt_* outside [min, max] is moved in and logged (field, given, used); the
        guide's default hint under a smaller maximum is fitted quietly."""
        with caplog.at_level(logging.WARNING, logger="algorithm.serving.config"):
            c = ExportConfig(max_batch_size=16, opt_batch_size=100, opt_seq_length=2048)
        assert (c.opt_batch_size, c.opt_seq_length) == (16, 1024)
        text = caplog.text
        assert "opt_batch_size=100 is outside [1, 16]; using 16" in text
        assert "opt_seq_length=2048 is outside [1, 1024]; using 1024" in text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="algorithm.serving.config"):
            c = ExportConfig(max_batch_size=8, max_seq_length=256)  # defaults 32 / 512
        assert (c.opt_batch_size, c.opt_seq_length) == (8, 256) and not caplog.records
        assert ExportConfig(min_batch_size=4, opt_batch_size=2).opt_batch_size == 4

    def test_fp32_layers_are_name_patterns(self):
        assert ExportConfig(fp32_layers=["node_MatMul_*", "head?"]).fp32_layers == (
            "node_MatMul_*",
            "head?",
        )
        for bad in (("",), (3,), 7):
            with pytest.raises(ConfigError, match="fp32_layers"):
                ExportConfig(fp32_layers=bad)

    def test_round_trip_dict(self):
        c = ExportConfig(seq_length_buckets=(128, 512), fp32_layers=("a*",))
        assert ExportConfig.from_dict(c.to_dict()) == c
        with pytest.raises(ConfigError, match="known fields"):
            ExportConfig.from_dict({"nope": 1})

    def test_contract_from_a_model_and_from_a_sidecar(self):
        from algorithm.ugt import UGTConfig, UGTModel

        model = UGTModel(UGTConfig.tiny())
        c = ExportConfig.for_model(model, max_seq_length=10**5, precision="fp32")
        assert c.max_seq_length == model.config.max_seq_length and c.precision == "fp32"
        assert c.codebook_sizes == tuple(model.config.codebook_sizes)
        meta = {"model_name": "m", "max_batch_size": 8, "codebook_sizes": [64, 128, 256]}
        s = ExportConfig.from_sidecar(meta, precision="int8")
        assert (s.model_name, s.max_batch_size, s.codebook_sizes, s.precision) == (
            "m",
            8,
            (64, 128, 256),
            "int8",
        )


class TestTritonConfig:
    """TritonConfig (guide 3.1): platform, instances, dynamic batching, queue policy."""

    def test_default_values(self):
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

    @pytest.mark.parametrize("field,value", TRITON_BAD)
    def test_rejects(self, field, value):
        with pytest.raises(ConfigError) as e:
            TritonConfig(**{field: value})
        assert e.value.field.split()[0] == field.split()[0]

    def test_tensorrt_needs_gpu_instances(self):
        with pytest.raises(ConfigError, match="KIND_GPU for platform tensorrt_plan"):
            TritonConfig(instance_kind="KIND_CPU")
        assert TritonConfig(platform="python", instance_kind="KIND_CPU", gpus=()).gpus == ()


class TestBenchmarkConfig:
    """BenchmarkConfig (guide 3.1): load, length distribution, measurement rules."""

    def test_default_values(self):
        c = BenchmarkConfig()
        assert (c.triton_url, c.num_warmup_requests, c.num_requests, c.concurrency) == (
            "localhost:8001",
            100,
            10000,
            1,
        )
        assert c.test_batch_sizes == (1, 8, 16, 32) and c.test_seq_lengths == (32, 64, 128, 256)
        # the served model's own codebooks and longest history unless set
        assert c.codebook_sizes is None and c.seq_len_max is None
        assert c.levels == (1,)

    @pytest.mark.parametrize("field,value", BENCHMARK_BAD)
    def test_rejects(self, field, value):
        with pytest.raises(ConfigError) as e:
            BenchmarkConfig(**{field: value})
        assert e.value.field == field

    def test_request_rate_mode_needs_rates(self):
        with pytest.raises(ConfigError, match="request_rates"):
            BenchmarkConfig(mode="request_rate")
        c = BenchmarkConfig(mode="request_rate", request_rates=(5, 10.5))
        assert c.levels == (5.0, 10.5)

    def test_histogram_needs_a_file(self):
        with pytest.raises(ConfigError, match="seq_len_histogram_file"):
            BenchmarkConfig(seq_len_distribution="histogram")
