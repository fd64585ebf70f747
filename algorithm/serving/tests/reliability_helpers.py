"""Shared pieces of the reliability tests: a python-backend repository on the tiny ONNX model,
gRPC inputs of any dtype, concurrent requests with bounded waiting, and the server's memory."""

from __future__ import annotations

import threading
import time

import numpy as np

from algorithm.serving import ExportConfig, TritonConfig, TritonConfigGenerator
from algorithm.serving.contract import INPUT_NAMES

CODEBOOKS = (1024, 4096, 16384)
NP_TO_TRITON = {
    np.int64: "INT64",
    np.int32: "INT32",
    np.int8: "INT8",
    np.uint64: "UINT64",
    np.float32: "FP32",
    np.float16: "FP16",
    np.bool_: "BOOL",
}


def python_model(
    repo, onnx_model, name: str, max_batch_size: int = 8, max_seq_length: int = 256, **triton_fields
) -> None:
    """``repo/<name>``: the ONNX export run by model.py on ONNX Runtime, one CPU instance."""
    fields = {
        "platform": "python",
        "instance_kind": "KIND_CPU",
        "instance_count": 1,
        "preferred_batch_sizes": (max_batch_size,),
        "max_queue_delay_us": 2000,
        "runtime_threads": 1,
    }
    fields.update(triton_fields)
    ec = ExportConfig(
        model_name=name,
        max_batch_size=max_batch_size,
        max_seq_length=max_seq_length,
        opt_seq_length=min(32, max_seq_length),
    )
    TritonConfigGenerator(ec, TritonConfig(**fields)).generate(repo, model_file=onnx_model)


def grpc_inputs(arrays: dict[str, np.ndarray]) -> list:
    """InferInputs named as the dict's keys, with each array's own dtype."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, a in arrays.items():
        inp = grpcclient.InferInput(name, list(a.shape), NP_TO_TRITON[a.dtype.type])
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    return inputs


def outputs(result) -> dict[str, np.ndarray]:
    return {
        "recommendations": result.as_numpy("recommendations"),
        "scores": result.as_numpy("scores"),
    }


def fire(client, model: str, requests: list, timeout_s: float = 60.0) -> list:
    """Send every request at once (async gRPC); [(outputs | None, error | None)] in order.

    Each item of ``requests`` is a dict of arrays or a ready list of InferInputs."""
    results: list = [None] * len(requests)
    done = threading.Semaphore(0)
    for i, req in enumerate(requests):

        def callback(result, error, i=i):
            results[i] = (None, error) if error else (outputs(result), None)
            done.release()

        inputs = req if isinstance(req, list) else grpc_inputs(req)
        client.async_infer(model, inputs, callback, client_timeout=timeout_s)
    deadline = time.monotonic() + timeout_s + 5
    for _ in requests:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise AssertionError(
            f"{len(missing)} of {len(requests)} requests got no answer in {timeout_s} s"
        )
    return results


def valid_request(rng: np.random.Generator, batch: int, seq: int, ragged: bool = True) -> dict:
    """Ids inside their codebooks; with ``ragged`` each row keeps a random-length prefix."""
    lengths = rng.integers(1, seq + 1, batch) if ragged else np.full(batch, seq)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    x = {
        f"encoder_l{i + 1}_ids": rng.integers(0, c, (batch, seq), dtype=np.int64) * mask
        for i, c in enumerate(CODEBOOKS)
    }
    x["attention_mask"] = mask
    return {n: x[n] for n in INPUT_NAMES}


def server_processes(server) -> list:
    """psutil processes of tritonserver and its python-backend stubs."""
    import psutil

    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def server_rss(server) -> int:
    """Resident memory (bytes) of tritonserver plus its stubs."""
    import psutil

    total = 0
    for p in server_processes(server):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total
