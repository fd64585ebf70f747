"""Host side of GpuEngine: buckets, request grouping, and a dynamic batch's inputs laid out for
one forward.

A Triton dynamic batch arrives as many small requests. ``FlatBatch`` holds all of them at
once: each input's values back to back in one ``[4, N]`` int64 array (one concatenate per
input), so validity, lengths and the packed token layout come from a few numpy operations over
the whole batch, not a loop over requests. ``Staging`` is the (pinned, on CUDA) host buffer a
forward's int64/int32 index arrays are written into, so they reach the device in one copy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from algorithm.serving.contract import INPUT_NAMES

# -- buckets and request grouping -------------------------------------------------------------
USER_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


def bucket_users(n: int) -> int:
    """Users per captured graph: small steps up to 64, then multiples of 32."""
    for b in USER_BUCKETS:
        if n <= b:
            return b
    return -(-n // 32) * 32


def bucket_tokens(n: int, minimum: int = 64) -> int:
    """Tokens per captured graph: 8 steps per power of two (at most 12.5% spare), >= minimum."""
    if n <= minimum:
        return minimum
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def packed_bucket(users: int, tokens: int) -> tuple[int, int, int]:
    """(users bucket, tokens bucket, spare tokens) of a packed forward of ``users`` histories
    holding ``tokens`` tokens: the users round up to a bucket (dummy users of one token), then
    the tokens, with at least one spare token. The spare tokens form one more dummy slot, so
    every batch of a key has the same slots: a batch landing exactly on a bucket's top with no
    spare slot had a key of its own that no warm-up captured (1-7% of a log-normal mix's small
    batches ran eagerly, ~10 ms each, the served mix's P99 tail)."""
    bb = bucket_users(users)
    dummies = bb - users
    nb = bucket_tokens(tokens + dummies + 1)
    return bb, nb, nb - tokens - dummies


def previous_token_bucket(nb: int, minimum: int = 64) -> int:
    """The largest bucket below the bucket ``nb`` (0 below the smallest)."""
    if nb <= minimum:
        return 0
    return max(nb - (1 << max(0, (nb - 1).bit_length() - 4)), minimum)


def mix_warmup_lengths(
    median: float,
    sigma: float,
    longest: int,
    coverage: float = 0.995,
    max_users: int = 64,
    samples: int = 2000,
    seed: int = 0,
    layout: str = "packed",
) -> list[list[int]]:
    """Per-user lengths of warm-up batches whose graph keys cover ``coverage`` of the dynamic
    batches (1..max_users users) that log-normal histories form.

    Sampling batches finds the frequent keys but misses the tail: 40-60% of a realistic mix then
    ran eagerly after warm-up (H200, run 4). Here, per users bucket, the length buckets are taken
    by frequency until ``coverage`` of that bucket's batches, and one batch is built per key with
    the bucket's users. Packed (``layout="packed"``): the key is ``packed_bucket``'s; the batch
    holds one token fewer than the bucket's top, the spare slot every batch of that key has.
    Padded: the key's length is the longest history's; the batch holds one history of the
    bucket's top length and shorter ones.
    """
    rng = np.random.default_rng(seed)
    padded = layout == "padded"
    counts: dict[int, dict[int, int]] = {}
    for b in range(1, max_users + 1):
        bb = bucket_users(b)
        lens = np.clip(np.rint(np.exp(rng.normal(np.log(median), sigma, (samples, b)))), 1, longest)
        if padded:
            keys = (bucket_tokens(int(n), minimum=16) for n in lens.max(axis=1))
        else:
            keys = (packed_bucket(b, int(t))[1] for t in lens.sum(axis=1))
        per_tokens = counts.setdefault(bb, {})
        for nb in keys:
            per_tokens[nb] = per_tokens.get(nb, 0) + 1
    batches = []
    for bb, per_tokens in sorted(counts.items()):
        total, taken = sum(per_tokens.values()), 0
        for nb, n in sorted(per_tokens.items(), key=lambda kv: -kv[1]):
            if taken >= coverage * total:
                break
            taken += n
            lengths = _padded_batch(bb, nb, longest) if padded else _packed_batch(bb, nb, longest)
            if lengths:
                batches.append(lengths)
    return batches


def _packed_batch(users: int, nb: int, longest: int) -> list[int] | None:
    tokens = min(nb - 1, users * longest)
    if tokens < users or packed_bucket(users, tokens)[1] != nb:
        return None  # no batch of these users has this key
    q, r = divmod(tokens, users)
    lengths = [q + 1] * r + [q] * (users - r)
    if users > 1 and r == 0 and 1 < q < longest:  # unequal lengths: the packed route
        lengths[0], lengths[-1] = q + 1, q - 1
    return lengths


def _padded_batch(users: int, nb: int, longest: int) -> list[int] | None:
    top = min(nb, longest)
    if bucket_tokens(top, minimum=16) != nb:
        return None
    return [top] + [max(1, top // 2)] * (users - 1)


def group_requests(
    lengths: Sequence[int],
    max_users: int,
    max_tokens: int,
    padded: bool = False,
    rows: Sequence[int] | None = None,
    sort: bool = True,
) -> list[list[int]]:
    """Split request indices into forwards of at most ``max_users`` users and ``max_tokens`` tokens.

    ``lengths``: each request's tokens per user (packed: valid tokens; padded: its seq_len);
    ``rows``: its users (default 1). With ``sort`` requests go shortest first, so a padded group
    pads to a length close to its members' own (bucketing); a packed group costs its sum, a
    padded one users x longest. A request larger than the limits gets a group of its own.
    """
    rows = [1] * len(lengths) if rows is None else list(rows)
    order = (
        sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if sort else range(len(lengths))
    )
    groups: list[list[int]] = []
    cur: list[int] = []
    users = cost = longest = 0
    for i in order:
        n, r = max(int(lengths[i]), 1), int(rows[i])
        new_cost = (users + r) * max(longest, n) if padded else cost + r * n
        if cur and (users + r > max_users or new_cost > max_tokens):
            groups.append(cur)
            cur, users, longest = [], 0, 0
            new_cost = r * n
        cur.append(i)
        users, cost, longest = users + r, new_cost, max(longest, n)
    if cur:
        groups.append(cur)
    return groups


# -- token layouts ----------------------------------------------------------------------------
@dataclass
class Tokens:
    """One forward's inputs, already on the device.

    kind "dense": B x T, no padding; "padded": B x T with additive masks; "packed": the valid
    tokens of S user slots back to back, ``cu``/``cu_mem`` their int32 offsets in the token and
    memory (null slot + tokens) matrices, ``max_len`` a bound on any slot's length; "inputs":
    the caller's B x T tensors (``inputs``; ``ids`` their [4, B * T] stack once materialized),
    packed on the device by the forward itself (no host round trip).
    ``staged``/``layout``: the host copy of every index tensor in one buffer (see ``Staging``),
    when the layout was built on the host; ``buf`` the device buffer they are views of.
    """

    kind: str
    users: int
    max_len: int
    ids: torch.Tensor  # [3, N] int64
    pos: torch.Tensor  # [N] int64
    cu: torch.Tensor | None = None
    cu_mem: torch.Tensor | None = None
    tok_to_mem: torch.Tensor | None = None
    null_idx: torch.Tensor | None = None
    cu_beams: dict | None = None  # beams -> [S+1] int32 query offsets for cross-attention
    lengths: tuple[int, ...] | None = None  # host copy (reference kernel)
    enc_mask: torch.Tensor | None = None
    mem_mask: torch.Tensor | None = None
    key: tuple | None = None  # the CUDA-graph key when the layout is already bucketed
    staged: torch.Tensor | None = None
    layout: dict | None = None
    buf: torch.Tensor | None = None
    inputs: tuple | None = None  # kind "inputs": (l1, l2, l3, mask), int64 [B, T] each

    def tensors(self) -> list[torch.Tensor]:
        out = [self.ids, self.pos]
        for name in ("cu", "cu_mem", "tok_to_mem", "null_idx", "enc_mask", "mem_mask"):
            if getattr(self, name) is not None:
                out.append(getattr(self, name))
        out.extend(self.cu_beams.values() if self.cu_beams else [])
        return out


def valid_tokens(l1, l2, l3, mask, sizes):
    """Positions the model reads: mask > 0 and every id inside its codebook (numpy or torch)."""
    valid = mask > 0
    for ids, size in zip((l1, l2, l3), sizes, strict=True):
        valid = valid & (ids >= 0) & (ids < size)
    return valid


def packed_index(
    lengths: Sequence[int], extra: Sequence[int] = (), out: dict | None = None
) -> dict[str, np.ndarray]:
    """Host-side offsets for user slots of ``lengths`` followed by ``extra`` (dummy) slots:
    ``cu`` / ``cu_mem`` (int32) start each slot's tokens / memory rows (a null row, then its
    tokens), ``null_idx`` and ``tok_to_mem`` place them in the memory. Written into ``out``'s
    arrays of those names (views of a staging buffer, say) when given."""
    lens = np.asarray(list(lengths) + list(extra), dtype=np.int64)
    s, n = len(lens), int(lens.sum())
    if out is None:
        out = {
            "cu": np.empty(s + 1, np.int32),
            "cu_mem": np.empty(s + 1, np.int32),
            "tok_to_mem": np.empty(n, np.int64),
            "null_idx": np.empty(s, np.int64),
        }
    cu = out["cu"]
    cu[0] = 0
    np.cumsum(lens, out=cu[1:])
    slots = np.arange(s + 1, dtype=np.int32)
    np.add(cu, slots, out=out["cu_mem"])
    out["null_idx"][:] = out["cu_mem"][:-1]
    np.add(np.repeat(slots[1:], lens), np.arange(n), out=out["tok_to_mem"])
    return out


def packed_layout(slots: int, tokens: int, beams: int) -> dict:
    """name -> (offset, length, dtype) of a packed forward's index tensors in one int64 buffer
    (int32 tensors take half an int64 slot per value). A function of (slots, tokens) alone, so a
    CUDA graph's static inputs can be views of one buffer that a single copy refills."""
    fields = [
        ("ids", 3 * tokens, torch.int64),
        ("pos", tokens, torch.int64),
        ("tok_to_mem", tokens, torch.int64),
        ("null_idx", slots, torch.int64),
        ("cu", slots + 1, torch.int32),
        ("cu_mem", slots + 1, torch.int32),
    ]
    fields += [(f"cu_beams_{b}", slots + 1, torch.int32) for b in sorted({1, beams})]
    out, offset = {}, 0
    for name, n, dtype in fields:
        out[name] = (offset, n, dtype)
        offset += n if dtype == torch.int64 else -(-n // 2)
    out["_total"] = offset
    return out


def dense_layout(users: int, width: int) -> dict:
    n = users * width
    return {"ids": (0, 3 * n, torch.int64), "pos": (3 * n, n, torch.int64), "_total": 4 * n}


def layout_views(buf: torch.Tensor, layout: dict, as_numpy: bool = False) -> dict:
    """Views of ``buf`` (int64) per field of ``layout``; numpy views when ``as_numpy``."""
    out = {}
    for name, spec in layout.items():
        if name == "_total":
            continue
        offset, n, dtype = spec
        if dtype == torch.int64:
            v = buf[offset : offset + n]
        else:
            v = buf[offset : offset + -(-n // 2)].view(torch.int32)[:n]
        out[name] = v.numpy() if as_numpy else v
    return out


def to_host(x: torch.Tensor, host: bool | str = True) -> torch.Tensor:
    """``x`` in host memory: a blocking copy, or with ``host="async"`` a copy queued on the
    current stream into pinned memory (torch pins the destination of a non-blocking copy out of
    a CUDA device), valid once the stream has got there."""
    if host == "async" and x.is_cuda:
        return x.to("cpu", non_blocking=True)
    return x.cpu()


class Staging:
    """A growing host buffer for index arrays; pinned when the engine runs on CUDA, so the copy
    to the device is one asynchronous transfer. ``take`` waits until the previous transfer out
    of the buffer has finished before handing it out again."""

    def __init__(self, device: torch.device, blocking: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buf = torch.empty(0, dtype=torch.int64)
        self.event = None
        self.blocking = blocking  # the wait in take() blocks the thread instead of spinning
        self.waited_s = 0.0  # time take() spent waiting for the previous copy (profiling)

    def take(self, n: int) -> torch.Tensor:
        if self.event is not None:
            if not self.event.query():
                t = time.perf_counter()
                self.event.synchronize()
                self.waited_s += time.perf_counter() - t
            self.event = None
        if self.buf.numel() < n:
            size = max(n, 2 * self.buf.numel())
            self.buf = torch.empty(size, dtype=torch.int64, pin_memory=self.cuda)
        return self.buf[:n]

    def copy_to(self, staged: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """``staged`` on the device (into ``dst`` when given): one copy, asynchronous on CUDA."""
        if not self.cuda:
            return staged.clone() if dst is None else dst.copy_(staged)
        if dst is None:
            dst = torch.empty_like(staged, device=self.device)
        dst.copy_(staged, non_blocking=True)
        self.event = torch.cuda.Event(blocking=self.blocking)
        self.event.record(torch.cuda.current_stream(self.device))
        return dst


# -- a dynamic batch --------------------------------------------------------------------------
@dataclass
class FlatBatch:
    """All requests of a dynamic batch: ``values[i]`` holds input i of every request back to back
    (request-major, then row-major), so row r's tokens are ``values[:, starts[r]:starts[r] +
    widths[r]]``. ``rows``/``seq`` per request; ``checked``: the caller verified that every id
    is inside its codebook and every mask value is 0/1 (then validity is the mask alone)."""

    values: np.ndarray  # [4, N] int64
    rows: np.ndarray  # [R] users per request
    seq: np.ndarray  # [R] seq_len per request
    checked: bool = False

    @classmethod
    def from_requests(
        cls, requests: Sequence, checked: bool = False, validate: bool = True
    ) -> FlatBatch:
        """From per-request inputs: dicts by name or sequences in ``INPUT_NAMES`` order, each a
        ``[b_i, T_i]`` array. One concatenate per input. ``validate=False``: the caller already
        checked that each request's four inputs are 2-D arrays of one shape."""
        reqs = [[r[k] for k in INPUT_NAMES] if isinstance(r, dict) else list(r) for r in requests]
        if validate:
            reqs = [[np.asarray(a) for a in r] for r in reqs]
            for r in reqs:
                s = r[0].shape
                if len(s) != 2 or any(a.shape != s for a in r[1:]):
                    raise ValueError(
                        f"each request needs four [batch, seq_len] inputs of one shape, "
                        f"got {[a.shape for a in r]}"
                    )
        shapes = [r[0].shape for r in reqs]
        total = sum(s[0] * s[1] for s in shapes)
        values = np.empty((4, total), dtype=np.int64)
        for i in range(4):
            if len(reqs) == 1:
                values[i] = reqs[0][i].ravel()
            else:
                np.concatenate([r[i].ravel() for r in reqs], out=values[i])
        rows = np.fromiter((s[0] for s in shapes), dtype=np.int64, count=len(shapes))
        seq = np.fromiter((s[1] for s in shapes), dtype=np.int64, count=len(shapes))
        return cls(values, rows, seq, checked)

    @classmethod
    def concat(cls, batches: Sequence[FlatBatch]) -> FlatBatch:
        """One batch of these batches' requests, in order (checked if each one is)."""
        return cls(
            np.concatenate([b.values for b in batches], axis=1),
            np.concatenate([b.rows for b in batches]),
            np.concatenate([b.seq for b in batches]),
            all(b.checked for b in batches),
        )

    @property
    def users(self) -> int:
        return int(self.rows.sum())

    def row_widths(self) -> np.ndarray:
        return np.repeat(self.seq, self.rows)

    def row_starts(self, widths: np.ndarray | None = None) -> np.ndarray:
        w = self.row_widths() if widths is None else widths
        starts = np.zeros(len(w), dtype=np.int64)
        np.cumsum(w[:-1], out=starts[1:])
        return starts

    def valid(self, sizes) -> np.ndarray:
        """[N] bool: the positions the model reads."""
        if self.checked:
            return self.values[3] > 0
        return valid_tokens(*self.values, sizes)

    def row_lengths(self, valid: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        """Valid tokens per row (one reduceat over the batch)."""
        starts = self.row_starts() if starts is None else starts
        return np.add.reduceat(valid.astype(np.int64), starts)

    def columns(self, widths: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """[N] each position's column within its row."""
        return np.arange(self.values.shape[1]) - np.repeat(starts, widths)

    def padded(self, width: int | None = None) -> list[np.ndarray]:
        """The four inputs as [users, width] arrays, right-padded with 0 (mask 0)."""
        widths = self.row_widths()
        width = int(widths.max()) if width is None else width
        if (widths == width).all():
            return [v.reshape(-1, width) for v in self.values]
        row = np.repeat(np.arange(len(widths)), widths)
        col = self.columns(widths, self.row_starts(widths))
        out = np.zeros((4, len(widths), width), dtype=np.int64)
        out[:, row, col] = self.values
        return list(out)

    def subset(self, requests: Sequence[int]) -> FlatBatch:
        """The batch of these requests only (in this order)."""
        sizes = self.rows * self.seq
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        parts = [self.values[:, starts[i] : starts[i + 1]] for i in requests]
        idx = np.asarray(requests, dtype=np.int64)
        return FlatBatch(np.concatenate(parts, axis=1), self.rows[idx], self.seq[idx], self.checked)
