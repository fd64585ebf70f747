"""GpuEngine's CUDA graphs: one per layout key, composed into the engine.

A key names a bucketed layout (("dense", users, width), ("packed", users, tokens), ("padded",
users, width)), or ("inputs", users, width): raw device inputs the forward packs itself. The least recently used graph is dropped past ``max_graphs``. After warm-up the
engine freezes the cache: with ``capture_new_shapes`` False a key without a graph is no longer
captured mid-traffic (a capture stalls its batch for tens of ms); the engine runs such a batch
in a larger warmed bucket (counted in ``rounded_up``) or eagerly (``eager_runs``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class GraphCache:
    def __init__(self, device, enabled: bool, max_graphs: int, capture_new_shapes: bool):
        self.device = device
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.capture_new_shapes = capture_new_shapes
        self.frozen = False  # set by freeze(): the warm-up is over
        self.eager_runs = 0  # frozen: batches of a shape without a graph (run eagerly)
        self.rounded_up = 0  # frozen: packed batches sent to a larger warmed bucket instead
        self.captures = 0
        self._entries: OrderedDict = OrderedDict()
        self._pool = None

    def freeze(self) -> None:
        self.frozen = True

    @property
    def closed(self) -> bool:
        """Warm-up is over and a shape without a graph would run eagerly (no new captures)."""
        return self.enabled and self.frozen and not self.capture_new_shapes

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __setitem__(self, key, entry) -> None:
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)

    def __iter__(self):
        return iter(self._entries)

    def keys(self):
        return self._entries.keys()

    def values(self):
        return self._entries.values()

    def lookup(self, key):
        """The (graph, static inputs, outputs) of ``key``, marked as just used; None if absent."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def capture(self, key, static, forward: Callable, label: str):
        """Capture ``forward(static)`` as ``key``'s graph (after one warm-up run on a side
        stream: cuBLAS handles, kernel selection); returns (graph, static, outputs)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outs = forward(static)
        self.captures += 1
        logger.info("captured CUDA graph %d for %s", self.captures, label)
        self[key] = entry = (graph, static, outs)
        return entry
