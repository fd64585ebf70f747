"""Calibration data, in one place: the guide's generator of demo-distribution histories (5.4),
a user's file or iterable of batches, checked and cut to the fixed shapes a calibrator takes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from algorithm.errors import ConfigError, InputFileNotFoundError
from algorithm.serving.config import ExportConfig
from algorithm.serving.contract import INPUT_NAMES

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ calibration
class CalibrationDataGenerator:
    """Batches of user histories from the demo distribution, for INT8 calibration (guide 5.4).

    Calling it (or iterating it) yields ``ceil(num_samples / batch_size)`` dicts of the four
    int64 inputs, each exactly ``[batch_size, seq_length]``: TensorRT calibrates with one fixed
    shape (the calibration profile), so the last batch is filled with further histories rather
    than cut short. Histories are random walks over SyntheticCatalog (lengths from 1 to
    ``seq_length``, padded), not uniform noise, so activation ranges match real traffic.
    """

    def __init__(
        self,
        num_samples: int = 100,
        batch_size: int = 32,
        seq_length: int = 512,
        codebook_sizes=(1024, 4096, 16384),
        seed: int = 0,
    ):
        for name, value in (
            ("num_samples", num_samples),
            ("batch_size", batch_size),
            ("seq_length", seq_length),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "an integer >= 1")
        if len(tuple(codebook_sizes)) != 3:
            raise ConfigError("codebook_sizes", codebook_sizes, "three integers >= 2")
        self.num_samples, self.batch_size, self.seq_length = num_samples, batch_size, seq_length
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        self.seed = seed

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch_size, self.seq_length)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        from algorithm.serving.verify.accuracy import demo_catalog

        catalog = demo_catalog(self.codebook_sizes)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_batches):
            batch = catalog.batch(self.batch_size, 1, self.seq_length, rng)
            yield {k: batch[k] for k in INPUT_NAMES}

    def __call__(self):
        return iter(self)


def create_calibration_data_generator(
    num_samples: int = 100,
    batch_size: int = 32,
    seq_length: int = 512,
    codebook_sizes=(1024, 4096, 16384),
    seed: int = 0,
) -> CalibrationDataGenerator:
    """The guide's calibration generator: pass it as ``calibration_data`` to any optimizer."""
    return CalibrationDataGenerator(num_samples, batch_size, seq_length, codebook_sizes, seed)


# Calibration histories come from the demo distribution, but never the gate's held-out ones.
CALIBRATION_SEED = 20_251_113
CALIBRATION_BATCH = 16


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
