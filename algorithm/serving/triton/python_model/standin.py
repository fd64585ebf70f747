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


class Request:
    def __init__(self, arrays: dict):
        self._inputs = [Tensor(k, v) for k, v in arrays.items()]

    def inputs(self):
        return self._inputs


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


def served_model(module, runner, max_seq_length: int, codebook_sizes, dlpack=False, phases=None):
    """``module``'s (model.py's) TritonPythonModel around ``runner`` without initialize() (no
    config, no artifact): what the tests and the host-path benchmark drive through execute().
    ``phases``: the file its phase_stats go to (None: not recorded)."""
    m = module.TritonPythonModel()
    m.name, m.runner, m.dlpack = "ugt", runner, dlpack
    m.max_seq_length, m.codebook_sizes = max_seq_length, tuple(codebook_sizes)
    m.phases = module._Phases(Path(phases)) if phases else None
    return m
