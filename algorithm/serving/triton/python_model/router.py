"""Triton python-backend router of an A/B test or shadow run (shipped as a router's model.py).

The router model takes the arms' inputs plus ``user_id`` (BYTES, [batch, 1]) and answers with
the serving arm's outputs plus ``arm`` (BYTES, [batch, 1]: the model name that answered each
row). It computes nothing itself: each request goes to the arm models through BLS
(``pb_utils.InferenceRequest(...).exec()``), so every client (gRPC, HTTP, curl) is routed the
same way and the arms keep their own dynamic batching, instances and statistics.

The experiment is the config's ``parameters`` (``ExperimentConfig``); the arm of a user is
``traffic.bucket`` of the user id, the same function the client-side ``ABTestingRouter`` uses.

Nothing in the router waits for anything but the arm that answers:

- ``execute`` hands each request to a thread of this instance and returns at once; the thread
  makes the BLS call and sends the answer through the request's response sender (allowed for a
  non-decoupled model: exactly one response, flagged final). So requests in flight overlap
  and reach the arm's dynamic batcher together, as if the clients called the arm directly.
- Shadow mode: A's answer is sent first. Only then are the mirrored rows (inputs and A's
  outputs, copied) put on a bounded queue that two shadow threads drain: B's call (with its own
  timeout), the comparison (``verify.parity.compare_outputs``), the counters. A failing or slow
  B fills that queue at worst; further mirrors are dropped and counted, and A never waits.

Counters and latency histograms go to Triton's metrics endpoint (custom metrics, shared by the
router's instances and kept across a reload): ``ugt_router_*``, read by ``ugt-serving abtest``.
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
    router's instances; a label set's metric is created once and cached)."""

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
        self._lock = threading.Lock()

    def _get(self, family: str, **labels):
        key = (family, *sorted(labels.items()))
        m = self._metrics.get(key)
        if m is None:
            with self._lock:
                m = self._metrics.get(key)
                if m is None:
                    kw = {"buckets": LATENCY_BUCKETS_US} if family == "latency" else {}
                    m = self.families[family].Metric(labels={"router": self.router, **labels}, **kw)
                    self._metrics[key] = m
        return m

    def call(self, arm: str, model: str, path: str, outcome: str, users: int, us: float):
        labels = {"arm": arm, "model": model, "path": path}
        self._get("requests", outcome=outcome, **labels).increment(1)
        if outcome == "success":
            self._get("users", **labels).increment(users)
            self._get("latency", **labels).observe(us)

    def dropped(self, model: str):
        self._get("requests", arm="b", model=model, path="shadow", outcome="dropped").increment(1)

    def compared(self, report: dict):
        n = report["users"]
        for stat, value in (
            ("users", n),
            ("recall_overlap", report["recall_overlap"] * n),
            ("top1_agreement", report["top1_agreement"] * n),
            ("mean_score_diff", report["mean_score_diff"] * n),
        ):
            self._get("shadow", stat=stat).increment(float(value))


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
        # Each request is answered by its own thread through its response sender; returning
        # None tells the backend so. execute itself never waits for an arm.
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

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

    def _call(self, model: str, inputs: list, timeout_us: int = 0):
        kw = {"timeout": timeout_us} if timeout_us else {}
        return pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=self.output_names,
            inputs=inputs,
            **kw,
        ).exec()

    def _serve(self, request) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            response, mirror = self._route(request)
        except BadRequest as e:
            response, mirror = _error_response(str(e), _code("INVALID_ARG")), None
        except Exception as e:  # a bug or a dead arm: this request fails alone, with the reason
            pb_utils.Logger.log_error(f"{self.name}: {type(e).__name__}: {e}")
            response, mirror = _error_response(f"router {self.name}: {type(e).__name__}: {e}"), None
        sender.send(response, flags=final)
        if mirror is not None:
            self._enqueue(*mirror)

    def _route(self, request):
        """(response, mirror or None): the arms' answer for every row, and what to mirror."""
        tensors = {t.name(): t for t in request.inputs()}
        first = tensors.get(self.input_names[0])
        if first is None:
            raise BadRequest(f"{self.input_names[0]}: missing")
        rows = int(first.shape()[0])
        keys = self._user_ids(tensors, rows)
        to_b, mirror = self._plan(keys)
        arms = ("b",) if to_b.all() else ("a",) if not to_b.any() else ("a", "b")
        answers = {}
        for arm in arms:
            idx = None if len(arms) == 1 else np.flatnonzero(to_b == (arm == "b"))
            inputs = [tensors[n] for n in self.input_names]
            if idx is not None:
                inputs = [pb_utils.Tensor(t.name(), t.as_numpy()[idx]) for t in inputs]
            t0 = time.perf_counter()
            answer = self._call(self.arms[arm], inputs)
            us = (time.perf_counter() - t0) * 1e6
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
            {n: np.array(tensors[n].as_numpy()[idx]) for n in self.input_names},
            {n: np.array(t.as_numpy()[idx]) for n, t in a.items()},
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
                answer = self._call(
                    model, [pb_utils.Tensor(n, a) for n, a in inputs.items()], timeout_us
                )
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
        with contextlib.suppress(queue.Empty):
            while True:
                self.mirrors.get_nowait()
        for _ in self.shadow_threads:
            with contextlib.suppress(queue.Full):
                self.mirrors.put_nowait(None)
        for t in self.shadow_threads:
            t.join(timeout=self.exp.shadow_timeout_ms / 1000 + 1)
