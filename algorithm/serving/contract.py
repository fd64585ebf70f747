"""The served model's contract, in one place: input/output names and dtypes, the dynamic axes, and
the files that travel with an artifact (sidecar, parity and accuracy reports) with their read/write.

Light on purpose (no torch, no ONNX): the benchmark, the reports and the python-backend model
import it. The names themselves are the model's (``algorithm.ugt.config``), re-exported here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from algorithm.fsutil import write_json
from algorithm.ugt.config import INPUT_NAMES, OUTPUT_NAMES

logger = logging.getLogger(__name__)

ID_NAMES = INPUT_NAMES[:3]  # the three semantic-id levels; INPUT_NAMES[3] is the mask
INPUT_DTYPE = "int64"
# Inside a version folder of a Triton repository the artifact's sidecar has one fixed name.
SIDECAR_NAME = "ugt_model.json"


@dataclass
class ModelInputSpec:
    """Names, dtypes and dynamic axes of the serving contract."""

    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES
    input_dtype: str = INPUT_DTYPE
    dynamic_axes: dict = field(
        default_factory=lambda: {
            **{n: {0: "batch", 1: "seq_len"} for n in INPUT_NAMES},
            "recommendations": {0: "batch"},
            "scores": {0: "batch"},
        }
    )

    def example_inputs(
        self, batch: int, seq_len: int, codebook_sizes, seed: int = 0, ragged: bool = False
    ):
        import numpy as np

        from algorithm.ugt.data import random_inputs

        return random_inputs(
            batch, seq_len, codebook_sizes, np.random.default_rng(seed), ragged=ragged
        )


def sidecar_path(artifact) -> Path:
    """``<artifact>.json``: what the artifact is (contract, precision, backend, versions)."""
    return Path(f"{artifact}.json")


def parity_report_path(onnx_path) -> Path:
    """``<stem>.parity.json``: ONNX Runtime against PyTorch at export."""
    return Path(onnx_path).with_suffix(".parity.json")


def accuracy_report_path(artifact) -> Path:
    """``<artifact>.accuracy.json``: the optimized artifact against the fp32 reference."""
    return Path(f"{artifact}.accuracy.json")


def read_sidecar(artifact) -> dict:
    """The artifact's sidecar, or ``{}`` when there is none or it cannot be read."""
    p = sidecar_path(artifact)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable sidecar %s", p)
        return {}


def write_sidecar(artifact, data: dict) -> Path:
    return write_json(sidecar_path(artifact), data)
