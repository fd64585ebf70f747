"""Triton python-backend model for UGT: runs the version's artifact through a project Runner.

Shipped into every ``backend: "python"`` version folder. The stub runs it in the Python
environment found through PATH (the project's virtualenv), so numpy and ``algorithm.serving``
import from there. ``parameters`` in config.pbtxt name the Runner (``runtime``), the artifact
file, the device, thread count, the codebook sizes and the longest history accepted.

A dynamic batch holds requests of different lengths (the inputs allow ragged batches). Names,
dtypes and shapes are checked per request; id and mask values once for the whole batch, and per
request only when that check fails, so a bad request is answered alone with INVALID_ARG naming
the input and the problem. The good ones run once: right-padded to the longest (mask 0;
positions of real items do not move) for ``runner.infer``, or, for a runner with
``infer_batch`` (torch: GpuEngine), handed over flat (``runtime.gpu.batch.FlatBatch``, one array per
input) for the runner to pack or pad; the answers are row slices of one array per output.

With the parameter ``pipeline_depth`` = N >= 1 and a runner with ``infer_batch_async`` (torch),
execute() returns as soon as its batch is queued on the GPU, and a second thread answers the
requests through their response senders when the GPU is done (a default, non-decoupled model may
answer that way since Triton 24.06, exactly one response per request): the next batch is read,
checked and laid out while this one runs, in one process and one CUDA context. At most N
batches are in flight; execute() waits for a slot before it queues another, so requests keep
collecting in Triton's queue meanwhile. Each send() is a round trip to the backend process, so
the responses go out on ``response_threads`` threads (default 8). Every standard client works
as before.

With ``continuous_batching`` as well, execute() does not wait for a slot: it reads and checks its
requests, leaves them with the pipeline and returns, and a launcher thread queues on the GPU,
whenever fewer than N batches are in flight, everything left with it so far (up to
``max_batch_size`` rows) as one batch. Batches then form at the GPU's pace: a lone request goes
at once (no queue delay to wait out), and under load every request that came while the GPU was
busy goes in the next batch.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from algorithm.serving.contract import ID_NAMES, INPUT_NAMES, SIDECAR_NAME

# The stub's numpy bridge is built against numpy 1; with numpy 2 tensors cross through DLPack
# as torch tensors (numpy's own DLPack capsules crash this stub: seen, segfault on CPU).
_DLPACK = int(np.__version__.split(".")[0]) >= 2
_TORCH = None  # torch, imported on first use (DLPack transport)
_FLAT_BATCH = None  # algorithm.serving.runtime.gpu.batch.FlatBatch, imported on first use


def _torch():
    global _TORCH
    if _TORCH is None:
        import torch
        import torch.utils.dlpack  # noqa: F401  (torch.utils.dlpack.to_dlpack)

        _TORCH = torch
    return _TORCH


class BadRequest(ValueError):
    """A request the model cannot answer; the message goes back to the client."""


def _log(level: str, message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)


def _flag(name: str, text: str, default: bool) -> bool:
    """A true/false parameter's text (empty: ``default``); anything else is refused by name."""
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", ""):
        raise ValueError(f"parameter {name}={text!r} must be true or false")
    return default if value == "" else value in ("true", "1")


def _error(message: str, invalid_argument: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_argument else "INTERNAL", None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _inference_failed(model_name: str, e: Exception):
    """Logs a runtime failure once and returns the answer each request of its batch gets."""
    _log("error", f"{model_name}: inference failed: {type(e).__name__}: {e}")
    return _error(f"inference failed: {type(e).__name__}: {e}", invalid_argument=False)


def _set_switch_interval(text: str) -> None:
    """``gil_switch_interval_us``: how long a thread waiting for the GIL lets the holder run
    before it asks for it (Python's default 5000 us). The pipelined paths run several threads
    (execute, launcher, answers, senders) in one process; each wait to get the GIL back after a
    blocking call can last that long."""
    if not text:
        return
    try:
        us = float(text)
    except ValueError:
        us = 0.0
    if not 1 <= us <= 100_000:
        raise ValueError(
            f"parameter gil_switch_interval_us={text!r} must be a number of microseconds in "
            "[1, 100000] (Python's default is 5000)"
        )
    import sys

    sys.setswitchinterval(us / 1e6)


class _Clock:
    """Laps of one execute() (seconds per phase)."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


class _Phases:
    """Host time per phase of the by-batch path, summed over executions and written (at most
    twice a second) to a JSON file, when the parameter ``phase_stats`` names a folder: the GPU
    benchmark reads it to report host microseconds per request."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = {}
        self.batches = self.requests = 0
        self.engine: dict[str, int] = {}
        self.written = 0.0
        self.launch_laps: dict | None = None  # the torch runner's launch_laps (pipelined paths)
        # the cyclic garbage collector's passes in this process, per generation: a full pass
        # stops every thread of the instance while it runs
        self.gc_collections = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]
        self._gc_start: dict[int, float] = {}
        gc.callbacks.append(self._gc_callback)

    def _gc_callback(self, phase: str, info: dict) -> None:
        g = info.get("generation", 2)
        if phase == "start":
            self._gc_start[g] = time.perf_counter()
        elif g in self._gc_start:
            self.gc_collections[g] += 1
            self.gc_seconds[g] += time.perf_counter() - self._gc_start.pop(g)

    def close(self) -> None:
        """The last write, and the collector's callback removed."""
        self.write()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._gc_callback)

    def add(self, clock: _Clock, requests: int, engine) -> None:
        """One batch (one execute(), or one merged batch): its laps, its requests, and the GPU
        engine's counts so far of batches without a CUDA graph of their own (a key no warm-up
        captured): run eagerly, or sent to a larger warmed bucket."""
        for k, v in clock.laps.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.batches += 1
        self.requests += requests
        self.engine = {k: getattr(engine, k, 0) for k in ("eager_runs", "rounded_up")}
        if time.monotonic() - self.written >= 0.5:
            self.write()

    def write(self) -> None:
        """The sums so far to the file (atomically); also at finalize()."""
        self.written = time.monotonic()
        summary = {"batches": self.batches, "requests": self.requests, **self.engine}
        summary["gc"] = {"collections": self.gc_collections, "seconds": self.gc_seconds}
        if self.launch_laps is not None:  # the runner's own steps of a queued batch's launch
            summary["launch_seconds"] = dict(self.launch_laps)
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({**summary, "seconds": self.seconds}))
            os.replace(tmp, self.path)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.name = args.get("model_name", config.get("name", "ugt"))
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.max_seq_length = int(params.get("max_seq_length", "1024"))
        self.codebook_sizes = tuple(
            int(c) for c in params.get("codebook_sizes", "1024,4096,16384").split(",")
        )
        if len(self.codebook_sizes) != len(ID_NAMES):
            raise ValueError(
                f"parameter codebook_sizes={self.codebook_sizes} needs {len(ID_NAMES)} sizes"
            )
        self.dlpack = _DLPACK or params.get("tensor_transport", "") == "dlpack"
        _set_switch_interval(params.get("gil_switch_interval_us", ""))
        phase_dir = params.get("phase_stats", "")
        self.phases = (
            _Phases(Path(phase_dir) / f"{self.name}_{os.getpid()}.json") if phase_dir else None
        )
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        artifact_name = params.get("artifact", "model.onnx")
        # A hand-edited config must not point the loader outside its version folder.
        if Path(artifact_name).name != artifact_name or artifact_name in ("", ".", ".."):
            raise ValueError(
                f"parameter artifact={artifact_name!r} must be a plain file name in {version_dir}"
            )
        artifact = version_dir / artifact_name
        runtime = params.get("runtime", "onnxruntime")
        gpu = args.get("model_instance_kind") == "GPU"
        device = params.get("device", "auto")
        if device == "auto":
            device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        # The precision the artifact was built (and accuracy-gated) at, from its sidecar.
        precision = params.get("precision", "fp32")
        sidecar = version_dir / SIDECAR_NAME
        if sidecar.is_file():
            with contextlib.suppress(OSError, ValueError):
                precision = json.loads(sidecar.read_text()).get("precision") or precision
        options = self._runner_options(
            runtime, device, int(params.get("threads", "0") or 0), precision, params
        )
        from algorithm.serving.runtime import create_runner

        self.runner = create_runner(runtime, artifact, **options)
        if self.phases is not None and hasattr(self.runner, "profile_launches"):
            self.phases.launch_laps = self.runner.profile_launches()
        self.pipeline = self._start_pipeline(
            params.get("pipeline_depth", "") or "0",
            runtime,
            params.get("response_threads", "") or "8",
            params.get("continuous_batching", "") or "false",
        )
        _log(
            "info",
            f"{self.name} v{args['model_version']}: {runtime} runner on {device} over "
            f"{artifact.name}"
            + (f", pipelined ({self.pipeline.describe()})" if self.pipeline else ""),
        )
        if self.phases is not None:  # the loading's own counts (the collector's) are the start
            self.phases.write()

    def _start_pipeline(
        self, depth_text: str, runtime: str, senders_text: str = "8", merge_text: str = "false"
    ):
        merge = _flag("continuous_batching", merge_text, False)
        try:
            depth, senders = int(depth_text), int(senders_text)
        except ValueError:
            raise ValueError(
                f"parameters pipeline_depth={depth_text!r} (0 = off) and "
                f"response_threads={senders_text!r} must be whole numbers"
            ) from None
        if senders < 1:
            raise ValueError(f"parameter response_threads={senders} must be 1 or more")
        if depth < 0:
            raise ValueError(f"parameter pipeline_depth={depth} must be 0 (off) or more")
        if depth == 0:
            if merge:
                raise ValueError(
                    "parameter continuous_batching=true needs pipeline_depth >= 1 (the batches "
                    "it forms are queued on the GPU): set pipeline_depth to 1 or 2"
                )
            return None
        if getattr(self.runner, "infer_batch_async", None) is None:
            raise ValueError(
                f"parameter pipeline_depth={depth}: the {runtime} runner cannot queue a batch "
                "and return (only the torch runtime can); set pipeline_depth to 0"
            )
        return _Pipeline(self, depth, senders, merge)

    @staticmethod
    def _runner_options(
        runtime: str, device: str, threads: int, precision: str, params=None
    ) -> dict:
        """Options for the runner's factory, passed only where its signature takes them.

        The torch runner's GPU engine also reads ``batching`` ("length_aware" or "pad"),
        ``engine`` (JSON of gpu.EngineConfig fields) and ``warmup`` (JSON list for
        TorchRunner's ``warmup``) from the parameters, when set."""
        from algorithm.errors import ServingError
        from algorithm.serving.runtime import runner_factory

        cuda = device.startswith("cuda")
        candidates = {
            "device": device,
            # A reduced-precision artifact already carries its precision; eager torch on CPU
            # stays fp32 so CPU answers match the reference.
            "dtype": precision if cuda and precision in ("fp16", "bf16") else "fp32",
        }
        if threads:
            candidates.update(intra_op_threads=threads, threads=threads, num_threads=threads)
        for key in ("batching", "engine", "warmup"):
            value = (params or {}).get(key, "")
            if value:
                candidates[key] = value if key == "batching" else json.loads(value)
        if runtime == "openvino":  # OpenVINO names devices CPU / GPU.<n>
            candidates["device"] = f"GPU.{device.partition(':')[2] or 0}" if cuda else "CPU"
            candidates["precision"] = precision
        if runtime == "onnxruntime" and cuda:
            candidates["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            accepted = inspect.signature(runner_factory(runtime)).parameters
        except (ImportError, TypeError, ValueError, ServingError):
            return {}
        named = {
            n for n, p in accepted.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        return {k: v for k, v in candidates.items() if k in named}

    # -- requests -------------------------------------------------------------------------
    def _numpy(self, tensor) -> np.ndarray:
        if not self.dlpack:
            return tensor.as_numpy()
        t = (_TORCH or _torch()).from_dlpack(tensor.to_dlpack())
        return (t if t.device.type == "cpu" else t.cpu()).numpy()

    def _row_tensors(self, name: str, array: np.ndarray):
        """Output tensors of row slices of one C-contiguous array, as a function of (start, end):
        through DLPack the array becomes one torch tensor and each slice costs one capsule."""
        if not self.dlpack:
            return lambda start, end: pb_utils.Tensor(name, array[start:end])
        torch = _TORCH or _torch()
        whole, capsule, tensor = (
            torch.from_numpy(array),
            torch.utils.dlpack.to_dlpack,
            pb_utils.Tensor,
        )
        return lambda start, end: tensor.from_dlpack(name, capsule(whole[start:end]))

    def _read(self, request) -> dict[str, np.ndarray]:
        """The request's inputs, checked for presence, dtype and shape; ids and mask values are
        checked by ``_check_values`` (once per batch on the hot path, see ``_valid_batch``)."""
        arrays = {}
        # one inputs() call (get_input_tensor_by_name calls it again for every name)
        tensors = {t.name(): t for t in request.inputs()}
        for name in INPUT_NAMES:
            tensor = tensors.get(name)
            if tensor is None:
                raise BadRequest(f"{name}: missing; the model needs {', '.join(INPUT_NAMES)}")
            arrays[name] = self._numpy(tensor)
        first = arrays[INPUT_NAMES[0]]
        for name, a in arrays.items():
            if a.dtype != np.int64:
                raise BadRequest(f"{name}: dtype {a.dtype}, expected int64")
            if a.shape != first.shape:
                raise BadRequest(
                    f"{name}: shape {list(a.shape)} differs from {INPUT_NAMES[0]} {list(first.shape)}"
                )
        if first.ndim != 2 or first.shape[0] < 1:
            raise BadRequest(
                f"{INPUT_NAMES[0]}: shape {list(first.shape)}, expected [batch, seq_len]"
            )
        seq = first.shape[1]
        if not 1 <= seq <= self.max_seq_length:
            raise BadRequest(
                f"{INPUT_NAMES[0]}: sequence length {seq} outside [1, {self.max_seq_length}]"
            )
        return arrays

    def _in_range(self, arrays: dict[str, np.ndarray]) -> bool:
        """True when every id is inside its codebook and the mask is 0/1: one reduction per
        input (as uint64 a negative value is huge, so ``max < size`` checks both ends)."""
        for name, size in zip(ID_NAMES, self.codebook_sizes, strict=True):
            if arrays[name].view(np.uint64).max() >= size:
                return False
        return bool(arrays["attention_mask"].view(np.uint64).max() <= 1)

    def _check_values(self, arrays: dict[str, np.ndarray]) -> None:
        """Raises BadRequest naming the first id outside its codebook or mask value not 0/1."""
        for name, size in zip(ID_NAMES, self.codebook_sizes, strict=True):
            a = arrays[name]
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= size:
                bad = lo if lo < 0 else hi
                where = np.argwhere(a == bad)[0].tolist()
                raise BadRequest(f"{name}: id {bad} at {where} is outside its codebook [0, {size})")
        mask = arrays["attention_mask"]
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi > 1:
            bad = lo if lo < 0 else hi
            where = np.argwhere(mask == bad)[0].tolist()
            raise BadRequest(
                f"attention_mask: value {bad} at {where}; only 0 (padding) and 1 (item) are allowed"
            )

    @staticmethod
    def _pad(batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0]
        rows = sum(a[INPUT_NAMES[0]].shape[0] for a in batch)
        longest = max(a[INPUT_NAMES[0]].shape[1] for a in batch)
        out = {n: np.zeros((rows, longest), dtype=np.int64) for n in INPUT_NAMES}
        row = 0
        for arrays in batch:
            b, s = arrays[INPUT_NAMES[0]].shape
            for n in INPUT_NAMES:
                out[n][row : row + b, :s] = arrays[n]
            row += b
        return out

    def _valid_batch(self, good: list, responses: list) -> dict[str, np.ndarray] | None:
        """The padded batch of the requests in ``good`` whose values are valid; the others are
        answered (INVALID_ARG) and dropped from ``good``. The padding (0) is a valid id and mask
        value, so one check of the padded batch clears every request; only when it fails is
        each request checked on its own, to answer the bad ones alone."""
        padded = self._pad([arrays for _, arrays in good])
        if self._in_range(padded):
            return padded
        self._keep_valid(good, responses)
        return self._pad([arrays for _, arrays in good]) if good else None

    def _keep_valid(self, good: list, responses: list) -> None:
        """Check each request of ``good`` alone: answer the bad ones (INVALID_ARG) and drop
        them from ``good``."""
        kept = []
        for i, arrays in good:
            try:
                self._check_values(arrays)
                kept.append((i, arrays))
            except BadRequest as e:
                responses[i] = _error(str(e))
        good[:] = kept

    def execute(self, requests):
        clock = _Clock() if self.phases else None
        responses = [None] * len(requests)
        good: list[tuple[int, dict]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, self._read(request)))
            except BadRequest as e:
                responses[i] = _error(str(e))
        if not good:
            return responses
        # pipelined: queued on the GPU, answered later through the response senders
        if self.pipeline is not None:
            return self.pipeline.submit(requests, good, responses, clock)
        # A runner with infer_batch (torch: GpuEngine or eager) takes the whole dynamic batch
        # flat and combines the lengths itself: packed (no padding) or padded, per its batching.
        if getattr(self.runner, "infer_batch", None) is not None:
            return self._execute_flat(good, responses, clock)
        padded = self._valid_batch(good, responses)
        if not good:
            return responses
        try:
            result = self.runner.infer(padded)
        except Exception as e:  # the runtime failed: every request of this run gets the reason
            self._failed(e, good, responses)
            return responses
        rows = [arrays[INPUT_NAMES[0]].shape[0] for _, arrays in good]
        self._respond(good, rows, result["recommendations"], result["scores"], responses)
        return responses

    def _respond(self, good: list, rows, recs, scores, responses: list) -> None:
        """Answer each request of ``good`` with its ``rows`` rows of the batch's outputs."""
        for (i, _), answer in zip(good, self._answers(rows, recs, scores), strict=True):
            responses[i] = answer

    def _answers(self, rows, recs, scores) -> list:
        """One response per request of ``rows`` rows each: one conversion per output for the
        batch (a no-op for int64 / fp32 outputs), then row slices of a C-contiguous array,
        which copy nothing."""
        recs_rows = self._row_tensors("recommendations", np.ascontiguousarray(recs, np.int64))
        scores_rows = self._row_tensors("scores", np.ascontiguousarray(scores, np.float32))
        response, start, out = pb_utils.InferenceResponse, 0, []
        for n in rows:
            end = start + n
            out.append(response(output_tensors=[recs_rows(start, end), scores_rows(start, end)]))
            start = end
        return out

    def _failed(self, e: Exception, good: list, responses: list) -> None:
        answer = _inference_failed(self.name, e)
        for i, _ in good:
            responses[i] = answer

    def _valid_flat(self, good: list, responses: list):
        """``runtime.gpu.batch.FlatBatch`` of the requests in ``good`` whose values are valid (one
        concatenate per input, one range check per input over the whole batch); as in
        ``_valid_batch``, each request is checked alone only when that fails."""
        global _FLAT_BATCH
        if _FLAT_BATCH is None:
            from algorithm.serving.runtime.gpu.batch import FlatBatch as _FLAT_BATCH
        FlatBatch = _FLAT_BATCH
        # _read checked dtype and shapes: no second look at them
        batch = FlatBatch.from_requests([arrays for _, arrays in good], validate=False)
        if self._in_range(dict(zip(INPUT_NAMES, batch.values, strict=True))):
            batch.checked = True
            return batch
        self._keep_valid(good, responses)
        if not good:
            return None
        return FlatBatch.from_requests([arrays for _, arrays in good], True, validate=False)

    def _checked_flat(self, good: list, responses: list, clock: _Clock | None):
        """``_valid_flat`` with the clock's "read" and "check" laps (None: no good request)."""
        if clock:
            clock.lap("read")
        batch = self._valid_flat(good, responses)
        if batch is not None and clock:
            clock.lap("check")
        return batch

    def _execute_flat(self, good: list, responses: list, clock: _Clock | None):
        """The whole dynamic batch at once: validated together, one runner call, the responses
        row slices of one host array per output."""
        batch = self._checked_flat(good, responses, clock)
        if batch is None:
            return responses
        try:
            recs, scores = self.runner.infer_batch(batch)
        except Exception as e:  # the runtime failed: every request of this run gets the reason
            self._failed(e, good, responses)
            return responses
        if clock:
            clock.lap("infer")
        self._respond(good, batch.rows.tolist(), recs, scores, responses)
        if clock:
            clock.lap("respond")
            self.phases.add(clock, len(good), getattr(self.runner, "engine", None))
        return responses

    def finalize(self):
        if self.pipeline is not None:
            self.pipeline.close()  # the batches in flight are answered first
        if self.phases is not None:
            self.phases.close()
        self.runner = None


def _merged_clock(clocks: list, now: float) -> _Clock | None:
    """One clock for batches merged by the launcher: their read and check laps summed, then
    from ``now`` on the merged batch's own laps (None when the phases are not recorded)."""
    if not clocks or clocks[0] is None:
        return None
    merged = _Clock()
    for c in clocks:
        for k, v in c.laps.items():
            merged.laps[k] = merged.laps.get(k, 0.0) + v
    merged.t = now
    return merged


class _Pipeline:
    """Batches queued on the GPU, answered by one thread in the order they were queued (one
    stream: they finish in that order). A response sender's send() is a round trip to the
    backend process (~0.3-0.5 ms on an H100 host, measured: gpu_issue14_h100_run3.json) during
    which the GIL is free, so the sends go out on ``senders`` threads at once; the backend
    takes them on its own thread pool (32 threads by default).

    ``merge`` (continuous batching): execute() leaves its checked batch here and returns; the
    launcher thread waits for a slot, then takes every batch left so far (up to the model's
    ``max_batch_size`` rows, the rest waits for the next slot) and queues them as one. Once a
    full batch is waiting, execute() waits too, so the requests behind it stay in Triton's queue,
    where its queue policy (``max_queue_size``, timeouts) still applies."""

    def __init__(self, model: TritonPythonModel, depth: int, senders: int = 8, merge=False):
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.depth, self.merge = model, depth, merge
        self.slots = threading.BoundedSemaphore(depth)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="ugt-send")
        self.thread = threading.Thread(target=self._answer_loop, name="ugt-answers", daemon=True)
        self.thread.start()
        self.left: list = []  # merge: (batch, senders, clock, rows) not launched yet
        self.left_rows = 0  # their rows
        self.max_rows = getattr(model, "max_batch_size", 0) or 0  # one merged batch's (0: any)
        self.left_cap = self.max_rows or 64  # execute() waits while this many rows are left
        self.left_cond = threading.Condition()
        self.closing = False
        self.launcher = None
        if merge:
            self.launcher = threading.Thread(
                target=self._launch_loop, name="ugt-launch", daemon=True
            )
            self.launcher.start()

    def describe(self) -> str:
        return f"depth {self.depth}" + (", continuous batching" if self.merge else "")

    def submit(self, requests, good: list, responses: list, clock: _Clock | None):
        """Validate, wait for a slot, queue the batch on the GPU; the requests of ``good`` are
        answered later (their entries stay None), bad ones now (in the returned list). With
        ``merge`` the batch is left for the launcher instead (no wait)."""
        model = self.model
        batch = model._checked_flat(good, responses, clock)
        if batch is None:
            return responses
        # the senders must be taken inside execute(): the requests are gone after it returns
        senders = [requests[i].get_response_sender() for i, _ in good]
        if self.merge:
            with self.left_cond:
                while self.left_rows >= self.left_cap and not self.closing:
                    self.left_cond.wait()  # a full batch is waiting already: back-pressure
                rows = int(batch.rows.sum())
                self.left.append((batch, senders, clock, rows))
                self.left_rows += rows
                self.left_cond.notify_all()
            return responses if any(r is not None for r in responses) else None
        self.slots.acquire()
        if clock:
            clock.lap("wait_slot")
        try:
            pending = model.runner.infer_batch_async(batch)
        except Exception as e:  # the runtime failed: every request of this batch gets the reason
            self.slots.release()
            model._failed(e, good, responses)
            return responses
        if clock:
            clock.lap("launch")
        self.queue.put((pending, senders, batch.rows.tolist(), clock))
        return responses if any(r is not None for r in responses) else None

    def _take_left(self) -> list:
        """The batches left so far, oldest first, up to ``max_batch_size`` rows (always one)."""
        limit = self.max_rows
        with self.left_cond:
            rows, n = 0, 0
            for *_, batch_rows in self.left:
                if n and limit and rows + batch_rows > limit:
                    break
                rows, n = rows + batch_rows, n + 1
            taken, self.left[:] = self.left[:n], self.left[n:]
            self.left_rows -= rows
            self.left_cond.notify_all()  # an execute() waiting for room may go on
        return taken

    def _launch_loop(self) -> None:
        model = self.model
        while True:
            with self.left_cond:
                while not self.left and not self.closing:
                    self.left_cond.wait()
                if not self.left:  # closing, nothing left
                    return
            self.slots.acquire()
            now = time.perf_counter()
            taken = self._take_left()
            clock = _merged_clock([c for _, _, c, _ in taken], now)
            senders = [s for _, group, _, _ in taken for s in group]
            try:
                batch = taken[0][0]
                if len(taken) > 1:
                    batch = type(batch).concat([b for b, *_ in taken])
                pending = model.runner.infer_batch_async(batch)
            except Exception as e:  # every request of the merged batch gets the reason
                self.slots.release()
                error = _inference_failed(model.name, e)
                for sender in senders:
                    self.pool.submit(self._send, sender, error)
                continue
            if clock:
                clock.lap("launch")
            self.queue.put((pending, senders, batch.rows.tolist(), clock))

    def _answer_loop(self) -> None:
        model, sending = self.model, None
        while True:
            item = self.queue.get()
            if item is None:
                self._finish(sending)
                return
            pending, senders, rows, clock = item
            if clock:
                clock.t = time.perf_counter()
            try:
                recs, scores = pending.result()
                if clock:
                    clock.lap("wait_gpu")
                answers = model._answers(rows, recs, scores)
            except Exception as e:
                answers = [_inference_failed(model.name, e)] * len(senders)
            finally:
                self.slots.release()  # the GPU is done with it: the next batch may go
            if clock:
                clock.lap("answer")
            futures = [
                self.pool.submit(self._send, s, a) for s, a in zip(senders, answers, strict=True)
            ]
            # at most two batches' sends out at once: this one's and the one before
            self._finish(sending)
            sending = (futures, clock)

    def _send(self, sender, answer) -> float:
        t = time.perf_counter()
        try:
            sender.send(answer, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # the client is gone, or the server is stopping
            _log("warn", f"{self.model.name}: a response could not be sent: {e}")
        return time.perf_counter() - t

    def _finish(self, sending) -> None:
        """Wait for a batch's sends; its phases get their time summed over the send threads."""
        if sending is None:
            return
        futures, clock = sending
        spent = sum(f.result() for f in futures)
        model = self.model
        if clock and model.phases is not None:
            clock.laps["send"] = clock.laps.get("send", 0.0) + spent
            model.phases.add(clock, len(futures), getattr(model.runner, "engine", None))

    def close(self, timeout_s: float = 60.0) -> None:
        if self.launcher is not None:  # what was left is launched (and answered) first
            with self.left_cond:
                self.closing = True
                self.left_cond.notify()
            self.launcher.join(timeout_s)
        self.queue.put(None)
        self.thread.join(timeout_s)
        self.pool.shutdown(wait=True)
