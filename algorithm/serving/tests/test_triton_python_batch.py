"""The python-backend model's by-batch path (torch runner: GpuEngine or eager) without a server.

A stand-in for ``triton_python_backend_utils`` carries tensors both ways (numpy and DLPack), so
``execute()`` runs exactly as in the stub: a dynamic batch is validated at once, bad requests
still fail alone with the same INVALID_ARG messages, and every good one gets its own answer.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.gpu.engine import EngineConfig
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.triton.python_model.standin import (
    Request,
    answered,
    model_py_module,
    served_model,
)
from algorithm.serving.verify.parity import compare_outputs
from algorithm.ugt import UGTConfig, UGTModel, random_inputs

SMALL = UGTConfig.tiny(codebook_sizes=(64, 128, 256), num_recommendations=10, max_seq_length=64)


@pytest.fixture(scope="module")
def model_py():
    with model_py_module("ugt_triton_model_under_test") as module:
        yield module


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UGTModel(SMALL).eval()
    with torch.no_grad():
        for h in m.heads:
            h.weight.mul_(50)  # scores far from ties
    return m


def _served(model_py, runner, dlpack=False, phase_dir=None, pipeline_depth=0, **options):
    phases = Path(phase_dir) / "ugt.json" if phase_dir else None
    return served_model(
        model_py,
        runner,
        SMALL.max_seq_length,
        SMALL.codebook_sizes,
        dlpack,
        phases,
        pipeline_depth=pipeline_depth,
        **options,
    )


def _reference(model, req):
    with torch.inference_mode():
        recs, scores = model(*(torch.as_tensor(req[k]) for k in INPUT_NAMES))
    return {"recommendations": recs.numpy(), "scores": scores.numpy()}


def _batch(rng):
    good = [random_inputs(1, n, SMALL.codebook_sizes, rng) for n in (5, 12, 30, 64)]
    good.append(random_inputs(2, 9, SMALL.codebook_sizes, rng, ragged=True))
    good[1]["attention_mask"][0, :3] = 0  # padding in front
    bad_id = random_inputs(1, 10, SMALL.codebook_sizes, rng)
    bad_id["encoder_l3_ids"][0, 4] = 256
    bad_neg = random_inputs(1, 7, SMALL.codebook_sizes, rng)
    bad_neg["encoder_l1_ids"][0, 2] = -1
    bad_mask = random_inputs(1, 6, SMALL.codebook_sizes, rng)
    bad_mask["attention_mask"][0, 2] = 2
    too_long = random_inputs(1, 65, SMALL.codebook_sizes, rng)
    wrong_dtype = {
        k: v.astype(np.int32) for k, v in random_inputs(1, 4, (64, 128, 256), rng).items()
    }
    missing = {
        k: v for k, v in random_inputs(1, 4, (64, 128, 256), rng).items() if k != "attention_mask"
    }
    requests = [good[0], bad_id, good[1], bad_mask, good[2], too_long, bad_neg, good[3]]
    requests += [wrong_dtype, good[4], missing]
    expected_errors = {
        1: "encoder_l3_ids: id 256 at [0, 4] is outside its codebook [0, 256)",
        3: "attention_mask: value 2 at [0, 2]; only 0 (padding) and 1 (item) are allowed",
        5: "sequence length 65 outside [1, 64]",
        6: "encoder_l1_ids: id -1 at [0, 2] is outside its codebook [0, 64)",
        8: "dtype int32, expected int64",
        10: "attention_mask: missing",
    }
    return requests, expected_errors


@pytest.mark.parametrize(
    "runner_kind,dlpack,depth",
    [
        ("packed", False, 0),
        ("packed", True, 0),
        ("pad", True, 0),
        ("eager", False, 0),
        ("packed", True, 2),  # pipelined: good requests answered by the second thread
        ("eager", False, 1),
    ],
)
def test_a_batch_is_checked_at_once_and_bad_requests_fail_alone(
    model_py, model, rng, runner_kind, dlpack, depth
):
    if runner_kind == "eager":
        runner = TorchRunner(model)
    else:
        batching = "length_aware" if runner_kind == "packed" else "pad"
        runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"), batching=batching)
    requests, expected_errors = _batch(rng)
    served = _served(model_py, runner, dlpack, pipeline_depth=depth)
    triton_requests = [Request(r) for r in requests]
    returned = served.execute(triton_requests)
    if depth:  # the bad ones in the returned list, the good ones through their senders
        assert [i for i, r in enumerate(returned) if r is not None] == sorted(expected_errors)
    responses = answered(triton_requests, returned)
    served.finalize()
    assert len(responses) == len(requests)
    for i, (req, resp) in enumerate(zip(requests, responses, strict=True)):
        if i in expected_errors:
            assert resp.error is not None and resp.error.code == "INVALID_ARG", i
            assert expected_errors[i] in resp.error.message, (i, resp.error.message)
            continue
        assert resp.error is None, (i, resp.error and resp.error.message)
        out = resp.outputs
        rows = req["attention_mask"].shape[0]
        assert out["recommendations"].shape == (rows, SMALL.num_recommendations, 3)
        assert out["recommendations"].dtype == np.int64 and out["scores"].dtype == np.float32
        report = compare_outputs(_reference(model, req), out)
        assert report["exact_match_rate"] == 1.0 and report["max_score_diff"] < 1e-4, (i, report)


def test_a_valid_batch_takes_one_runner_call_and_phases_are_recorded(
    model_py, model, rng, tmp_path
):
    runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"))
    calls = []
    infer_batch = runner.infer_batch

    def counting(batch):
        calls.append((batch.checked, batch.rows.tolist(), batch.seq.tolist()))
        return infer_batch(batch)

    runner.infer_batch = counting
    served = _served(model_py, runner, dlpack=True, phase_dir=tmp_path)
    reqs = [random_inputs(1, n, SMALL.codebook_sizes, rng) for n in (3, 64, 17)]
    responses = served.execute([Request(r) for r in reqs])
    assert all(r.error is None for r in responses)
    assert calls == [(True, [1, 1, 1], [3, 64, 17])]
    stats = json.loads((tmp_path / "ugt.json").read_text())
    assert stats["batches"] == 1 and stats["requests"] == 3 and stats["eager_runs"] == 0
    assert stats["rounded_up"] == 0
    assert set(stats["seconds"]) == {"read", "check", "infer", "respond"}
    # the collector's passes in this process are counted (a full one here), until finalize()
    before = stats["gc"]["collections"][2]
    gc.collect()
    served.finalize()
    stats = json.loads((tmp_path / "ugt.json").read_text())
    assert stats["gc"]["collections"][2] == before + 1 and stats["gc"]["seconds"][2] > 0
    gc.collect()
    assert json.loads((tmp_path / "ugt.json").read_text())["gc"] == stats["gc"]
    assert served.phases._gc_callback not in gc.callbacks


def test_a_failing_runner_answers_every_request_with_the_reason(model_py, model, rng):
    runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"))

    def broken(batch):
        raise RuntimeError("device lost")

    runner.infer_batch = broken
    reqs = [random_inputs(1, n, SMALL.codebook_sizes, rng) for n in (3, 8)]
    responses = _served(model_py, runner).execute([Request(r) for r in reqs])
    assert len(responses) == len(reqs)
    for r in responses:
        assert r.error.code == "INTERNAL" and "RuntimeError: device lost" in r.error.message


def test_pipelined_batches_are_answered_in_order_and_failures_reach_every_request(
    model_py, model, rng, tmp_path
):
    runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"))
    served = _served(model_py, runner, dlpack=True, phase_dir=tmp_path, pipeline_depth=2)
    batches = [
        [Request(random_inputs(1, n, SMALL.codebook_sizes, rng)) for n in lengths]
        for lengths in ((3, 64, 17), (8,), (40, 2))
    ]
    assert all(served.execute(b) is None for b in batches)  # every request answered later
    for b in batches:
        for req, resp in zip(b, answered(b, None), strict=True):
            arrays = {t.name(): t.as_numpy() for t in req.inputs()}
            report = compare_outputs(_reference(model, arrays), resp.outputs)
            assert report["exact_match_rate"] == 1.0

    # a runner that fails on the device: each request of the batch gets the reason
    class Lost:
        def result(self):
            raise RuntimeError("device lost")

    runner.infer_batch_async = lambda batch: Lost()
    failing = [Request(random_inputs(1, n, SMALL.codebook_sizes, rng)) for n in (5, 6)]
    assert served.execute(failing) is None
    for r in answered(failing, None):
        assert r.error.code == "INTERNAL" and "RuntimeError: device lost" in r.error.message
    served.finalize()
    stats = json.loads((tmp_path / "ugt.json").read_text())
    assert {"read", "check", "wait_slot", "launch", "wait_gpu", "answer", "send"} <= set(
        stats["seconds"]
    )


def test_a_pipeline_needs_a_runner_that_can_queue_a_batch(model_py, model):
    class Blocking:
        name = "onnxruntime"

        def infer(self, inputs):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="set pipeline_depth to 0"):
        _served(model_py, Blocking(), pipeline_depth=2)
    with pytest.raises(ValueError, match="whole number"):
        served_model(model_py, TorchRunner(model), 64, SMALL.codebook_sizes, pipeline_depth="x")


def _check_answers(model, requests, responses):
    for req, resp in zip(requests, responses, strict=True):
        assert resp.error is None, resp.error and resp.error.message
        arrays = {t.name(): t.as_numpy() for t in req.inputs()}
        report = compare_outputs(_reference(model, arrays), resp.outputs)
        assert report["exact_match_rate"] == 1.0, report


def test_continuous_batching_merges_what_came_while_the_gpu_was_busy(
    model_py, model, rng, tmp_path
):
    """execute() returns at once; what came while a batch was on the "GPU" (held here until
    the gate opens) goes as one batch when the slot frees, up to max_batch_size rows."""
    runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"))
    queue_on_device, gate, launched = runner.infer_batch_async, threading.Event(), []

    class Held:  # the batch "runs" until the gate opens
        def __init__(self, pending):
            self.pending = pending

        def result(self):
            assert gate.wait(60)
            return self.pending.result()

    def launch(batch):
        launched.append(batch.rows.tolist())
        return Held(queue_on_device(batch))

    runner.infer_batch_async = launch
    served = _served(
        model_py, runner, True, tmp_path, 1, continuous_batching=True, max_batch_size=4
    )
    first = [Request(random_inputs(1, 9, SMALL.codebook_sizes, rng))]
    assert served.execute(first) is None
    deadline = time.monotonic() + 60
    while not launched and time.monotonic() < deadline:
        time.sleep(0.01)
    assert launched == [[1]]  # a lone request goes at once: no delay waited out
    later = [
        [Request(random_inputs(rows, n, SMALL.codebook_sizes, rng, ragged=True))]
        for rows, n in ((1, 3), (1, 64), (1, 17), (2, 30))
    ]
    for requests in later:
        assert served.execute(requests) is None  # no wait for the busy slot
    assert launched == [[1]]
    # 5 rows wait now, more than a full batch (4): the next execute() waits for room, so what
    # comes after it stays in Triton's queue, under Triton's queue policy
    last = [Request(random_inputs(1, 5, SMALL.codebook_sizes, rng))]
    back = threading.Event()
    waiting = threading.Thread(target=lambda: (served.execute(last), back.set()))
    waiting.start()
    assert not back.wait(0.3)  # held while the "GPU" is busy and a full batch waits
    gate.set()
    waiting.join(60)
    assert back.is_set()
    _check_answers(model, first, answered(first, None))
    for requests in later + [last]:
        _check_answers(model, requests, answered(requests, None))
    served.finalize()
    # the three that came meanwhile as one batch (3 rows; the fourth would make 5 > 4), then
    # the rest (one batch, or two when the launcher got there before the last one was left)
    assert launched[:2] == [[1], [1, 1, 1]] and sum(launched[2:], []) == [2, 1]
    stats = json.loads((tmp_path / "ugt.json").read_text())
    assert stats["batches"] == len(launched) and stats["requests"] == 6
    assert {"read", "check", "launch", "wait_gpu", "answer", "send"} <= set(stats["seconds"])
    # the runner's own steps of each launch (profiling: the GPU benchmark reports them)
    launch = stats["launch_seconds"]
    assert launch["layout"] > 0 and launch["run"] > 0


def test_continuous_batching_failures_reach_every_request_and_bad_ones_fail_alone(
    model_py, model, rng
):
    runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"))
    served = _served(model_py, runner, pipeline_depth=2, continuous_batching=True)
    requests, expected_errors = _batch(rng)
    triton_requests = [Request(r) for r in requests]
    returned = served.execute(triton_requests)
    assert [i for i, r in enumerate(returned) if r is not None] == sorted(expected_errors)
    for i, resp in enumerate(answered(triton_requests, returned)):
        if i in expected_errors:
            assert resp.error.code == "INVALID_ARG" and expected_errors[i] in resp.error.message
        else:
            _check_answers(model, [triton_requests[i]], [resp])

    def lost(batch):
        raise RuntimeError("device lost")

    runner.infer_batch_async = lost
    failing = [Request(random_inputs(1, n, SMALL.codebook_sizes, rng)) for n in (5, 6)]
    assert served.execute(failing) is None
    for r in answered(failing, None):
        assert r.error.code == "INTERNAL" and "RuntimeError: device lost" in r.error.message
    served.finalize()


def test_continuous_batching_needs_a_pipeline(model_py, model):
    with pytest.raises(ValueError, match="set pipeline_depth to 1"):
        _served(model_py, TorchRunner(model), continuous_batching=True)
    with pytest.raises(ValueError, match="true or false"):
        _served(model_py, TorchRunner(model), pipeline_depth=1, continuous_batching="maybe")


def test_the_gil_switch_interval_parameter(model_py):
    import sys

    before = sys.getswitchinterval()
    try:
        model_py._set_switch_interval("")  # unset: Python's own
        assert sys.getswitchinterval() == before
        model_py._set_switch_interval("250")
        assert sys.getswitchinterval() == pytest.approx(250e-6)
        for bad in ("fast", "0", "1e9"):
            with pytest.raises(ValueError, match="gil_switch_interval_us"):
                model_py._set_switch_interval(bad)
    finally:
        sys.setswitchinterval(before)
