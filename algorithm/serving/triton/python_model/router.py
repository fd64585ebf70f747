"""Triton python-backend router of an A/B test or shadow run (shipped as a router's model.py).

The router model takes the arms' inputs plus ``user_id`` (BYTES, [batch, 1]) and answers with
the serving arm's outputs plus ``arm`` (BYTES, [batch, 1]: the model name that answered each
row). It computes nothing itself: each request goes to the arm models through BLS
(``pb_utils.InferenceRequest(...).exec()``), so every client (gRPC, HTTP, curl) is routed the
same way and the arms keep their own dynamic batching, instances and statistics.

The experiment is the config's ``parameters`` (``ExperimentConfig``); the arm of a user is
``traffic.bucket`` of the user id, the same function the client-side ``ABTestingRouter`` uses.

Nothing in the router waits for anything but the arm that answers:

- The router's dynamic batcher hands ``execute`` every request that queued meanwhile; each
  goes to a thread of this instance that makes its BLS call and sends the answer through the
  request's response sender (allowed for a non-decoupled model: exactly one response, flagged
  final) as soon as its arm answers. The calls of one execute reach the arms' batchers
  together, as if the clients called the arms directly. ``execute`` returns once every answer
  is sent: answering after it returned raced with the next execute inside the python backend
  and crashed the server (seen, Triton 2.51), so a request arriving meanwhile waits for the
  slowest answer of the current batch (``instance_count`` > 1 overlaps batches).
- Shadow mode: A's answer is sent first. Only then are the mirrored rows (inputs and A's
  outputs, copied) put on a bounded queue that two shadow threads drain: B's call (with its own
  timeout, which B's queue applies when its queue policy allows it), the comparison
  (``verify.parity.compare_outputs``), the counters. A failing or slow B fills that queue at
  worst; further mirrors are dropped and counted, and A never waits.

Counters and latency histograms go to Triton's metrics endpoint (custom metrics, shared by the
router's instances and kept across a reload; handed over by one thread every 0.2 s):
``ugt_router_*``, read by ``ugt-serving abtest``.
A request the router cannot route (user_id of the wrong shape, empty, too long, not UTF-8) gets
INVALID_ARG naming the problem; an arm's error goes back with the arm's code, named.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from algorithm.serving.config import ExperimentConfig
from algorithm.serving.traffic import ARM_OUTPUT, USER_ID_INPUT, UserIdError, bucket, user_key

ARM_MAX_BATCH = "arm_max_batch_size"  # parameter: the most histories the arms take at once

#: Latency histogram bounds (microseconds): a factor of 1.25 from 100 us to 60 s, so a
#: percentile read from the buckets is off by at most one bucket's width (~25 %).
LATENCY_BUCKETS_US = [round(100.0 * 1.25**i, 1) for i in range(60)]
_SHADOW_THREADS = 2
_UNAVAILABLE_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


class BadRequest(ValueError):
    """A request the router cannot route; the message goes back with INVALID_ARG."""


def _code(name: str):
    return getattr(pb_utils.TritonError, name, None)


def _error_response(message: str, code=None):
    code = code if code is not None else _code("INTERNAL")
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class _Metrics:
    """The router's counters on Triton's metrics endpoint (one family per name, shared by the
    router's instances; a label set's metric is created once and cached).

    Requests only add to Python dicts; one thread hands the sums to Triton every
    ``FLUSH_S`` (and at finalize): metric calls from several threads at once crashed the server
    (seen, Triton 2.51), and each call is an IPC round trip that has no place on a request's
    path. So the counters trail the requests by up to ``FLUSH_S``."""

    FLUSH_S = 0.2

    def __init__(self, router: str):
        family, counter, histogram = (
            pb_utils.MetricFamily,
            pb_utils.MetricFamily.COUNTER,
            pb_utils.MetricFamily.HISTOGRAM,
        )
        self.router = router
        self.families = {
            "requests": family(
                "ugt_router_requests_total",
                "Requests the router sent to an arm, by arm, path (served/shadow) and outcome",
                counter,
            ),
            "users": family(
                "ugt_router_users_total", "Rows (users) the router sent to an arm", counter
            ),
            "latency": family(
                "ugt_router_latency_us",
                "Time of the router's call to an arm (microseconds), by arm and path",
                histogram,
            ),
            "shadow": family(
                "ugt_router_shadow_sum",
                "Shadow comparison of B against A: users compared and the sums of their "
                "recall@K overlap, top-1 agreement and mean |score difference|",
                counter,
            ),
        }
        self._metrics: dict = {}
        self._counts: dict = {}
        self._latencies: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{router}-metrics", daemon=True)
        self._thread.start()

    # -- on the request path: Python only ------------------------------------------------------
    def _add(self, family: str, value: float, **labels) -> None:
        key = (family, tuple(sorted(labels.items())))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + value

    def call(self, arm: str, model: str, path: str, outcome: str, users: int, us: float):
        labels = {"arm": arm, "model": model, "path": path}
        self._add("requests", 1, outcome=outcome, **labels)
        if outcome == "success":
            self._add("users", users, **labels)
            key = ("latency", tuple(sorted(labels.items())))
            with self._lock:
                self._latencies.append((key, us))

    def dropped(self, model: str):
        self._add("requests", 1, arm="b", model=model, path="shadow", outcome="dropped")

    def compared(self, report: dict):
        n = report["users"]
        for stat, value in (
            ("users", n),
            ("recall_overlap", report["recall_overlap"] * n),
            ("top1_agreement", report["top1_agreement"] * n),
            ("mean_score_diff", report["mean_score_diff"] * n),
        ):
            self._add("shadow", float(value), stat=stat)

    # -- the one thread that talks to Triton ---------------------------------------------------
    def _metric(self, key):
        m = self._metrics.get(key)
        if m is None:
            family, labels = key
            kw = {"buckets": LATENCY_BUCKETS_US} if family == "latency" else {}
            m = self.families[family].Metric(labels={"router": self.router, **dict(labels)}, **kw)
            self._metrics[key] = m
        return m

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            latencies, self._latencies = self._latencies, []
        for key, value in counts.items():
            self._metric(key).increment(value)
        for key, us in latencies:
            self._metric(key).observe(us)

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            try:
                self.flush()
            except Exception as e:  # counters are an extra: never let them stop the router
                pb_utils.Logger.log_warn(f"{self.router}: metrics not updated: {e}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.flush()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.name = args.get("model_name", config.get("name", "router"))
        self.exp = ExperimentConfig.from_parameters(params)
        self.salt = self.exp.hash_salt
        self.arms = {"a": self.exp.model_a, "b": self.exp.model_b}
        self.input_names = [i["name"] for i in config["input"] if i["name"] != USER_ID_INPUT]
        self.output_names = [o["name"] for o in config["output"] if o["name"] != ARM_OUTPUT]
        self.metrics = _Metrics(self.name)
        self.pool = ThreadPoolExecutor(self.exp.workers, thread_name_prefix=f"{self.name}-route")
        self.part_pool = ThreadPoolExecutor(self.exp.workers, thread_name_prefix=f"{self.name}-b")
        self.arm_max_batch_size = int(params.get(ARM_MAX_BATCH, config["max_batch_size"]))
        self.mirrors: queue.Queue = queue.Queue(self.exp.shadow_queue)
        self.shadow_threads = [
            threading.Thread(target=self._shadow_loop, name=f"{self.name}-shadow", daemon=True)
            for _ in range(_SHADOW_THREADS)
        ]
        for t in self.shadow_threads:
            t.start()
        pb_utils.Logger.log_info(
            f"{self.name}: {self.exp.mode} {self.exp.status} A={self.exp.model_a} "
            f"B={self.exp.model_b} split={self.exp.traffic_split} "
            f"shadow={self.exp.shadow_fraction} salt={self.salt!r}"
        )

    # -- requests -------------------------------------------------------------------------
    def execute(self, requests):
        # The dynamic batcher hands over every request that queued meanwhile; each goes to its
        # own thread (BLS calls to the arms run concurrently and reach the arms' batchers
        # together) and is answered through its response sender as soon as its arm answers.
        # execute returns (None: the answers went through the senders) once all are sent:
        # answering after execute returned raced with the next execute inside the python
        # backend and crashed the server (seen, Triton 2.51).
        futures = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._read(request)
            except BadRequest as e:
                self._send(sender, _error_response(str(e), _code("INVALID_ARG")))
                continue
            except Exception as e:  # a bug: this request fails alone, with the reason
                pb_utils.Logger.log_error(f"{self.name}: {type(e).__name__}: {e}")
                self._send(sender, _error_response(f"router {self.name}: {e}"))
                continue
            futures.append(self.pool.submit(self._serve, sender, *job))
        for f in futures:
            f.result()  # _serve answers every failure itself
        return None

    @staticmethod
    def _send(sender, response) -> None:
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _read(self, request) -> tuple[dict, list[bytes]]:
        """(the arms' inputs, the user keys): BadRequest when the ids do not fit. The tensors
        are the request's own (valid while execute runs)."""
        tensors = {t.name(): t for t in request.inputs()}
        missing = [n for n in self.input_names if n not in tensors]
        if missing:
            raise BadRequest(
                f"{missing[0]}: missing; the router needs {', '.join(self.input_names)}"
            )
        rows = int(tensors[self.input_names[0]].shape()[0])
        if rows > self.arm_max_batch_size:
            raise BadRequest(
                f"{self.input_names[0]}: batch of {rows} histories; the arms take at most "
                f"{self.arm_max_batch_size} per request"
            )
        return {n: tensors[n] for n in self.input_names}, self._user_ids(tensors, rows)

    def _user_ids(self, tensors: dict, rows: int) -> list[bytes]:
        t = tensors.get(USER_ID_INPUT)
        if t is None:
            raise BadRequest(f"{USER_ID_INPUT}: missing; the router needs one id per history")
        ids = t.as_numpy()
        if ids.shape != (rows, 1):
            raise BadRequest(
                f"{USER_ID_INPUT}: shape {list(ids.shape)}, expected [{rows}, 1] "
                f"(one id per history of {self.input_names[0]})"
            )
        keys = []
        for i, value in enumerate(ids[:, 0]):
            try:
                keys.append(user_key(value))
            except UserIdError as e:
                raise BadRequest(f"{USER_ID_INPUT}: row {i}: {e}") from None
        return keys

    def _plan(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(to_b, mirror): per row, whether B answers it, and whether it is mirrored to B."""
        exp, n = self.exp, len(keys)
        if exp.status != "running":
            return np.full(n, exp.status == "promoted"), np.zeros(n, bool)
        places = np.array([bucket(k, self.salt) for k in keys])
        if exp.mode == "ab":
            return places >= exp.traffic_split, np.zeros(n, bool)
        return np.zeros(n, bool), places >= 1.0 - exp.shadow_fraction

    def _call(self, model: str, inputs: dict, timeout_us: int = 0):
        """BLS call of ``model`` with ``inputs`` (name -> pb_utils.Tensor or numpy array)."""
        kw = {"timeout": timeout_us} if timeout_us else {}
        tensors = [
            t if isinstance(t, pb_utils.Tensor) else pb_utils.Tensor(n, t)
            for n, t in inputs.items()
        ]
        return pb_utils.InferenceRequest(
            model_name=model, requested_output_names=self.output_names, inputs=tensors, **kw
        ).exec()

    def _ask(self, arm: str, tensors: dict, idx):
        """(answer, microseconds) of one arm for the rows ``idx`` (None: all rows)."""
        part = tensors if idx is None else {n: t.as_numpy()[idx] for n, t in tensors.items()}
        t0 = time.perf_counter()
        answer = self._call(self.arms[arm], part)
        return answer, (time.perf_counter() - t0) * 1e6

    def _serve(self, sender, tensors: dict, keys: list[bytes]) -> None:
        try:
            response, mirror = self._route(tensors, keys)
        except Exception as e:  # a bug or a dead arm: this request fails alone, named
            pb_utils.Logger.log_error(f"{self.name}: {type(e).__name__}: {e}")
            response, mirror = _error_response(f"router {self.name}: {e}"), None
        try:
            self._send(sender, response)
        except Exception as e:  # the client is gone: nothing left to answer, nothing to mirror
            pb_utils.Logger.log_warn(f"{self.name}: answer not sent: {e}")
            return
        if mirror is not None:
            self._enqueue(*mirror)

    def _route(self, tensors: dict, keys: list[bytes]):
        """(response, mirror or None): the arms' answer for every row, and what to mirror
        (copies: the shadow threads use them after execute has returned)."""
        rows = len(keys)
        to_b, mirror = self._plan(keys)
        arms = ("b",) if to_b.all() else ("a",) if not to_b.any() else ("a", "b")
        parts = {
            arm: None if len(arms) == 1 else np.flatnonzero(to_b == (arm == "b")) for arm in arms
        }
        # A request whose rows belong to both arms asks them at once (B's part on a thread of
        # its own pool: those threads never wait for anything but B).
        pending = {
            arm: self.part_pool.submit(self._ask, arm, tensors, parts[arm]) for arm in arms[1:]
        }
        calls = {arms[0]: self._ask(arms[0], tensors, parts[arms[0]])}
        calls.update({arm: f.result() for arm, f in pending.items()})
        answers = {}
        for arm in arms:
            idx, (answer, us) = parts[arm], calls[arm]
            users = rows if idx is None else len(idx)
            if answer.has_error():
                self.metrics.call(arm, self.arms[arm], "served", "error", users, us)
                message = answer.error().message()
                return _error_response(f"{self.arms[arm]}: {message}", self._code(message)), None
            self.metrics.call(arm, self.arms[arm], "served", "success", users, us)
            answers[arm] = (idx, answer)
        if len(arms) == 1:
            arm = arms[0]
            served = answers[arm][1].output_tensors()
            names = np.full((rows, 1), self.arms[arm].encode(), dtype=np.object_)
        else:
            served, names = self._merge(answers, rows)
        response = pb_utils.InferenceResponse(
            output_tensors=[*served, pb_utils.Tensor(ARM_OUTPUT, names)]
        )
        if not mirror.any():
            return response, None
        idx = np.flatnonzero(mirror)  # shadow mode: A answered every row
        a = {n: pb_utils.get_output_tensor_by_name(answers["a"][1], n) for n in self.output_names}
        return response, (
            {n: t.as_numpy()[idx] for n, t in tensors.items()},  # indexing copies
            {n: t.as_numpy()[idx] for n, t in a.items()},
        )

    def _code(self, message: str):
        """The error code of an arm's failed answer. A BLS answer's error arrives as INTERNAL
        whatever the arm sent (seen with Triton 2.51), so it is recovered from the message:
        model.py's input errors start with the input's name; Triton's queue policy rejects with
        its fixed texts (UNAVAILABLE, as a direct call would get)."""
        if message.split(":", 1)[0].strip() in self.input_names:
            return _code("INVALID_ARG")
        if any(m in message for m in _UNAVAILABLE_MESSAGES):
            return _code("UNAVAILABLE")
        return _code("INTERNAL")

    def _merge(self, answers: dict, rows: int):
        """One answer from the rows of A and of B, in the request's row order."""
        out, names = {}, np.empty((rows, 1), dtype=np.object_)
        for arm, (idx, answer) in answers.items():
            names[idx, 0] = self.arms[arm].encode()
            for n in self.output_names:
                part = pb_utils.get_output_tensor_by_name(answer, n).as_numpy()
                if n not in out:
                    out[n] = np.empty((rows, *part.shape[1:]), dtype=part.dtype)
                out[n][idx] = part
        return [pb_utils.Tensor(n, a) for n, a in out.items()], names

    # -- shadow ---------------------------------------------------------------------------
    def _enqueue(self, inputs: dict, a_outputs: dict) -> None:
        try:
            self.mirrors.put_nowait((inputs, a_outputs))
        except queue.Full:  # B is behind: drop this mirror rather than wait
            self.metrics.dropped(self.exp.model_b)

    def _shadow_loop(self) -> None:
        timeout_us = self.exp.shadow_timeout_ms * 1000
        model = self.exp.model_b
        while True:
            item = self.mirrors.get()
            if item is None:
                return
            inputs, a_outputs = item
            rows = len(next(iter(inputs.values())))
            t0 = time.perf_counter()
            try:
                answer = self._call(model, inputs, timeout_us)
            except Exception as e:  # B unreachable: counted; A answered long ago
                self.metrics.call("b", model, "shadow", "error", rows, 0.0)
                pb_utils.Logger.log_warn(f"{self.name}: shadow call to {model}: {e}")
                continue
            us = (time.perf_counter() - t0) * 1e6
            if answer.has_error():
                message = answer.error().message()
                late = "timeout" in message.lower() or us > timeout_us
                self.metrics.call("b", model, "shadow", "timeout" if late else "error", rows, us)
                continue
            self.metrics.call("b", model, "shadow", "success", rows, us)
            self._compare(a_outputs, answer)

    def _compare(self, a_outputs: dict, answer) -> None:
        from algorithm.serving.verify.parity import compare_outputs

        b_outputs = {n: pb_utils.get_output_tensor_by_name(answer, n).as_numpy() for n in a_outputs}
        try:
            self.metrics.compared(compare_outputs(a_outputs, b_outputs))
        except Exception as e:  # B answered another shape: the arms are not comparable
            pb_utils.Logger.log_warn(f"{self.name}: shadow answers not comparable: {e}")

    def finalize(self):
        # In-flight requests are answered before the instance goes (a reload swaps instances
        # under load); waiting mirrors are dropped.
        self.pool.shutdown(wait=True)
        self.part_pool.shutdown(wait=True)
        with contextlib.suppress(queue.Empty):
            while True:
                self.mirrors.get_nowait()
        for _ in self.shadow_threads:
            with contextlib.suppress(queue.Full):
                self.mirrors.put_nowait(None)
        for t in self.shadow_threads:
            t.join(timeout=self.exp.shadow_timeout_ms / 1000 + 1)
        self.metrics.close()
