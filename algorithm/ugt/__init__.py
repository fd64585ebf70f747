"""The UGT reference model: config, model, checkpoints, synthetic data and a tiny trainer."""

from algorithm.ugt.checkpoint import load_checkpoint, save_checkpoint
from algorithm.ugt.config import INPUT_NAMES, OUTPUT_NAMES, UGTConfig
from algorithm.ugt.data import SyntheticCatalog, random_inputs
from algorithm.ugt.model import UGTModel
from algorithm.ugt.train import TrainConfig, recall_at_k, train_tiny

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "SyntheticCatalog",
    "TrainConfig",
    "UGTConfig",
    "UGTModel",
    "load_checkpoint",
    "random_inputs",
    "recall_at_k",
    "save_checkpoint",
    "train_tiny",
]
