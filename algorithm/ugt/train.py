"""A tiny trainer for the demo checkpoint, with held-out recall@K next to chance."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from algorithm.ugt.config import UGTConfig
from algorithm.ugt.data import SyntheticCatalog
from algorithm.ugt.model import UGTModel

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    min_len: int = 4
    max_len: int = 48
    lr: float = 3e-3
    seed: int = 0
    eval_users: int = 512
    time_budget_s: float | None = None  # stop early (after at least 50 steps) when spent
    catalog: SyntheticCatalog = field(default_factory=SyntheticCatalog)


def recall_at_k(model: UGTModel, batch: dict[str, np.ndarray], chunk: int = 128) -> float:
    """Fraction of users whose true next item is among the model's top-K recommendations."""
    hits = 0
    n = len(batch["target"])
    model.eval()
    with torch.inference_mode():
        for s in range(0, n, chunk):
            inp = [
                torch.from_numpy(batch[k][s : s + chunk])
                for k in ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "attention_mask")
            ]
            recs, _ = model(*inp)
            tgt = torch.from_numpy(batch["target"][s : s + chunk])
            hits += int((recs == tgt[:, None, :]).all(-1).any(-1).sum())
    return hits / n


def train_tiny(
    config: UGTConfig | None = None,
    train: TrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[UGTModel, dict]:
    """Train on synthetic walks; returns the model and a report with held-out recall@K and chance."""
    config = config or UGTConfig.tiny()
    train = train or TrainConfig()
    if train.catalog.codebook_sizes != tuple(config.codebook_sizes):
        train.catalog = SyntheticCatalog(
            codebook_sizes=tuple(config.codebook_sizes), seed=train.seed
        )
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    model = UGTModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=train.lr, total_steps=train.steps, pct_start=0.1
    )
    names = ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "attention_mask")
    t0 = time.monotonic()
    loss_value = float("nan")
    step = 0
    model.train()
    for step in range(1, train.steps + 1):
        b = train.catalog.batch(train.batch_size, train.min_len, train.max_len, rng)
        loss = model.loss(*(torch.from_numpy(b[k]) for k in names), torch.from_numpy(b["target"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if progress:
            progress(step, train.steps, loss_value)
        if train.time_budget_s and step >= 50 and time.monotonic() - t0 > train.time_budget_s:
            logger.info("time budget %.0fs spent after %d steps", train.time_budget_s, step)
            break
    train_s = time.monotonic() - t0
    held_out = train.catalog.batch(
        train.eval_users, train.min_len, train.max_len, np.random.default_rng(10_000 + train.seed)
    )
    recall = recall_at_k(model, held_out)
    k = config.num_recommendations
    chance = min(1.0, k / train.catalog.num_items)
    report = {
        "steps": step,
        "train_seconds": round(train_s, 1),
        "final_loss": round(loss_value, 4),
        f"heldout_recall@{k}": round(recall, 4),
        f"chance_recall@{k}": round(chance, 4),
        "catalog_items": train.catalog.num_items,
        "eval_users": train.eval_users,
    }
    # A model no better than twice chance ranks noise: every later accuracy check on it compares
    # meaningless rankings, so the report says so instead of passing it on silently.
    if recall <= 2 * chance:
        where = "below" if recall < chance else "not clearly above"
        report["warning"] = (
            f"held-out recall@{k} {recall:.4f} is {where} chance ({chance:.4f}): the model has "
            f"not learned the walks; train longer (more steps; 1000 reach about 0.8)"
        )
        logger.warning("%s", report["warning"])
    logger.info("trained: %s", report)
    return model.eval(), report
