"""Synthetic interactions with learnable structure, for the demo model and for calibration.

A catalog of items, each with a distinct semantic id (c1, c2, c3). Items form clusters that
share c1; each item has a few preferred successors (mostly in its own cluster). A user history
is a random walk over these transitions, with occasional random jumps, so the next item is
predictable from the last few items: a trained model's top-50 must contain it far more often
than chance (50 / catalog size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticCatalog:
    codebook_sizes: tuple[int, int, int] = (1024, 4096, 16384)
    num_items: int = 2000
    num_clusters: int = 64
    successors: int = 4
    jump_probability: float = 0.1
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        c1s, c2s, c3s = self.codebook_sizes
        n = self.num_items
        cluster = rng.integers(0, self.num_clusters, n)
        cluster_code = rng.choice(c1s, self.num_clusters, replace=False)
        # c2/c3 distinct per item so the 3-level id identifies it.
        self.ids = np.stack(
            [
                cluster_code[cluster],
                rng.choice(c2s, n, replace=n > c2s),
                rng.choice(c3s, n, replace=n > c3s),
            ],
            axis=1,
        ).astype(np.int64)
        members = [np.flatnonzero(cluster == c) for c in range(self.num_clusters)]
        succ = np.empty((n, self.successors), dtype=np.int64)
        for i in range(n):
            same = members[cluster[i]]
            pool = same if len(same) >= self.successors else np.arange(n)
            succ[i] = rng.choice(pool, self.successors, replace=False)
        self.successor_table = succ
        w = 1.0 / np.arange(1, self.successors + 1)
        self.successor_p = w / w.sum()

    def sessions(self, count: int, min_len: int, max_len: int, rng: np.random.Generator):
        """Random walks: returns (item index histories [count, max_len] padded with -1, lengths, next item)."""
        lengths = rng.integers(min_len, max_len + 1, count)
        hist = np.full((count, max_len), -1, dtype=np.int64)
        nxt = np.empty(count, dtype=np.int64)
        cur = rng.integers(0, self.num_items, count)
        for t in range(max_len + 1):
            jump = rng.random(count) < self.jump_probability
            pick = rng.choice(self.successors, count, p=self.successor_p)
            step = np.where(
                jump, rng.integers(0, self.num_items, count), self.successor_table[cur, pick]
            )
            done = t == lengths
            nxt[done] = cur[done]
            if t < max_len:
                live = t < lengths
                hist[live, t] = cur[live]
            cur = step
        return hist, lengths, nxt

    def batch(
        self, count: int, min_len: int, max_len: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Model inputs for ``count`` users (padded to max_len) plus ``target`` [count, 3] codes."""
        hist, _, nxt = self.sessions(count, min_len, max_len, rng)
        mask = hist >= 0
        codes = self.ids[np.where(mask, hist, 0)]
        out = {f"encoder_l{i + 1}_ids": np.where(mask, codes[..., i], 0) for i in range(3)}
        out["attention_mask"] = mask.astype(np.int64)
        out["target"] = self.ids[nxt]
        return out


def random_inputs(
    batch: int, seq_len: int, codebook_sizes=(1024, 4096, 16384), rng=None, ragged: bool = False
) -> dict[str, np.ndarray]:
    """Uniform valid ids; with ``ragged`` every row gets its own length (>= 1), padded with zeros."""
    rng = rng or np.random.default_rng(0)
    out = {
        f"encoder_l{i + 1}_ids": rng.integers(0, c, (batch, seq_len))
        for i, c in enumerate(codebook_sizes)
    }
    if ragged:
        lengths = rng.integers(1, seq_len + 1, batch)
        mask = np.arange(seq_len)[None, :] < lengths[:, None]
        for k in list(out):
            out[k] = np.where(mask, out[k], 0)
    else:
        mask = np.ones((batch, seq_len), dtype=bool)
    out["attention_mask"] = mask.astype(np.int64)
    return {k: v.astype(np.int64) for k, v in out.items()}
