"""What every optimizer backend declares, and the calibration data they share.

A backend turns the exported ONNX model into one artifact that a Triton platform (or the
python backend through a Runner) serves. It declares the artifact it writes, the platform that
serves it, the runner that runs it for the accuracy gate, and whether its library is installed
(found with ``importlib.util.find_spec``, never imported for the check).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from algorithm.errors import ConfigError, InputFileNotFoundError
from algorithm.serving.config import ExportConfig
from algorithm.serving.runtime import INPUT_NAMES

logger = logging.getLogger(__name__)

# Calibration histories come from the demo distribution, but never the gate's held-out ones.
CALIBRATION_SEED = 20_251_113
CALIBRATION_BATCH = 16


class Backend:
    """Base of the optimizer backends; subclasses set the class attributes and ``_optimize``."""

    name: str = ""
    artifact_suffix: str = ""
    artifact_name: str = ""  # Triton's default file name for the platform
    triton_platform: str = ""
    runtime: str = ""  # the runner name for runners.create_runner
    module: str = ""  # the Python package that must be importable
    install: str = ""
    precisions: tuple[str, ...] = ("fp32",)
    needs_onnx: bool = True

    def is_available(self) -> bool:
        """Whether the backend's library can be imported (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise ConfigError(
                "precision",
                precision,
                f"one of {', '.join(self.precisions)} for backend {self.name}",
            )

    def optimize(
        self, onnx_path, output_path, config: ExportConfig, calibration_data=None, **options
    ) -> str:
        """Write the artifact for ``config.precision`` at ``output_path``; returns its path.

        This is the optimizer alone; ``algorithm.serving.backends.optimize`` adds the accuracy
        gate and the atomic publish.
        """
        config = config.validate()
        self.check_precision(config.precision)
        return self._optimize(
            Path(onnx_path) if onnx_path else None,
            Path(output_path),
            config,
            calibration_data,
            **options,
        )

    def _optimize(self, onnx_path, output_path, config, calibration_data, **options) -> str:
        raise NotImplementedError

    def artifact_files(self, artifact) -> list[Path]:
        """Every file that makes up the artifact (OpenVINO: .xml and .bin); the main file last."""
        return [Path(artifact)]

    def runner_options(self, config: ExportConfig) -> dict[str, Any]:
        """Options for ``create_runner(self.runtime, artifact, **options)`` matching the artifact."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "artifact_name": self.artifact_name,
            "triton_platform": self.triton_platform,
            "runtime": self.runtime,
            "precisions": list(self.precisions),
            "available": self.is_available(),
            "install": self.install,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def artifact_sidecar(onnx_path, backend: Backend, config: ExportConfig, **extra) -> dict[str, Any]:
    """The ONNX model's contract (its sidecar) plus what this backend built, for ``<artifact>.json``."""
    from algorithm.serving.export_onnx import read_sidecar

    base = read_sidecar(onnx_path) if onnx_path else {}
    return {
        **base,
        "format": "ugt-serving/artifact-sidecar",
        "backend": backend.name,
        "runtime": backend.runtime,
        "triton_platform": backend.triton_platform,
        "precision": config.precision,
        "source_onnx": str(onnx_path) if onnx_path else None,
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# ------------------------------------------------------------------------------ calibration
def _check_batch(batch: dict, where: str) -> dict[str, np.ndarray]:
    missing = [k for k in INPUT_NAMES if k not in batch]
    if missing:
        raise ConfigError(
            "calibration_data",
            where,
            f"batches with the inputs {list(INPUT_NAMES)}; missing {missing}",
        )
    arrays = {k: np.ascontiguousarray(batch[k], dtype=np.int64) for k in INPUT_NAMES}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or 0 in next(iter(shapes)):
        raise ConfigError(
            "calibration_data",
            where,
            f"four [batch, seq_len] arrays of one shape, got {sorted(shapes)}",
        )
    return arrays


def load_calibration_file(path, batch_size: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
    """Batches from a .npz holding the four inputs as [N, seq_len] arrays (real user histories)."""
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(
            f"calibration file not found: {p}",
            hint="Pass a .npz with encoder_l1_ids, encoder_l2_ids, encoder_l3_ids and attention_mask ([N, seq_len]).",
        )
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = _check_batch({k: data[k] for k in data.files}, str(p))
    except (OSError, ValueError) as e:
        raise ConfigError("calibration_data", str(p), f"a readable .npz file ({e})") from e
    n = len(arrays[INPUT_NAMES[0]])
    return [{k: v[s : s + batch_size] for k, v in arrays.items()} for s in range(0, n, batch_size)]


def calibration_batches(calibration_data, config: ExportConfig) -> list[dict[str, np.ndarray]]:
    """Normalize what the user gave into a list of input batches.

    ``None``: ``config.calibration_samples`` histories from the demo distribution (SyntheticCatalog
    walks of up to ``config.opt_seq_length`` items, never the accuracy gate's held-out ones); a
    path: a .npz file (see ``load_calibration_file``); a callable: called once, it must return an
    iterable of batches (the guide's ``create_calibration_data_generator`` result is one); an
    iterable of dicts: used as is.
    """
    if calibration_data is None:
        from algorithm.serving.optimize_trt import create_calibration_data_generator

        gen = create_calibration_data_generator(
            num_samples=config.calibration_samples,
            batch_size=min(CALIBRATION_BATCH, config.max_batch_size),
            seq_length=max(min(config.opt_seq_length, 128), config.min_seq_length),
            codebook_sizes=tuple(config.codebook_sizes),
            seed=CALIBRATION_SEED,
        )
        source: Iterable = gen()
    elif isinstance(calibration_data, (str, Path)):
        return load_calibration_file(
            calibration_data, min(CALIBRATION_BATCH, config.max_batch_size)
        )
    elif isinstance(calibration_data, dict):
        source = [calibration_data]
    elif callable(calibration_data):
        source = calibration_data()
    else:
        source = calibration_data
    try:
        batches = [_check_batch(b, f"batch {i}") for i, b in enumerate(source)]
    except TypeError as e:
        raise ConfigError(
            "calibration_data",
            type(calibration_data).__name__,
            "None, a .npz path, a callable returning batches, or an iterable of input dicts",
        ) from e
    if not batches:
        raise ConfigError("calibration_data", "[]", "at least one batch")
    return batches


def uniform_batches(
    batches: list[dict[str, np.ndarray]], batch_size: int
) -> list[dict[str, np.ndarray]]:
    """The same histories as equal ``[batch_size, longest]`` batches.

    Calibrators that stack activations across batches (ONNX Runtime's histogram methods,
    TensorRT's calibration profile) need one shape. Shorter histories are padded (padding is
    masked, so outputs do not change); the last batch is filled from the first users again.
    """
    longest = max(b[INPUT_NAMES[0]].shape[1] for b in batches)
    rows = {
        k: np.concatenate([np.pad(b[k], ((0, 0), (0, longest - b[k].shape[1]))) for b in batches])
        for k in INPUT_NAMES
    }
    n = len(rows[INPUT_NAMES[0]])
    size = min(batch_size, n)
    count = -(-n // size)
    order = np.arange(count * size) % n
    return [{k: v[order[i * size : (i + 1) * size]] for k, v in rows.items()} for i in range(count)]
