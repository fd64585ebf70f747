"""GpuEngine's host half: inputs -> ``Tokens`` on the device, bucketed for the CUDA-graph cache.

Two routes: ``tokens_from_arrays`` for [B, T] tensors already anywhere (validity computed where
they are), and ``tokens_from_batch`` for a host ``FlatBatch`` (a Triton dynamic batch): the layout
is computed on the host, already padded to its bucket, and written into the staging buffer, so
the whole forward's inputs reach the device in one copy (straight into the graph's static buffer
on replay).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from algorithm.serving.runtime.gpu import kernels as fk
from algorithm.serving.runtime.gpu.batch import (
    FlatBatch,
    Staging,
    Tokens,
    bucket_tokens,
    bucket_users,
    dense_layout,
    layout_views,
    packed_bucket,
    packed_index,
    packed_layout,
    previous_token_bucket,
)
from algorithm.ugt.model import MASKED  # the reference's additive mask value

# -- GpuEngine's host half: inputs -> device layouts ------------------------------------------


class TokenLayouts:
    """Builds ``Tokens`` for GpuEngine (composed into it, with the engine's model copy, config,
    device and dtype, and its GraphCache, whose keys decide the buckets).

    Two routes: ``tokens_from_arrays`` for [B, T] tensors already anywhere (validity computed
    where they are), and ``tokens_from_batch`` for a host ``FlatBatch`` (a Triton dynamic batch):
    the layout is computed on the host, already padded to its CUDA-graph bucket, and written
    into the staging buffer, so that the whole forward's inputs reach the device in one copy
    (straight into the graph's static buffer on replay)."""

    def __init__(self, model, config, device, dtype, graphs, kernel: str = "reference"):
        self.m = model
        self.model_config = mc = model.config
        self.k, self.sizes = mc.num_recommendations, tuple(mc.codebook_sizes)
        self.config, self.device, self.dtype = config, device, dtype
        self.graphs = graphs
        self.staging = Staging(device, blocking=config.blocking_sync)
        self._pos: dict = {}  # (users, width, device) -> positions of a B x T layout
        self._beams: dict = {}  # slots -> cu_beams of the sync-free route (constant)
        # the sync-free route: graphs replay it, and its attention reads offsets on the device
        self.sync_free = (
            config.sync_free_positions
            if graphs.enabled and config.layout == "packed" and kernel != "reference"
            else 0
        )

    # -- device-side route -------------------------------------------------------------------
    def _device_tokens(
        self, kind, users, max_len, ids, pos, index=None, lengths=None, valid=None
    ) -> Tokens:
        dev = self.device
        t = Tokens(
            kind, users, max_len, ids.to(dev, non_blocking=True), pos.to(dev, non_blocking=True)
        )
        if kind == "packed":
            for name, arr in index.items():
                setattr(t, name, torch.from_numpy(arr).to(dev, non_blocking=True))
            beams = np.arange(users + 1, dtype=np.int32)
            t.cu_beams = {
                1: t.cu_mem.new_tensor(beams),
                self.k: t.cu_mem.new_tensor(beams * self.k),
            }
            t.lengths = tuple(int(n) for n in lengths)
        elif kind == "padded":
            valid = valid.to(dev)
            t.enc_mask = ((~valid).to(self.dtype) * MASKED)[:, None, None, :]
            mem_valid = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
            t.mem_mask = ((~mem_valid).to(self.dtype) * MASKED)[:, None, None, :]
        return t

    def tokens_from_arrays(self, l1, l2, l3, mask) -> tuple[Tokens, int]:
        """Layout for [B, T] tensors or arrays (any device). Returns (tokens, real users)."""
        args = [
            torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)
            for a in (l1, l2, l3, mask)
        ]
        l1, l2, l3, mask = (a.to(torch.int64) for a in args)
        self.m.check_inputs(l1, l2, l3, mask)
        b, t = l1.shape
        if b * t <= self.sync_free and all(a.device == self.device for a in (l1, l2, l3, mask)):
            return self.sync_free_tokens(l1, l2, l3, mask), b
        # few launches: each costs ~10-20 us of Python on the GPU hosts (fused: one)
        ids, valid, lengths = fk.input_validity(
            l1, l2, l3, mask, self.sizes, fused=self.config.fused_inputs
        )
        lengths = lengths.tolist()  # the one sync: bucketing needs the lengths on the host
        if self.config.layout == "padded":
            ids = torch.where(valid, ids, 0).view(3, -1)
            return self._device_tokens(
                "padded", b, t, ids, self._positions(b, t, ids), valid=valid
            ), b
        if self.config.dense_when_full and all(n == t for n in lengths):
            return self._device_tokens(
                "dense", b, t, ids.view(3, -1), self._positions(b, t, ids)
            ), b
        rows, cols = valid.nonzero(as_tuple=True)
        return self._packed(ids[:, rows, cols], cols, lengths), b

    def sync_free_tokens(self, l1, l2, l3, mask) -> Tokens:
        """Kind "inputs": [B, T] device tensors the forward packs itself (``kernels.pack_inputs``:
        the padding positions after the B users), in a graph keyed by (B, T)."""
        b, t = l1.shape
        beams = self._beams.get(b)
        if beams is None:
            slots = torch.arange(b + 1, device=self.device, dtype=torch.int32)
            beams = self._beams[b] = {1: slots, self.k: slots * self.k}
        key = ("inputs", b, t)
        return Tokens(
            "inputs", b, t, None, None, cu_beams=beams, key=key, inputs=(l1, l2, l3, mask)
        )

    def _positions(self, users: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """Each row's column index, [users * width] (kept per shape: the same every call)."""
        key = (users, width, like.device)
        pos = self._pos.get(key)
        if pos is None:
            if len(self._pos) >= 256:
                self._pos.clear()
            pos = self._pos[key] = torch.arange(width, device=like.device).repeat(users)
        return pos

    def _packed(self, ids, pos, lengths) -> Tokens:
        max_len = max(max(lengths), 1)
        if ids.device.type == "cpu" and self.device.type == "cuda":
            ids, pos = ids.pin_memory(), pos.pin_memory()
        return self._device_tokens(
            "packed", len(lengths), max_len, ids, pos, packed_index(lengths), lengths
        )

    def graph_key_and_static(self, t: Tokens):
        """Pad ``t`` to its bucket; returns (key, bucketed tokens)."""
        if t.key is not None:  # built on the host, already bucketed
            return t.key, t
        if t.kind == "dense":
            return ("dense", t.users, t.max_len), t
        if t.kind == "padded":
            # pad-to-longest, then to a (users, length) bucket: extra rows/columns are masked
            b, n = t.users, t.max_len
            bb, nb = bucket_users(b), bucket_tokens(n, minimum=16)
            if (bb, nb) == (b, n):
                return ("padded", b, n), t
            ids = t.ids.new_zeros(3, bb, nb)
            ids[:, :b, :n] = t.ids.view(3, b, n)
            enc = t.enc_mask.new_full((bb, 1, 1, nb), MASKED)
            enc[:b, :, :, :n] = t.enc_mask
            mem = t.mem_mask.new_full((bb, 1, 1, nb + 1), MASKED)
            mem[:b, :, :, : n + 1] = t.mem_mask
            mem[:, :, :, 0] = 0.0  # dummy rows attend to the null slot only
            pos = torch.arange(nb, device=t.pos.device).repeat(bb)
            tb = Tokens("padded", bb, nb, ids.view(3, -1), pos, enc_mask=enc, mem_mask=mem)
            return ("padded", bb, nb), tb
        n, b = t.ids.shape[1], t.users
        key, extra, nb, max_len = self.bucket_packed(b, n)
        lengths = list(t.lengths) + extra
        ids = torch.cat([t.ids, t.ids.new_zeros(3, nb - n)], 1)
        pos = torch.cat([t.pos, t.pos.new_zeros(nb - n)])
        padded = self._device_tokens(
            "packed", len(lengths), max_len, ids, pos, packed_index(lengths), lengths
        )
        return key, padded

    def bucket_packed(self, users: int, tokens: int):
        """(graph key, dummy slot lengths, bucketed tokens, max_len) for a packed forward
        (``packed_bucket``: dummy users of one token, then one dummy slot of the spare tokens).
        A frozen engine without a graph for that bucket takes the smallest larger warmed one
        whose spare slot stays one history long: a few hundred padded tokens cost far less than
        an eager run (~10 ms of launches), whatever length mix the warm-up did not foresee.
        Failing that (``round_up_users``), the smallest larger users bucket with such a graph:
        its extra dummy users hold one token each."""
        bb, nb, pad = packed_bucket(users, tokens)
        if self.graphs.closed and ("packed", bb, nb) not in self.graphs:
            fits = sorted(
                (key[1], key[2])
                for key in self.graphs
                if key[0] == "packed"
                and (key[1] == bb or (key[1] > bb and self.config.round_up_users))
                and 1 <= key[2] - tokens - (key[1] - users) <= self._packed_max_len(key[2])
            )
            if fits:
                bb, nb = fits[0]
                pad = nb - tokens - (bb - users)
                self.graphs.rounded_up += 1
        extra = [1] * (bb - users) + [pad]
        return ("packed", bb, nb), extra, nb, self._packed_max_len(nb)

    def _packed_max_len(self, nb: int) -> int:
        """The longest slot a packed forward of ``nb`` tokens may hold (attention's bound)."""
        return max(self.model_config.max_seq_length, nb - previous_token_bucket(nb))

    # -- host-side route (one copy) ------------------------------------------------------------
    def tokens_from_requests(self, requests: Sequence[dict]) -> tuple[Tokens, list[int]]:
        """One layout for a list of per-request input dicts of [b_i, T_i] arrays.

        Packed: the valid tokens of every request back to back (no padding at all). Padded
        (the baseline): every request padded to the longest T_i, as a static-shape engine must.
        Returns the tokens and each request's number of users (rows), in order.
        """
        batch = FlatBatch.from_requests(requests)
        return self.tokens_from_batch(batch), batch.rows.tolist()

    def tokens_from_batch(self, batch: FlatBatch) -> Tokens:
        """The layout of one forward over every row of ``batch``, rows in order."""
        limit = self.model_config.max_seq_length
        if batch.seq.size == 0 or batch.seq.min() < 1 or batch.seq.max() > limit:
            raise ValueError(
                f"each request needs [batch, seq_len] inputs with 1 <= seq_len <= {limit}, "
                f"got seq_len {batch.seq.tolist()}"
            )
        users, width = batch.users, int(batch.seq.max())
        if self.config.layout == "padded":
            return self.tokens_from_arrays(*batch.padded(width))[0]
        valid = batch.valid(self.sizes)
        if (
            self.config.dense_when_full
            and (batch.seq == width).all()
            and valid.all()
            and self.dense_graph_ready(users, width)
        ):
            return self._staged_dense(batch.values, users, width)
        widths = batch.row_widths()
        starts = batch.row_starts(widths)
        lengths = batch.row_lengths(valid, starts)
        col = batch.columns(widths, starts)

        def fill(ids, pos):
            for i in range(3):
                np.compress(valid, batch.values[i], out=ids[i])
            np.compress(valid, col, out=pos)

        return self._staged_packed(lengths, fill)

    def dense_graph_ready(self, users: int, width: int) -> bool:
        """Dense attention only where its graph (keyed by the exact width) exists or may still
        be captured: frozen, an unseen width (a single history of a realistic mix, say) runs
        packed in a bucketed graph instead of eagerly."""
        return not self.graphs.closed or ("dense", users, width) in self.graphs

    def _staged_dense(self, values: np.ndarray, users: int, width: int) -> Tokens:
        layout = dense_layout(users, width)
        staged = self.staging.take(layout["_total"])
        v = layout_views(staged, layout, as_numpy=True)
        v["ids"][:] = values[:3].reshape(-1)
        v["pos"].reshape(users, width)[:] = np.arange(width)
        key = ("dense", users, width) if self.graphs.enabled else None
        return Tokens("dense", users, width, None, None, key=key, staged=staged, layout=layout)

    def _staged_packed(self, lengths: np.ndarray, fill) -> Tokens:
        """Packed slots of ``lengths`` (bucketed when graphs run); ``fill(ids [3, n], pos [n])``
        writes the valid tokens in place."""
        b, n = len(lengths), int(lengths.sum())
        if self.graphs.enabled:
            key, extra, nb, max_len = self.bucket_packed(b, n)
        else:
            key, extra, nb, max_len = None, [], n, max(int(lengths.max(initial=0)), 1)
        lens = np.concatenate([lengths, np.asarray(extra, dtype=np.int64)])
        s = len(lens)
        layout = packed_layout(s, nb, self.k)
        staged = self.staging.take(layout["_total"])
        v = layout_views(staged, layout, as_numpy=True)
        ids = v["ids"].reshape(3, nb)
        fill(ids[:, :n], v["pos"][:n])
        ids[:, n:] = 0
        v["pos"][n:] = 0
        packed_index(lens, out=v)
        slots = np.arange(s + 1, dtype=np.int32)
        for beams in {1, self.k}:
            np.multiply(slots, beams, out=v[f"cu_beams_{beams}"])
        t = Tokens("packed", s, max_len, None, None, key=key, staged=staged, layout=layout)
        t.lengths = tuple(lens.tolist())
        return t

    def with_buffer(self, t: Tokens, buf: torch.Tensor) -> Tokens:
        """``t`` with its tensors as views of ``buf`` (a device copy of ``t.staged``)."""
        v = layout_views(buf, t.layout)
        out = Tokens(
            t.kind,
            t.users,
            t.max_len,
            v["ids"].view(3, -1),
            v["pos"],
            lengths=t.lengths,
            key=t.key,
            staged=t.staged,
            layout=t.layout,
            buf=buf,
        )
        if t.kind == "packed":
            for name in ("cu", "cu_mem", "tok_to_mem", "null_idx"):
                setattr(out, name, v[name])
            out.cu_beams = {1: v["cu_beams_1"], self.k: v[f"cu_beams_{self.k}"]}
        return out

    def materialized(self, t: Tokens) -> Tokens:
        """``t`` with device tensors (one copy of the staged buffer; no-op if already there)."""
        if t.ids is not None:
            return t
        if t.kind == "inputs":
            ids = torch.stack(t.inputs).view(4, -1)
            return Tokens(**{**t.__dict__, "ids": ids})
        return self.with_buffer(t, self.staging.copy_to(t.staged))
