"""A stand-in for the python backend's ``triton_python_backend_utils``, to run model.py's
``execute()`` without a server: the tests of its by-batch path and ``benchmarks/gpu/host_path.py``
(host microseconds per request). Tensors cross both ways as numpy arrays or through DLPack, as
in the stub; responses keep their tensors and error."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

MODEL_PY = Path(__file__).resolve().parent / "model.py"


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return np.asarray(self._array)

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self._array))

    @staticmethod
    def from_dlpack(name, capsule):
        return Tensor(name, torch.from_dlpack(capsule))  # no copy: the stub's cost is not ours


# pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL (tritonserver.h: TRITONSERVER_ResponseCompleteFlag)
COMPLETE_FINAL = 1


class ResponseSender:
    """``InferenceResponseSender`` of a default (non-decoupled) model, as the stub checks it
    (python_backend response_sender.cc): exactly one response, sent with the final flag; the
    response (or the failure to send it) is kept, and ``done`` is set once it is sent."""

    def __init__(self):
        import threading

        self.response, self.flags, self.done = None, None, threading.Event()

    def send(self, response=None, flags=0):
        if self.done.is_set():
            raise RuntimeError("Unable to send response. Response sender has been closed.")
        if response is None or flags != COMPLETE_FINAL:
            raise RuntimeError("a default-mode model sends one response with the final flag")
        self.response, self.flags = response, flags
        self.done.set()


class Request:
    def __init__(self, arrays: dict):
        self._inputs = [Tensor(k, v) for k, v in arrays.items()]
        self._sender = ResponseSender()

    def inputs(self):
        return self._inputs

    def get_response_sender(self):
        return self._sender


class Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error

    @property
    def outputs(self) -> dict:
        return {t.name(): t.as_numpy() for t in self.output_tensors}


class Error:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


@contextlib.contextmanager
def model_py_module(name: str = "ugt_triton_model_standin"):
    """model.py loaded as a module over the stand-in (which replaces the real one, if any, in
    ``sys.modules`` until the context ends)."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = Tensor, Response, Error
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = COMPLETE_FINAL
    saved = sys.modules.get(fake.__name__)
    sys.modules[fake.__name__] = fake
    try:
        spec = importlib.util.spec_from_file_location(name, MODEL_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if saved is None:
            sys.modules.pop(fake.__name__, None)
        else:
            sys.modules[fake.__name__] = saved


def served_model(
    module,
    runner,
    max_seq_length: int,
    codebook_sizes,
    dlpack=False,
    phases=None,
    pipeline_depth: int = 0,
    continuous_batching: bool = False,
    max_batch_size: int = 0,
):
    """``module``'s (model.py's) TritonPythonModel around ``runner`` without initialize() (no
    config, no artifact): what the tests and the host-path benchmark drive through execute().
    ``phases``: the file its phase_stats go to (None: not recorded). ``pipeline_depth`` > 0:
    execute() answers the good requests through their senders (``answered`` waits for them);
    call ``finalize()`` when done; ``continuous_batching``: the pipeline merges what execute()
    leaves with it (up to ``max_batch_size`` rows, 0 = no limit)."""
    m = module.TritonPythonModel()
    m.name, m.runner, m.dlpack = "ugt", runner, dlpack
    m.max_seq_length, m.codebook_sizes = max_seq_length, tuple(codebook_sizes)
    m.phases = module._Phases(Path(phases)) if phases else None
    if m.phases is not None and hasattr(runner, "profile_launches"):  # as initialize() does
        m.phases.launch_laps = runner.profile_launches()
    m.max_batch_size = max_batch_size
    m.pipeline = m._start_pipeline(
        str(pipeline_depth), getattr(runner, "name", "?"), "8", str(continuous_batching)
    )
    return m


def answered(requests, returned, timeout_s: float = 60.0) -> list:
    """Each request's response: from execute()'s returned list, else from its sender (waited
    for). A request answered neither way, or both ways, is an AssertionError."""
    out = []
    for i, request in enumerate(requests):
        now = returned[i] if returned is not None else None
        sender = request.get_response_sender()
        if now is None:
            assert sender.done.wait(timeout_s), f"request {i} was never answered"
            now = sender.response
        else:
            assert not sender.done.is_set(), f"request {i} was answered twice"
        out.append(now)
    return out
