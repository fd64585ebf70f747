"""Dataclass configs with ``validate()``: ExportConfig, TritonConfig, BenchmarkConfig.

Every field of the module guide (section 3.1) is kept with its default; fields added by later
issues come after them. ``validate()`` raises ConfigError naming the field, the value and what
is allowed, and returns the config so calls can be chained.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

from algorithm.errors import ConfigError
from algorithm.fsutil import output_problem
from algorithm.serving.security import ClientTls

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx", "openvino", "python")
PYTHON_RUNTIMES = ("onnxruntime", "openvino", "torch", "tensorrt", "torch_aot")
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
SEQ_LEN_DISTRIBUTIONS = ("fixed", "uniform", "lognormal", "histogram")
EXPERIMENT_MODES = ("ab", "shadow")
EXPERIMENT_STATUSES = ("running", "promoted", "stopped")


def check_name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(field, value, "1-128 characters from letters, digits, '_' and '-'")
    return value


def check_output_path(field: str, path, kind: str = "dir"):
    """ConfigError unless ``path`` can be written as a ``kind`` ("dir" or "file"): run it before
    long work, so a file where a folder belongs fails at once, not after minutes of work."""
    problem = output_problem(path, kind)
    if problem is not None:
        what = "a folder (new or existing)" if kind == "dir" else "a file path"
        raise ConfigError(
            field,
            str(path),
            f"{what} that can be written; {problem}",
            hint=f"Pass {what} you can write there (or move what is in the way).",
        )
    return path


def _int(field: str, value: Any, lo: int, hi: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(field, value, f"an integer {rng}")


def _float(field: str, value: Any, lo: float, hi: float | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < lo
        or (hi is not None and value > hi)
    ):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(field, value, f"a number {rng}")


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(field, value, f"one of {', '.join(allowed)}")


def _ints(
    field: str, value: Any, lo: int, hi: int | None = None, allow_empty: bool = False
) -> tuple:
    if not isinstance(value, (tuple, list)) or (not value and not allow_empty):
        raise ConfigError(field, value, "a non-empty tuple of integers")
    for v in value:
        try:
            _int(field, v, lo, hi)
        except ConfigError as e:
            raise ConfigError(
                field, value, f"integers {e.allowed.removeprefix('an integer ')}"
            ) from None
    return tuple(value)


def _fit_hint(field: str, value: int, lo: int, hi: int, default: int) -> int:
    """An ``opt_*`` tuning hint moved into ``[lo, hi]``. A value the user chose that lies
    outside is logged as a warning naming the field, the value given and the value used; the
    guide's default (32 or 512) is fitted quietly under a smaller maximum."""
    used = min(max(value, lo), hi)
    if used != value:
        log = logger.debug if value == default else logger.warning
        log("%s=%d is outside [%d, %d]; using %d", field, value, lo, hi, used)
    return used


class _Config:
    def __post_init__(self):
        self.validate()

    def validate(self):
        raise NotImplementedError

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(cls.__name__, unknown, f"known fields are {sorted(names)}")
        return cls(**data)


@dataclass
class ExportConfig(_Config):
    """How the model is exported and optimized (guide 3.1 plus accuracy gates and buckets)."""

    model_name: str = "ugt_recommend"
    precision: str = "fp16"
    max_batch_size: int = 64
    max_seq_length: int = 1024
    min_batch_size: int = 1
    opt_batch_size: int = 32
    min_seq_length: int = 1
    opt_seq_length: int = 512
    opset_version: int = (
        18  # guide: 17; torch >= 2.9 exports opset >= 18 only (its Split has no 17 adapter)
    )
    do_constant_folding: bool = True
    workspace_size_gb: int = 4
    codebook_sizes: tuple[int, int, int] = (1024, 4096, 16384)
    num_recommendations: int = 50
    # --- added: verification after export and after every optimization -------------------
    verify: bool = True
    parity_min_recall: float = 0.99  # recall@K overlap of ONNX (fp32) vs PyTorch
    parity_max_score_diff: float = 1e-3  # max |score difference| of ONNX (fp32) vs PyTorch
    min_recall_fp32: float = 0.99
    min_recall_fp16: float = 0.95
    min_recall_int8: float = 0.90
    accuracy_samples: int = 64  # held-out histories for the accuracy gate
    # --- added: optimization -------------------------------------------------------------
    seq_length_buckets: tuple[
        int, ...
    ] = ()  # e.g. (128, 512, 1024): one TensorRT profile per bucket
    calibration_method: str = "entropy"
    calibration_samples: int = 64
    timing_cache_path: str | None = None
    # Layer-name patterns (fnmatch: "*" and "?", e.g. "node_MatMul_12*") kept in fp32 when the
    # precision is lower (guide 9.2), on top of the scoring path that is always pinned: TensorRT
    # pins the matching layers with precision constraints obeyed; ONNX Runtime fp16/int8 and
    # OpenVINO int8 leave the matching ONNX nodes in float. A pattern matching no layer fails
    # the build with ConfigError (a typo does not disappear).
    fp32_layers: tuple[str, ...] = ()

    def validate(self) -> ExportConfig:
        check_name("model_name", self.model_name)
        _choice("precision", self.precision, PRECISIONS)
        _int("max_batch_size", self.max_batch_size, 1, 4096)
        _int("min_batch_size", self.min_batch_size, 1, self.max_batch_size)
        _int("opt_batch_size", self.opt_batch_size, 1)
        # opt_* are tuning hints: moved inside [min, max] (with a warning when the user chose
        # the value) instead of failing every config with a smaller max than the default hint.
        self.opt_batch_size = _fit_hint(
            "opt_batch_size", self.opt_batch_size, self.min_batch_size, self.max_batch_size, 32
        )
        _int("max_seq_length", self.max_seq_length, 1, 65536)
        _int("min_seq_length", self.min_seq_length, 1, self.max_seq_length)
        _int("opt_seq_length", self.opt_seq_length, 1)
        self.opt_seq_length = _fit_hint(
            "opt_seq_length", self.opt_seq_length, self.min_seq_length, self.max_seq_length, 512
        )
        _int("opset_version", self.opset_version, 18, 23)
        if not isinstance(self.do_constant_folding, bool):
            raise ConfigError("do_constant_folding", self.do_constant_folding, "True or False")
        _int("workspace_size_gb", self.workspace_size_gb, 1, 1024)
        cb = self.codebook_sizes
        if not isinstance(cb, (tuple, list)) or len(cb) != 3:
            raise ConfigError("codebook_sizes", cb, "three integers >= 2")
        self.codebook_sizes = _ints("codebook_sizes", cb, 2)
        _int("num_recommendations", self.num_recommendations, 1, min(self.codebook_sizes))
        for name in ("parity_min_recall", "min_recall_fp32", "min_recall_fp16", "min_recall_int8"):
            _float(name, getattr(self, name), 0.0, 1.0)
        _float("parity_max_score_diff", self.parity_max_score_diff, 0.0)
        _int("accuracy_samples", self.accuracy_samples, 1)
        buckets = _ints(
            "seq_length_buckets", self.seq_length_buckets, 1, self.max_seq_length, allow_empty=True
        )
        if list(buckets) != sorted(set(buckets)):
            raise ConfigError("seq_length_buckets", buckets, "strictly increasing lengths")
        self.seq_length_buckets = buckets
        _choice("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        _int("calibration_samples", self.calibration_samples, 1)
        layers = self.fp32_layers
        if isinstance(layers, str):
            layers = (layers,)
        if not isinstance(layers, (tuple, list)) or not all(
            isinstance(p, str) and p.strip() for p in layers
        ):
            raise ConfigError(
                "fp32_layers", self.fp32_layers, "a tuple of layer-name patterns ('*' and '?')"
            )
        self.fp32_layers = tuple(layers)
        return self

    @classmethod
    def for_model(cls, model, **fields) -> ExportConfig:
        """The model's own contract (codebooks, K, longest history) with ``fields`` on top. A
        ``max_seq_length`` above the model's is capped at the model's."""
        mc = model.config
        fields.setdefault("max_seq_length", mc.max_seq_length)
        fields["max_seq_length"] = min(fields["max_seq_length"], mc.max_seq_length)
        return cls(
            codebook_sizes=tuple(mc.codebook_sizes),
            num_recommendations=mc.num_recommendations,
            **fields,
        )

    @classmethod
    def from_sidecar(cls, meta: dict, **fields) -> ExportConfig:
        """The contract an artifact's sidecar records (export_onnx writes it), with ``fields`` on
        top; what the sidecar does not record keeps its default."""
        names = ("model_name", "max_batch_size", "max_seq_length", "num_recommendations")
        contract: dict[str, Any] = {k: meta[k] for k in names if meta.get(k)}
        if meta.get("codebook_sizes"):
            contract["codebook_sizes"] = tuple(meta["codebook_sizes"])
        return cls(**{**contract, **fields})

    def min_recall(self, precision: str | None = None) -> float:
        """The accuracy gate's recall@K threshold for a precision (bf16 shares fp16's)."""
        p = precision or self.precision
        return {"fp32": self.min_recall_fp32, "int8": self.min_recall_int8}.get(
            p, self.min_recall_fp16
        )


@dataclass
class TritonConfig(_Config):
    """How Triton serves the model (guide 3.1 plus platform, queue policy, warm-up, cache).

    The defaults are the guide's: platform tensorrt_plan on KIND_GPU instances on GPU 0. The CLI
    (`config`, `deploy`) defaults to platform python on the instance kind this host has, which
    is what the bundled tritonserver runs."""

    platform: str = "tensorrt_plan"
    instance_count: int = 2
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_us: int = 100
    gpus: tuple[int, ...] = (0,)
    instance_kind: str = "KIND_GPU"
    enable_dynamic_batching: bool = True
    # --- added ----------------------------------------------------------------------------
    python_runtime: str = "onnxruntime"  # the Runner used by platform="python"
    max_queue_size: int = 0  # 0 = unbounded; > 0 rejects requests beyond it (UNAVAILABLE)
    default_queue_timeout_us: int = 0  # 0 = none; > 0 rejects requests queued longer
    allow_timeout_override: bool = True
    model_warmup: bool = True
    response_cache: bool = False
    cuda_graphs: bool = True  # tensorrt_plan only
    trt_accelerator_precision: str | None = None  # onnxruntime_onnx: None, "fp32" or "fp16"
    version_policy: str = "latest"  # "latest" (one), "all"
    runtime_threads: int = 0  # intra-op threads of CPU runtimes; 0 = runtime default
    # python + torch on KIND_GPU: the history lengths (log-normal median, sigma) whose packed
    # CUDA graphs are captured at load, covering this share of the dynamic batches; None: only
    # full-length batches. After warm-up no new graph is captured (no stall mid-traffic).
    length_mix: tuple[float, float] | None = (200.0, 0.8)
    warmup_coverage: float = 0.9995
    # python + torch: batches an instance keeps queued on the device at once. 0: execute() waits
    # for its batch; N >= 1: it returns once the batch is queued and a second thread answers
    # (Triton's response sender), so the next batch is prepared while this one runs.
    pipeline_depth: int = 0
    # with pipeline_depth >= 1: execute() leaves its checked requests with the pipeline and
    # returns, and everything left so far goes to the GPU as one batch whenever fewer than
    # pipeline_depth are in flight (batches form at the GPU's pace; no queue delay needed)
    continuous_batching: bool = False

    def validate(self) -> TritonConfig:
        _choice("platform", self.platform, PLATFORMS)
        _choice("python_runtime", self.python_runtime, PYTHON_RUNTIMES)
        _int("instance_count", self.instance_count, 1, 64)
        self.preferred_batch_sizes = _ints(
            "preferred_batch_sizes", self.preferred_batch_sizes, 1, allow_empty=True
        )
        _int("max_queue_delay_us", self.max_queue_delay_us, 0, 10_000_000)
        _choice("instance_kind", self.instance_kind, INSTANCE_KINDS)
        self.gpus = _ints("gpus", self.gpus, 0, 1023, allow_empty=self.instance_kind != "KIND_GPU")
        _int("max_queue_size", self.max_queue_size, 0)
        _int("default_queue_timeout_us", self.default_queue_timeout_us, 0)
        _int("runtime_threads", self.runtime_threads, 0, 1024)
        if self.trt_accelerator_precision not in (None, "fp32", "fp16"):
            raise ConfigError(
                "trt_accelerator_precision",
                self.trt_accelerator_precision,
                "None, 'fp32' or 'fp16'",
            )
        _choice("version_policy", self.version_policy, ("latest", "all"))
        if self.length_mix is not None:
            if not isinstance(self.length_mix, (tuple, list)) or len(self.length_mix) != 2:
                raise ConfigError(
                    "length_mix", self.length_mix, "None or (median, sigma) of history lengths"
                )
            _float("length_mix median", self.length_mix[0], 1.0)
            _float("length_mix sigma", self.length_mix[1], 0.01, 3.0)
            self.length_mix = tuple(float(v) for v in self.length_mix)
        _float("warmup_coverage", self.warmup_coverage, 0.5, 1.0)
        _int("pipeline_depth", self.pipeline_depth, 0, 8)
        if self.pipeline_depth and (self.platform, self.python_runtime) != ("python", "torch"):
            raise ConfigError(
                "pipeline_depth",
                self.pipeline_depth,
                "0 unless platform='python' with python_runtime='torch' (the runner that can "
                "queue a batch on the device and return)",
            )
        if not isinstance(self.continuous_batching, bool):
            raise ConfigError("continuous_batching", self.continuous_batching, "True or False")
        if self.continuous_batching and not self.pipeline_depth:
            raise ConfigError(
                "continuous_batching",
                self.continuous_batching,
                "False unless pipeline_depth >= 1 (the batches it forms are queued on the "
                "device): set pipeline_depth=1",
            )
        if self.platform == "tensorrt_plan" and self.instance_kind == "KIND_CPU":
            raise ConfigError(
                "instance_kind", self.instance_kind, "KIND_GPU for platform tensorrt_plan"
            )
        return self


@dataclass
class BenchmarkConfig(_Config):
    """How the live server is measured (guide 3.1 plus protocol, modes and stability rules)."""

    triton_url: str = "localhost:8001"
    num_warmup_requests: int = 100
    num_requests: int = 10000
    concurrency: int = 1
    test_batch_sizes: tuple[int, ...] = (1, 8, 16, 32)
    test_seq_lengths: tuple[int, ...] = (32, 64, 128, 256)
    # --- added ----------------------------------------------------------------------------
    protocol: str = "grpc"
    mode: str = "concurrency"  # or "request_rate" (Poisson arrivals)
    concurrency_levels: tuple[int, ...] = ()  # sweep; empty = (concurrency,)
    request_rates: tuple[float, ...] = ()  # requests/s for mode="request_rate"
    seq_len_distribution: str = "fixed"
    seq_len_median: int = 200  # lognormal
    seq_len_sigma: float = 0.8  # lognormal
    seq_len_min: int = 1
    # None: the served model's longest history (its config.pbtxt), 1024 when it does not say
    seq_len_max: int | None = None
    seq_len_histogram_file: str | None = None  # JSON {"lengths": [...], "counts": [...]}
    measurement_window_s: float = 2.0
    stability_percent: float = 10.0
    max_trials: int = 5
    timeout_s: float = 10.0  # per request
    slo_p99_ms: float = 30.0
    seed: int = 0
    # ids of the generated histories; None: the served model's codebooks (read from its
    # config.pbtxt), the guide's (1024, 4096, 16384) when the server does not state them
    codebook_sizes: tuple[int, int, int] | None = None
    metrics_url: str | None = (
        None  # e.g. http://localhost:8002/metrics: CPU/GPU use while measuring
    )
    # --- added: a server with restricted admin APIs or gRPC TLS (reports record this config,
    # so it names the key's file, never the key: None = $TRITON_ADMIN_KEY_FILE/$TRITON_ADMIN_KEY)
    admin_key_file: str | None = None
    tls: bool = False  # gRPC over TLS (HTTP: an https ingress)
    tls_ca_file: str | None = None  # None = the system's roots
    tls_cert_file: str | None = None  # mutual TLS: this client's certificate and key
    tls_key_file: str | None = None
    user_ids: int = 0  # > 0: each row also sends `user_id`, one of this many (an A/B router)

    def validate(self) -> BenchmarkConfig:
        if not isinstance(self.triton_url, str) or not self.triton_url:
            raise ConfigError("triton_url", self.triton_url, "host:port, e.g. localhost:8001")
        _int("num_warmup_requests", self.num_warmup_requests, 0)
        _int("num_requests", self.num_requests, 1)
        _int("concurrency", self.concurrency, 1, 4096)
        self.test_batch_sizes = _ints("test_batch_sizes", self.test_batch_sizes, 1)
        self.test_seq_lengths = _ints("test_seq_lengths", self.test_seq_lengths, 1)
        _choice("protocol", self.protocol, ("grpc", "http"))
        _choice("mode", self.mode, ("concurrency", "request_rate"))
        self.concurrency_levels = _ints(
            "concurrency_levels", self.concurrency_levels, 1, 4096, allow_empty=True
        )
        rates = self.request_rates
        if not isinstance(rates, (tuple, list)) or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in rates
        ):
            raise ConfigError("request_rates", rates, "a tuple of positive numbers (requests/s)")
        self.request_rates = tuple(float(r) for r in rates)
        if self.mode == "request_rate" and not self.request_rates:
            raise ConfigError("request_rates", rates, "at least one rate when mode='request_rate'")
        _choice("seq_len_distribution", self.seq_len_distribution, SEQ_LEN_DISTRIBUTIONS)
        _int("seq_len_min", self.seq_len_min, 1)
        if self.seq_len_max is not None:
            _int("seq_len_max", self.seq_len_max, self.seq_len_min)
        _int("seq_len_median", self.seq_len_median, 1)
        _float("seq_len_sigma", self.seq_len_sigma, 0.0)
        if self.seq_len_distribution == "histogram" and not self.seq_len_histogram_file:
            raise ConfigError(
                "seq_len_histogram_file", None, "a JSON file when seq_len_distribution='histogram'"
            )
        _float("measurement_window_s", self.measurement_window_s, 0.05)
        _float("stability_percent", self.stability_percent, 0.0, 100.0)
        _int("max_trials", self.max_trials, 1)
        _float("timeout_s", self.timeout_s, 0.001)
        _float("slo_p99_ms", self.slo_p99_ms, 0.001)
        cb = self.codebook_sizes
        if cb is not None:
            if not isinstance(cb, (tuple, list)) or len(cb) != 3:
                raise ConfigError("codebook_sizes", cb, "None or three integers >= 2")
            self.codebook_sizes = _ints("codebook_sizes", cb, 2)
        if self.metrics_url is not None and not (
            isinstance(self.metrics_url, str)
            and self.metrics_url.startswith(("http://", "https://"))
        ):
            raise ConfigError("metrics_url", self.metrics_url, "None or http://host:port/metrics")
        if not isinstance(self.tls, bool):
            raise ConfigError("tls", self.tls, "True or False")
        files = ("tls_ca_file", "tls_cert_file", "tls_key_file")
        if not self.tls and any(getattr(self, f) is not None for f in files):
            raise ConfigError("tls", self.tls, "True when a TLS file is given")
        self.client_tls()
        _int("user_ids", self.user_ids, 0)
        return self

    def client_tls(self) -> ClientTls | None:
        """The client's TLS files, checked; None without TLS."""
        if not self.tls:
            return None
        return ClientTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file).validate()

    @property
    def levels(self) -> tuple:
        """The load points of a sweep: concurrency levels or request rates."""
        if self.mode == "request_rate":
            return self.request_rates
        return self.concurrency_levels or (self.concurrency,)


@dataclass
class ExperimentConfig(_Config):
    """An A/B test or shadow run between two served models, routed inside Triton by a router
    model (``abtest.py``; the hash is ``traffic.py``'s).

    ``mode="ab"``: each user goes to ``model_a`` or ``model_b``; ``traffic_split`` is A's share
    of users (module guide 10.4). ``mode="shadow"``: A answers every request; the requests of
    ``shadow_fraction`` of the users are also sent to B (after A's answer is sent), and the
    two answers are compared. ``status`` "promoted" sends everyone to B, "stopped" everyone to A
    (and mirrors nothing), whatever the mode.
    """

    router_name: str = "ugt_router"
    model_a: str = "ugt_recommend"
    model_b: str = "ugt_candidate"
    mode: str = "ab"
    traffic_split: float = 0.5
    shadow_fraction: float = 0.1
    experiment: str = ""  # the experiment's name; "" = router_name
    salt: str = ""  # "" = the experiment's name: two experiments split users independently
    status: str = "running"
    shadow_timeout_ms: int = 1000  # B's request timeout for a mirrored request
    shadow_queue: int = 64  # mirrored requests waiting for B per router instance; more: dropped
    workers: int = 64  # requests one router instance has in flight to the arms at once
    instance_count: int = 2  # router instances (CPU): one forwards while the other waits

    def validate(self) -> ExperimentConfig:
        for name in ("router_name", "model_a", "model_b"):
            check_name(name, getattr(self, name))
        if self.model_a == self.model_b:
            raise ConfigError(
                "model_b", self.model_b, f"a model other than model_a ({self.model_a})"
            )
        if self.router_name in (self.model_a, self.model_b):
            raise ConfigError(
                "router_name", self.router_name, "a name of its own (not one of the two arms)"
            )
        _choice("mode", self.mode, EXPERIMENT_MODES)
        _choice("status", self.status, EXPERIMENT_STATUSES)
        _float("traffic_split", self.traffic_split, 0.0, 1.0)
        _float("shadow_fraction", self.shadow_fraction, 0.0, 1.0)
        self.traffic_split, self.shadow_fraction = (
            float(self.traffic_split),
            float(self.shadow_fraction),
        )
        if self.experiment:
            check_name("experiment", self.experiment)
        if not isinstance(self.salt, str) or len(self.salt) > 128 or not self.salt.isprintable():
            raise ConfigError("salt", self.salt, "printable text of at most 128 characters")
        _int("shadow_timeout_ms", self.shadow_timeout_ms, 1, 3_600_000)
        _int("shadow_queue", self.shadow_queue, 1, 100_000)
        _int("workers", self.workers, 1, 1024)
        _int("instance_count", self.instance_count, 1, 64)
        return self

    @property
    def name(self) -> str:
        """The experiment's name (the router's unless set)."""
        return self.experiment or self.router_name

    @property
    def hash_salt(self) -> str:
        """What the user ids are hashed with (the experiment's name unless ``salt`` is set)."""
        return self.salt or self.name

    def to_parameters(self) -> dict[str, str]:
        """The fields as config.pbtxt ``parameters`` (string values): the router model reads
        its experiment from there."""
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_parameters(cls, params: dict) -> ExperimentConfig:
        """The experiment a router config's ``parameters`` hold (keys of other meaning are
        ignored); ConfigError naming the field when a value does not parse."""
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name not in params:
                continue
            text = params[f.name]
            kind = type(getattr(cls, f.name))
            try:
                fields[f.name] = kind(text) if kind in (int, float) else text
            except (TypeError, ValueError):
                raise ConfigError(f.name, text, f"a {kind.__name__}") from None
        return cls(**fields)


TUNE_SETTINGS = (
    "instance_count",
    "runtime_threads",
    "max_batch_size",
    "preferred_batch_sizes",
    "max_queue_delay_us",
    "gpu_batching",
    "pipeline_depth",
    "queue_policy",
)


@dataclass
class TuneConfig(_Config):
    """What `ugt-serving tune` searches and how it judges a candidate. The load profile (levels,
    history lengths, windows) and the P99 budget (``slo_p99_ms``) come from a BenchmarkConfig.

    Each value list left empty is chosen from the model's current config and the machine; the
    current value is always a candidate.
    """

    model_name: str = "ugt_recommend"
    time_budget_s: float = 900.0  # search + the side-by-side comparison
    settings: tuple[str, ...] = TUNE_SETTINGS  # searched, in this order
    instance_counts: tuple[int, ...] = ()
    runtime_threads: tuple[int, ...] = ()  # intra-op threads per instance (CPU runtimes)
    max_batch_sizes: tuple[int, ...] = ()
    preferred_batch_sizes: tuple[tuple[int, ...], ...] = ()
    max_queue_delays_us: tuple[int, ...] = ()
    gpu_batchings: tuple[str, ...] = ()  # "length_aware", "pad" (GPU engine)
    pipeline_depths: tuple[int, ...] = ()  # python + torch runner; 0 = off
    queue_policies: tuple[tuple[int, int], ...] = ()  # (max_queue_size, timeout_us)
    max_rejected_percent: float = 0.0  # > 0 also searches the queue policy
    tolerance_percent: float = 5.0  # a step worse by more than this ends a direction
    compare_rounds: int = 1  # winner and current config measured alternately, this many times
    load_timeout_s: float = 300.0  # per candidate load (GPU warm-up captures CUDA graphs)
    write_config: bool = True  # write the winner into the repository (the old one is kept)
    resume: bool = True  # reuse the points an earlier run stored in the output folder

    def validate(self) -> TuneConfig:
        check_name("model_name", self.model_name)
        _float("time_budget_s", self.time_budget_s, 1.0)
        if not isinstance(self.settings, (tuple, list)) or not self.settings:
            raise ConfigError("settings", self.settings, f"a non-empty subset of {TUNE_SETTINGS}")
        for s in self.settings:
            _choice("settings", s, TUNE_SETTINGS)
        self.settings = tuple(self.settings)
        self.instance_counts = _ints("instance_counts", self.instance_counts, 1, 64, True)
        self.runtime_threads = _ints("runtime_threads", self.runtime_threads, 0, 1024, True)
        self.max_batch_sizes = _ints("max_batch_sizes", self.max_batch_sizes, 1, 4096, True)
        if not isinstance(self.preferred_batch_sizes, (tuple, list)):
            raise ConfigError(
                "preferred_batch_sizes", self.preferred_batch_sizes, "a tuple of tuples of sizes"
            )
        self.preferred_batch_sizes = tuple(
            _ints("preferred_batch_sizes", p, 1, 4096, True) for p in self.preferred_batch_sizes
        )
        self.max_queue_delays_us = _ints(
            "max_queue_delays_us", self.max_queue_delays_us, 0, 10_000_000, True
        )
        for b in self.gpu_batchings:
            _choice("gpu_batchings", b, ("length_aware", "pad"))
        self.gpu_batchings = tuple(self.gpu_batchings)
        self.pipeline_depths = _ints("pipeline_depths", self.pipeline_depths, 0, 8, True)
        policies = []
        for p in self.queue_policies:
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ConfigError(
                    "queue_policies", self.queue_policies, "(max_queue_size, timeout_us) pairs"
                )
            policies.append(_ints("queue_policies", p, 0))
        self.queue_policies = tuple(policies)
        _float("max_rejected_percent", self.max_rejected_percent, 0.0, 100.0)
        _float("tolerance_percent", self.tolerance_percent, 0.0, 100.0)
        _int("compare_rounds", self.compare_rounds, 0, 10)
        _float("load_timeout_s", self.load_timeout_s, 1.0)
        for name in ("write_config", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        return self
