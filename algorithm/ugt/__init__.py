"""The UGT reference model: config, model, checkpoints, synthetic data and a tiny trainer.

Names resolve lazily, so ``algorithm.ugt.config`` (the model's I/O names) imports without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from algorithm.lazy import lazy_exports

_EXPORTS = {
    "INPUT_NAMES": ".config",
    "OUTPUT_NAMES": ".config",
    "UGTConfig": ".config",
    "SyntheticCatalog": ".data",
    "random_inputs": ".data",
    "UGTModel": ".model",
    "load_checkpoint": ".model",
    "save_checkpoint": ".checkpoint",
    "TrainConfig": ".train",
    "recall_at_k": ".train",
    "train_tiny": ".train",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from algorithm.ugt.checkpoint import save_checkpoint
    from algorithm.ugt.config import INPUT_NAMES, OUTPUT_NAMES, UGTConfig
    from algorithm.ugt.data import SyntheticCatalog, random_inputs
    from algorithm.ugt.model import UGTModel, load_checkpoint
    from algorithm.ugt.train import TrainConfig, recall_at_k, train_tiny
