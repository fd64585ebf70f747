"""Every measured candidate of a tune, kept on disk so that a rerun resumes instead of re-measuring.

One JSON file in the tune's output folder (``tune_points.json``), rewritten atomically after each
candidate, so a tune killed at any moment loses at most the candidate it was measuring. Points
are filed under a context: the model, its config before the tune, the load profile and the
server. A rerun reuses a point only under the same context (a changed config, load or server
measures afresh; the old points stay in the file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from algorithm.fsutil import write_json
from algorithm.serving.tuning.search import Candidate

logger = logging.getLogger(__name__)

POINTS_FILE = "tune_points.json"
FORMAT = 1


def context_id(context: dict) -> str:
    text = json.dumps(context, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PointStore:
    """Candidates by settings key, under one context. ``enabled=False`` stores but never reuses."""

    def __init__(self, folder, context: dict, enabled: bool = True):
        self.path = Path(folder) / POINTS_FILE
        self.context = context
        self.id = context_id(context)
        self.enabled = enabled
        self._data = self._read()
        self._mine = self._data["contexts"].setdefault(
            self.id, {"context": context, "candidates": {}}
        )

    def _read(self) -> dict:
        empty = {"format": FORMAT, "contexts": {}}
        if not self.path.is_file():
            return empty
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable %s (%s); measuring afresh", self.path, e)
            return empty
        if data.get("format") != FORMAT or not isinstance(data.get("contexts"), dict):
            logger.warning("ignoring %s: not a tune points file of format %d", self.path, FORMAT)
            return empty
        return data

    def __len__(self) -> int:
        return len(self._mine["candidates"])

    def get(self, key: str) -> Candidate | None:
        if not self.enabled:
            return None
        found = self._mine["candidates"].get(key)
        if found is None:
            return None
        try:
            c = Candidate.from_dict(found)
        except (KeyError, TypeError, ValueError) as e:
            logger.warning("stored point %r unreadable (%s); measuring it again", key, e)
            return None
        c.reused = True
        return c

    def put(self, candidate: Candidate) -> None:
        self._mine["candidates"][candidate.settings.key] = candidate.to_dict()
        write_json(self.path, self._data)


__all__ = ["POINTS_FILE", "PointStore", "context_id"]
