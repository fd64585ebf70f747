"""Shared fixtures: a trained tiny model and its ONNX export, built once per session.

Markers skip by themselves with a reason when their dependency is absent:
gpu (CUDA), tensorrt (tensorrt >= 10 and CUDA), server (the tritonserver binary), slow (never).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _tritonserver() -> str | None:
    try:
        from algorithm.serving.triton.server import find_tritonserver

        return str(find_tritonserver())
    except Exception:  # absent module or binary: the marker skips
        return None


def pytest_collection_modifyitems(config, items):
    reasons = {}
    if any("gpu" in i.keywords for i in items) and not _cuda():
        reasons["gpu"] = "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if any("tensorrt" in i.keywords for i in items):
        if importlib.util.find_spec("tensorrt") is None:
            reasons["tensorrt"] = (
                "needs TensorRT >= 10: pip install 'ugt-serving[tensorrt]' (not installable on this machine)"
            )
        elif not _cuda():
            reasons["tensorrt"] = "needs a CUDA GPU for TensorRT"
    if any("server" in i.keywords for i in items) and _tritonserver() is None:
        reasons["server"] = (
            "needs the tritonserver binary: pip install nvidia-pytriton (or set TRITONSERVER_BIN)"
        )
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(model, report, checkpoint path): the tiny preset trained briefly on synthetic walks."""
    from algorithm.ugt import TrainConfig, UGTConfig, train_tiny

    model, report = train_tiny(UGTConfig.tiny(), TrainConfig(steps=400, eval_users=256))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model.save(path)
    return model, report, path


@pytest.fixture(scope="session")
def onnx_model(trained, tmp_path_factory):
    """Path of the trained tiny model exported to ONNX (parity checked)."""
    from algorithm.serving import ExportConfig, export_to_onnx

    model, _, _ = trained
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_to_onnx(model, path, ExportConfig(max_batch_size=64, max_seq_length=1024))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def trt_standin(monkeypatch):
    """The TensorRT stand-in (``trt_standin.py``, never an engine) installed as ``tensorrt``
    (guide 7.3's mock import), its call record empty. The INT8 calibrator's copy to GPU memory
    becomes a host copy with a real pointer: the stand-in has no GPU."""
    import sys

    from algorithm.serving.backends import tensorrt as trt_backend
    from algorithm.serving.tests import trt_standin as standin

    module = standin.make_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)

    def host_copy(array):
        host = np.ascontiguousarray(array)
        return host, int(host.ctypes.data)

    monkeypatch.setattr(trt_backend, "to_device", host_copy)
    return module
