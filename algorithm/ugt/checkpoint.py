"""Checkpoints that never unpickle code: safetensors (written) or weights-only torch files (read)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from algorithm.errors import CheckpointError, InputFileNotFoundError
from algorithm.fsutil import write_with
from algorithm.ugt.config import UGTConfig

logger = logging.getLogger(__name__)

FORMAT = "ugt-serving/ugt-checkpoint"
FORMAT_VERSION = "1"


def save_checkpoint(model, path) -> str:
    """Write config + weights as safetensors, atomically (temp file, then rename), mode 0644."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
    }
    path = write_with(path, lambda tmp: save_file(state, tmp, metadata=meta))
    logger.info("saved checkpoint %s", path)
    return str(path)


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a UGT checkpoint (metadata format={meta.get('format')!r})"
        )
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: the checkpoint's config metadata is missing or corrupt"
        ) from e
    return config, state


def _read_torch(path: Path):
    """A torch.save'd {"config": dict, "state_dict": ...}; weights_only refuses pickled code."""
    import pickle

    try:
        # A file object, not the path: torch >= 2.13 sends a "*.safetensors" path to safetensors
        # whatever the bytes, and a pickle named so must still be refused as a pickle.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled objects that weights-only loading refuses (it could run code); "
            "it was not loaded",
            hint="Convert it in a trusted environment: UGTModel(config).load_state_dict(...); model.save(path).",
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is neither a safetensors nor a torch checkpoint: {e}") from e
    if not isinstance(obj, dict) or "config" not in obj or "state_dict" not in obj:
        raise CheckpointError(
            f"{path} is a torch file but not a UGT checkpoint (no 'config'/'state_dict' keys)"
        )
    return obj["config"], obj["state_dict"]


def read_checkpoint(path) -> tuple[UGTConfig, dict]:
    """The stored config and weights of a checkpoint, without running any of its code."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    # safetensors starts with a little-endian u64 header length; zip/pickle files start with PK / \x80.
    is_torch = head[:2] == b"PK" or head[:1] == b"\x80"
    config_dict, state = _read_torch(path) if is_torch else _read_safetensors(path)
    try:
        config = UGTConfig.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the stored config is invalid: {e}") from e
    return config, state
