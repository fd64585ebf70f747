"""The load generator's plumbing: request data, the async Triton client, outcome records.

Histories hold valid ids drawn from the codebooks with lengths from the configured
distribution (fixed, uniform, log-normal clipped to [min, max], or an empirical histogram);
``request_contract`` decides the codebooks, the longest history and the largest batch from the
served model's own config (read from the server) wherever the BenchmarkConfig leaves them
unset, and refuses a setting the model would reject; ``Client`` hides the gRPC/HTTP asyncio
clients behind the few calls the benchmark makes; ``classify_error`` tells a failure from a
queue-policy rejection and a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import numpy as np

from algorithm.errors import BenchmarkError, ConfigError, InputFileNotFoundError
from algorithm.serving.config import BenchmarkConfig
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.security import admin_headers, read_admin_key
from algorithm.serving.traffic import USER_ID_INPUT

logger = logging.getLogger(__name__)

OK, FAILED, REJECTED, TIMED_OUT = 0, 1, 2, 3
DEFAULT_CODEBOOKS = (1024, 4096, 16384)  # the guide's, when neither config nor server says
DEFAULT_MAX_SEQ = 1024
# Triton answers these when its queue policy turns a request away (max_queue_size, queue timeout).
_REJECT_MARKERS = ("maximum queue size", "request timeout expired", "exceeds maximum queue")


# ------------------------------------------------------------------------------- request data
def sample_seq_lengths(
    config: BenchmarkConfig, count: int, rng: np.random.Generator, fixed: int | None = None
) -> np.ndarray:
    """``count`` history lengths from the configured distribution (fixed uses ``fixed``); an
    unset ``seq_len_max`` is the default 1024 here (the benchmark sets the served model's)."""
    dist, lo = config.seq_len_distribution, config.seq_len_min
    hi = config.seq_len_max if config.seq_len_max is not None else DEFAULT_MAX_SEQ
    if dist == "fixed":
        n = fixed if fixed is not None else config.seq_len_median
        return np.full(count, int(n), dtype=np.int64)
    if dist == "uniform":
        return rng.integers(lo, hi + 1, count)
    if dist == "lognormal":
        x = np.exp(rng.normal(math.log(config.seq_len_median), config.seq_len_sigma, count))
        return np.clip(np.rint(x), lo, hi).astype(np.int64)
    lengths, counts = load_histogram(config.seq_len_histogram_file)
    keep = (lengths >= lo) & (lengths <= hi)
    if not keep.any():
        raise ConfigError(
            "seq_len_histogram_file",
            config.seq_len_histogram_file,
            f"lengths inside [seq_len_min={lo}, seq_len_max={hi}]",
        )
    p = counts[keep] / counts[keep].sum()
    return rng.choice(lengths[keep], count, p=p)


def load_histogram(path) -> tuple[np.ndarray, np.ndarray]:
    """An empirical length histogram: JSON ``{"lengths": [...], "counts": [...]}``."""
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"sequence-length histogram not found: {p}")
    try:
        data = json.loads(p.read_text())
        lengths = np.asarray(data["lengths"], dtype=np.int64)
        counts = np.asarray(data["counts"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            "seq_len_histogram_file",
            str(p),
            'JSON {"lengths": [positive ints], "counts": [non-negative numbers]}',
        ) from e
    if (
        lengths.ndim != 1
        or lengths.shape != counts.shape
        or not len(lengths)
        or (lengths < 1).any()
        or (counts < 0).any()
        or counts.sum() <= 0
    ):
        raise ConfigError(
            "seq_len_histogram_file",
            str(p),
            "equal-length 'lengths' (>= 1) and 'counts' (>= 0, not all 0)",
        )
    return lengths, counts


def make_requests(
    batch_size: int, lengths: np.ndarray, codebook_sizes, rng: np.random.Generator, users: int = 0
) -> list[dict]:
    """Requests of ``batch_size`` histories each; rows of one request are padded to its longest.
    With ``users`` each request also carries ``user_id`` (one of that many users per row), the
    extra input of an experiment's router model."""
    reqs = []
    for start in range(0, len(lengths) - batch_size + 1, batch_size):
        rows = lengths[start : start + batch_size]
        width = int(rows.max())
        mask = (np.arange(width)[None, :] < rows[:, None]).astype(np.int64)
        req = {
            f"encoder_l{i + 1}_ids": rng.integers(0, c, (batch_size, width)) * mask
            for i, c in enumerate(codebook_sizes)
        }
        req["attention_mask"] = mask
        reqs.append({k: np.ascontiguousarray(req[k], dtype=np.int64) for k in INPUT_NAMES})
        if users:
            ids = rng.integers(0, users, batch_size)
            reqs[-1][USER_ID_INPUT] = np.array([[f"user-{i}".encode()] for i in ids], np.object_)
    return reqs


# ------------------------------------------------------------------------------ served contract
def _param(config: dict, key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("string_value")
    return str(value) if value not in (None, "") else None


def served_contract(model_config: dict | None) -> dict:
    """What a served model accepts, from its config (the JSON form of Triton's ModelConfig):
    ``max_batch_size`` (0: no batching dimension), and from the parameters that
    ``TritonConfigGenerator`` writes, ``max_seq_length``, ``codebook_sizes`` and
    ``num_recommendations``. A value the config does not state is None."""
    cfg = (model_config or {}).get("config", model_config) or {}
    out: dict = {
        "max_batch_size": None,
        "max_seq_length": None,
        "codebook_sizes": None,
        "num_recommendations": None,
    }
    try:
        if cfg.get("max_batch_size") is not None:
            out["max_batch_size"] = int(cfg["max_batch_size"])
        if _param(cfg, "max_seq_length"):
            out["max_seq_length"] = int(_param(cfg, "max_seq_length"))
        if _param(cfg, "codebook_sizes"):
            sizes = tuple(int(v) for v in _param(cfg, "codebook_sizes").split(","))
            out["codebook_sizes"] = sizes if len(sizes) == 3 else None
        if _param(cfg, "num_recommendations"):
            out["num_recommendations"] = int(_param(cfg, "num_recommendations"))
    except (TypeError, ValueError, AttributeError) as e:  # a foreign config: use what parsed
        logger.warning("could not read the served model's contract from its config: %s", e)
    return out


def request_contract(
    config: BenchmarkConfig,
    served: dict,
    batch_size: int,
    seq_length: int | None,
    model: str = "the model",
) -> dict:
    """The codebooks, longest history and largest batch the generated requests use, and where
    each came from ("config", "server" or "default").

    An unset BenchmarkConfig field takes the served model's value; a set one that the model
    would reject (a larger codebook, a longer history, a bigger batch than its config allows)
    raises ConfigError naming the field, so no request the model rejects is ever sent.
    """
    source: dict[str, str] = {}
    mbs = served.get("max_batch_size")
    if mbs and batch_size > mbs:
        raise ConfigError(
            "batch_size", batch_size, f"<= {mbs}, the max_batch_size {model} is served with"
        )
    source["max_batch_size"] = "server" if mbs is not None else "default"

    cb_served = served.get("codebook_sizes")
    if config.codebook_sizes is not None:
        codebooks = tuple(config.codebook_sizes)
        if cb_served and any(c > s for c, s in zip(codebooks, cb_served, strict=True)):
            raise ConfigError(
                "codebook_sizes",
                codebooks,
                f"at most the served codebooks {tuple(cb_served)} of {model} "
                "(larger ids are rejected; leave codebook_sizes unset to use the server's)",
            )
        source["codebook_sizes"] = "config"
    elif cb_served:
        codebooks, source["codebook_sizes"] = tuple(cb_served), "server"
    else:
        codebooks, source["codebook_sizes"] = DEFAULT_CODEBOOKS, "default"

    seq_served = served.get("max_seq_length")
    limit = seq_served or DEFAULT_MAX_SEQ
    why = f"the max_seq_length {model} is served with" if seq_served else "the default limit"
    if seq_length is not None and seq_served and seq_length > seq_served:
        raise ConfigError("seq_length", seq_length, f"<= {seq_served}, {why}")
    if config.seq_len_max is not None:
        if config.seq_len_max > limit and seq_served:
            raise ConfigError("seq_len_max", config.seq_len_max, f"<= {limit}, {why}")
        seq_max, source["seq_len_max"] = config.seq_len_max, "config"
    else:
        seq_max = limit
        source["seq_len_max"] = "server" if seq_served else "default"
    if config.seq_len_distribution != "fixed" and config.seq_len_min > seq_max:
        raise ConfigError("seq_len_min", config.seq_len_min, f"<= seq_len_max={seq_max}")
    return {
        "codebook_sizes": list(codebooks),
        "seq_len_max": int(seq_max),
        "max_batch_size": mbs,
        "num_recommendations": served.get("num_recommendations"),
        "source": source,
    }


# ------------------------------------------------------------------------------------- client
def _strip_scheme(url: str) -> str:
    for prefix in ("grpc://", "http://", "https://"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


class Client:
    """The async tritonclient of one protocol behind the few calls the load generator makes.

    ``config`` brings the client's TLS files and where its admin key comes from; the key goes
    only with admin calls (statistics), never with inference requests."""

    def __init__(
        self,
        url: str,
        protocol: str,
        concurrency: int,
        timeout_s: float,
        config: BenchmarkConfig | None = None,
    ):
        self.url, self.protocol, self.timeout_s = _strip_scheme(url), protocol, timeout_s
        cfg = config or BenchmarkConfig()
        self.admin_headers = admin_headers(read_admin_key(cfg.admin_key_file), protocol)
        tls = cfg.client_tls()
        try:
            if protocol == "grpc":
                import tritonclient.grpc.aio as mod

                self.client = mod.InferenceServerClient(
                    self.url, **(tls.grpc_kwargs() if tls else {})
                )
            else:
                import tritonclient.http.aio as mod

                self.client = mod.InferenceServerClient(
                    self.url,
                    conn_limit=max(100, 2 * concurrency),
                    ssl=tls is not None,
                    ssl_context=tls.ssl_context() if tls else None,
                )
        except Exception as e:
            raise BenchmarkError(f"cannot create a {protocol} client for {url}: {e}") from e
        self.mod = mod

    def inputs(self, arrays: dict[str, np.ndarray]) -> list:
        out = []
        for name in INPUT_NAMES:
            x = arrays[name]
            inp = self.mod.InferInput(name, list(x.shape), "INT64")
            inp.set_data_from_numpy(x)
            out.append(inp)
        if USER_ID_INPUT in arrays:  # a router model's extra input
            x = arrays[USER_ID_INPUT]
            inp = self.mod.InferInput(USER_ID_INPUT, list(x.shape), "BYTES")
            inp.set_data_from_numpy(x)
            out.append(inp)
        return out

    async def infer(self, model: str, inputs: list):
        if self.protocol == "grpc":
            return await self.client.infer(model, inputs, client_timeout=self.timeout_s)
        return await asyncio.wait_for(self.client.infer(model, inputs), self.timeout_s)

    async def call(self, name: str, *args, timeout: float = 3.0):
        return await asyncio.wait_for(getattr(self.client, name)(*args), timeout)

    async def model_config(self, model: str) -> dict | None:
        """The served model's config (JSON form), None when the server does not answer."""
        try:
            if self.protocol == "grpc":
                return await self.call("get_model_config", model, "", None, True)
            return await self.call("get_model_config", model)
        except Exception as e:  # an old or foreign server: the benchmark's defaults apply
            logger.warning("no model config for %s from %s: %s", model, self.url, e)
            return None

    async def statistics(self, model: str) -> dict:
        try:
            if self.protocol == "grpc":
                return await self.call(
                    "get_inference_statistics", model, "", self.admin_headers, True
                )
            return await self.call("get_inference_statistics", model, "", self.admin_headers)
        except Exception as e:  # statistics are an extra; the latency numbers stand without them
            logger.warning("no inference statistics from %s: %s", self.url, e)
            return {}

    async def close(self):
        try:
            await self.client.close()
        except Exception:  # closing a broken channel must not hide the real error
            logger.debug("closing the client failed", exc_info=True)


def classify_error(exc: BaseException) -> int:
    """FAILED, REJECTED (queue policy) or TIMED_OUT for an exception raised by infer()."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TIMED_OUT
    status = exc.status() if callable(getattr(exc, "status", None)) else ""
    text = f"{status} {exc}".lower()
    if "deadline" in text:
        return TIMED_OUT
    if any(m in text for m in _REJECT_MARKERS):
        return REJECTED
    return FAILED


class Records:
    """Per-request send/done times and outcomes, appended by the workers."""

    def __init__(self):
        self.sent: list[float] = []
        self.done: list[float] = []
        self.outcome: list[int] = []
        self.errors: dict[str, int] = {}

    def add(self, t_sent: float, t_done: float, outcome: int, error: BaseException | None = None):
        self.sent.append(t_sent)
        self.done.append(t_done)
        self.outcome.append(outcome)
        if error is not None:
            msg = (
                str(error).strip().splitlines()[0][:200]
                if str(error).strip()
                else type(error).__name__
            )
            if msg in self.errors or len(self.errors) < 8:
                self.errors[msg] = self.errors.get(msg, 0) + 1

    def arrays(self):
        return (
            np.asarray(self.sent),
            np.asarray(self.done),
            np.asarray(self.outcome, dtype=np.int64),
        )
