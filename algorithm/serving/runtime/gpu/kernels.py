"""Fused kernels for GpuEngine: Triton on CUDA, the same functions in torch ops elsewhere.

Each public function removes memory-bound passes (or launches) that the plain engine spends
between its matrix products:
- ``add_layernorm``: residual add + LayerNorm in one pass (bf16 in/out, fp32 statistics); it can
  gather its input rows (decoder code embeddings), broadcast a row (level embeddings) and scatter
  its output rows (the encoder's last norm writes straight into the memory matrix beside the null
  slots), so the residual stream is read and written once per sub-layer;
- ``embed_layernorm``: the three item embeddings + position embedding summed and normalized;
- ``step_attention``: a beam step's self-attention over its <= 3 prefix tokens, reading the keys
  and values from the earlier steps' QKV outputs through the beam's parent row, so the decoder
  needs no K/V cache copies, expansions or gathers;
- ``logsumexp_groupmax``: one pass over fp32 logits (torch's takes several), optionally
  writing the max of each group of columns for a grouped top-k.
- ``topk_groups`` / ``topk_in_groups`` / ``beam_select``: a beam level's grouped top-k, with the
  next beams' histories and parents, in three launches;
- ``input_validity``: ``engine(l1, l2, l3, mask)``'s inputs read and checked in one launch;
  ``pack_inputs``: the same inputs packed on the device (the sync-free route: no host round trip).

The torch versions are the reference (tests on CPU run them) and the fallback when Triton is
absent. Every Triton kernel is CUDA-graph capturable: no host syncs, no allocations inside.
``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors (development checks).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from algorithm.serving.runtime.gpu.batch import valid_tokens

TRITON = importlib.util.find_spec("triton") is not None
# add+LayerNorm launch shape (rows per program, warps): the fastest of 20 in kernels_smoke.py on
# the H100 at 65536 x 512 bf16 (0.132 ms, 2.03 TB/s; torch's add then LayerNorm 0.191 ms)
ADD_LN_ROWS, ADD_LN_WARPS = 4, 2
# the norm-only form (a broadcast row added, no residual stored: the engine's residual_gemm
# encoder): the fastest of 16 in benchmarks/gpu/model_alone.py's sweep on the H100 at 65536 x
# 512 in issue 14 run 12 (0.091 ms against 0.099 for the add+LayerNorm shape). Run 13's sweep
# ranked it lower (0.113 ms; 8 rows and 4 warps 0.094): the shapes sit within ~20% of each
# other and the sweeps' noise; runs 13 and 15 timed the engine with this one.
NORM_ROWS, NORM_WARPS = 8, 1
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device."""
    return TRITON and (t.is_cuda or _INTERPRET)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _rows(x: torch.Tensor) -> tuple[int, int]:
    """(row stride, columns) of a 2-D tensor whose last dim is contiguous (stride 0 = broadcast)."""
    if x.dim() != 2 or (x.stride(1) != 1 and x.shape[1] > 1):
        raise ValueError(
            f"expected a 2-D tensor with contiguous rows, got {tuple(x.shape)} {x.stride()}"
        )
    return x.stride(0), x.shape[1]


# -- torch reference versions -------------------------------------------------------------------
def _add_layernorm_torch(
    x, residual, norm, x_rows, out, out_rows, segment, store_residual, out_dtype
):
    r = x if x_rows is None else x[x_rows]
    if residual is not None:
        r = r + residual
    w, b = norm.weight.to(r.dtype), norm.bias.to(r.dtype)  # r is fp32 when residual is
    h = F.layer_norm(r, r.shape[-1:], w, b, norm.eps).to(out_dtype)
    if out is None:
        return (r if store_residual else None), h
    if out_rows is None:
        n = h.shape[0]
        idx = torch.arange(n, device=h.device)
        out_rows = idx + idx // segment + 1
    out.index_copy_(0, out_rows, h)
    return (r if store_residual else None), out


def _step_attention_torch(qkv, past, parent, beams, heads):
    r, d = qkv.shape[0], qkv.shape[1] // 3
    dh = d // heads
    q, k, v = qkv.view(r, 3, heads, dh).float().unbind(1)
    user = torch.arange(r, device=qkv.device) // beams
    keys, vals = [], []
    for p, rows in zip(past, (user, parent), strict=False):
        pk, pv = p.view(-1, 3, heads, dh)[rows, 1:].float().unbind(1)
        keys.append(pk)
        vals.append(pv)
    keys = torch.stack([*keys, k], 1)  # [R, t, H, Dh]
    vals = torch.stack([*vals, v], 1)
    a = ((q.unsqueeze(1) * keys).sum(-1) / math.sqrt(dh)).softmax(1)  # [R, t, H]
    return (a.unsqueeze(-1) * vals).sum(1).reshape(r, d).to(qkv.dtype)


# -- Triton kernels -----------------------------------------------------------------------------
if TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_ln_kernel(
        x_ptr, xrow_ptr, r_ptr, w_ptr, b_ptr, res_ptr, out_ptr, orow_ptr,
        n_rows, stride_x, stride_r, segment, n_cols, eps,
        BLOCK: tl.constexpr, ROWS: tl.constexpr, GATHER: tl.constexpr, HAS_RES: tl.constexpr,
        STORE_RES: tl.constexpr, SCATTER: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        rok = rows < n_rows
        cols = tl.arange(0, BLOCK)
        ok = rok[:, None] & (cols < n_cols)[None, :]
        if GATHER:  # noqa: SIM108 (a statement-level constexpr branch: compiled out)
            src = tl.load(xrow_ptr + rows, mask=rok, other=0).to(tl.int64)
        else:
            src = rows
        x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        if HAS_RES:
            r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
            x += r.to(tl.float32)
        # the stored residual is rounded to its dtype; normalize that same value
        x = x.to(res_ptr.dtype.element_ty).to(tl.float32)
        if STORE_RES:
            dst = res_ptr + rows[:, None] * n_cols + cols[None, :]
            tl.store(dst, x.to(res_ptr.dtype.element_ty), mask=ok)
        mean = tl.sum(x, 1) / n_cols
        xc = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        if SCATTER == 1:
            orow = tl.load(orow_ptr + rows, mask=rok, other=0).to(tl.int64)
        elif SCATTER == 2:
            orow = rows + rows // segment + 1
        else:
            orow = rows
        dst = out_ptr + orow[:, None] * n_cols + cols[None, :]
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _embed_ln_kernel(
        ids_ptr, pos_ptr, e0_ptr, e1_ptr, e2_ptr, ep_ptr, w_ptr, b_ptr, x_ptr, h_ptr,
        n_rows, n_cols, eps, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        i0 = tl.load(ids_ptr + row)
        i1 = tl.load(ids_ptr + n_rows + row)
        i2 = tl.load(ids_ptr + 2 * n_rows + row)
        p = tl.load(pos_ptr + row)
        x = tl.load(e0_ptr + i0 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        x += tl.load(e1_ptr + i1 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        x += tl.load(e2_ptr + i2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        x += tl.load(ep_ptr + p * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(x_ptr + row * n_cols + cols, x.to(x_ptr.dtype.element_ty), mask=ok)
        mean = tl.sum(x, 0) / n_cols
        xc = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(
            h_ptr + row * n_cols + cols, (xc * rstd * w + b).to(h_ptr.dtype.element_ty), mask=ok
        )

    @triton.jit
    def _step_attn_kernel(
        qkv_ptr, p1_ptr, p2_ptr, parent_ptr, out_ptr, beams, scale,
        T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        d = H * DH
        offs = tl.arange(0, H)[:, None] * DH + tl.arange(0, DH)[None, :]  # [H, DH]
        base = qkv_ptr + row * 3 * d
        q = tl.load(base + offs).to(tl.float32)
        kn = tl.load(base + d + offs).to(tl.float32)
        vn = tl.load(base + 2 * d + offs).to(tl.float32)
        p1 = p1_ptr + (row // beams) * 3 * d  # the user's step-1 token
        k1 = tl.load(p1 + d + offs).to(tl.float32)
        v1 = tl.load(p1 + 2 * d + offs).to(tl.float32)
        s1 = tl.sum(q * k1, 1) * scale  # [H]
        sn = tl.sum(q * kn, 1) * scale
        if T == 3:  # the parent beam's step-2 token
            p2 = p2_ptr + tl.load(parent_ptr + row).to(tl.int64) * 3 * d
            k2 = tl.load(p2 + d + offs).to(tl.float32)
            v2 = tl.load(p2 + 2 * d + offs).to(tl.float32)
            s2 = tl.sum(q * k2, 1) * scale
            m = tl.maximum(tl.maximum(s1, sn), s2)
            e1, e2, en = tl.exp(s1 - m), tl.exp(s2 - m), tl.exp(sn - m)
            acc = e1[:, None] * v1 + e2[:, None] * v2 + en[:, None] * vn
            den = e1 + e2 + en
        else:
            m = tl.maximum(s1, sn)
            e1, en = tl.exp(s1 - m), tl.exp(sn - m)
            acc = e1[:, None] * v1 + en[:, None] * vn
            den = e1 + en
        o = acc / den[:, None]
        tl.store(out_ptr + row * d + offs, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _lse_kernel(x_ptr, out_ptr, gmax_ptr, n_cols, BLOCK: tl.constexpr, GROUP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            x = tl.load(x_ptr + row * n_cols + start + cols, mask=start + cols < n_cols,
                        other=float("-inf")).to(tl.float32)  # fmt: skip
            if GROUP > 0:  # the max of each group of GROUP columns, from the same read
                g = tl.max(tl.reshape(x, [BLOCK // GROUP, GROUP]), 1)
                gi = start // GROUP + tl.arange(0, BLOCK // GROUP)
                tl.store(gmax_ptr + row * (n_cols // GROUP) + gi, g, mask=gi < n_cols // GROUP)
            m_new = tl.maximum(m, x)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - safe) + tl.exp(x - safe)
            m = m_new
        top = tl.max(m, 0)
        total = tl.sum(s * tl.exp(m - top), 0)
        tl.store(out_ptr + row, tl.log(total) + top)

    @triton.jit
    def _order_key(x):
        """fp32 -> int32 whose signed order is the floats' order (NaN aside)."""
        bits = x.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _select_topk(key, ok, k):
        """(mask of exactly ``k`` lanes holding the ``k`` largest keys, each taken lane's slot in
        [0, k)): the k-th largest key by bisection over its 32 bits (one count per bit), then
        every lane above it and, of the lanes equal to it, the first ones."""
        lo = tl.min(tl.where(ok, key, 2147483647), 0).to(tl.int64)
        hi = tl.max(tl.where(ok, key, -2147483648), 0).to(tl.int64)
        for _ in range(32):  # invariant: >= k keys >= lo, < k keys > hi
            mid = lo + (hi - lo + 1) // 2
            up = tl.sum((ok & (key >= mid.to(tl.int32))).to(tl.int32), 0) >= k
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid - 1)
        t = lo.to(tl.int32)
        gt = ok & (key > t)
        eq = ok & (key == t)
        need = k - tl.sum(gt.to(tl.int32), 0)
        take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
        return take, tl.cumsum(take.to(tl.int32), 0) - 1

    @triton.jit
    def _topk_idx_kernel(x_ptr, idx_ptr, n, k, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        ok = lanes < n
        x = tl.load(x_ptr + row * n + lanes, mask=ok, other=0.0).to(tl.float32)
        take, slot = _select_topk(_order_key(x), ok, k)
        tl.store(idx_ptr + row * k + slot, lanes.to(tl.int64), mask=take)

    @triton.jit
    def _topk_in_groups_kernel(
        x_ptr, gidx_ptr, lse_ptr, score_ptr, val_ptr, code_ptr, n_cols, k,
        G: tl.constexpr, HAS_SCORE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        ok = lanes < k * G
        grp = tl.load(gidx_ptr + row * k + lanes // G, mask=ok, other=0)
        col = grp * G + lanes % G
        x = tl.load(x_ptr + row * n_cols + col, mask=ok, other=0.0)
        take, slot = _select_topk(_order_key(x), ok, k)  # the logits' own order, as torch's
        v = x - tl.load(lse_ptr + row)
        if HAS_SCORE:
            v = tl.load(score_ptr + row) + v
        tl.store(val_ptr + row * k + slot, v, mask=take)
        tl.store(code_ptr + row * k + slot, col, mask=take)

    @triton.jit
    def _beam_select_kernel(
        val_ptr, code_ptr, hist_ptr, score_ptr, hist_out_ptr, parent_ptr, new_ptr, n, per,
        beams, k, P: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
    ):  # fmt: skip
        s = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        ok = lanes < n
        v = tl.load(val_ptr + s * n + lanes, mask=ok, other=0.0)
        take, slot = _select_topk(_order_key(v), ok, k)
        # the k winners, compacted into this user's output rows, then ranked there (descending
        # value, ties by candidate index) and written in rank order
        tl.store(score_ptr + s * k + slot, v, mask=take)
        tl.store(parent_ptr + s * k + slot, lanes.to(tl.int64), mask=take)
        tl.debug_barrier()
        i = tl.arange(0, KB)
        mine = i < k
        sv = tl.load(score_ptr + s * k + i, mask=mine, other=float("-inf"))
        sf = tl.load(parent_ptr + s * k + i, mask=mine, other=0)
        before = (sv[None, :] > sv[:, None]) | (
            (sv[None, :] == sv[:, None]) & (sf[None, :] < sf[:, None])
        )
        rank = tl.sum((before & mine[None, :]).to(tl.int32), 1)
        tl.debug_barrier()
        beam = sf // per
        dst = s * k + rank
        tl.store(score_ptr + dst, sv, mask=mine)
        tl.store(parent_ptr + dst, s * beams + beam, mask=mine)
        code = tl.load(code_ptr + s * n + sf, mask=mine, other=0)
        tl.store(new_ptr + dst, code, mask=mine)
        for p in tl.static_range(P):
            h = tl.load(hist_ptr + (s * beams + beam) * P + p, mask=mine, other=0)
            tl.store(hist_out_ptr + dst * (P + 1) + p, h, mask=mine)
        tl.store(hist_out_ptr + dst * (P + 1) + P, code, mask=mine)

    @triton.jit
    def _inputs_kernel(
        l1_ptr, l2_ptr, l3_ptr, m_ptr, ids_ptr, valid_ptr, len_ptr, t, plane, c1, c2, c3,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], tl.int32)
        for start in range(0, t, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < t
            off = row * t + cols
            a = tl.load(l1_ptr + off, mask=ok, other=0)
            b = tl.load(l2_ptr + off, mask=ok, other=0)
            c = tl.load(l3_ptr + off, mask=ok, other=0)
            m = tl.load(m_ptr + off, mask=ok, other=0)
            v = _valid(a, b, c, m, ok, c1, c2, c3)
            tl.store(ids_ptr + off, a, mask=ok)
            tl.store(ids_ptr + plane + off, b, mask=ok)
            tl.store(ids_ptr + 2 * plane + off, c, mask=ok)
            tl.store(valid_ptr + off, v.to(tl.int8), mask=ok)
            acc += v.to(tl.int32)
        tl.store(len_ptr + row, tl.sum(acc, 0).to(tl.int64))

    @triton.jit
    def _pack_kernel(
        raw_ptr, ids_ptr, pos_ptr, cu_ptr, cum_ptr, null_ptr, t2m_ptr, B, T, c1, c2, c3,
        BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        # one program: B x T <= PACK_MAX_POSITIONS positions, read twice (lengths, then places)
        n = B * T
        cols = tl.arange(0, BLOCK_T)
        ok = cols < T
        slots = tl.arange(0, BLOCK_B)
        lens = tl.zeros([BLOCK_B], tl.int64)
        for b in range(0, B):
            v = _valid_row(raw_ptr, b, T, n, cols, ok, c1, c2, c3)
            lens += tl.where(slots == b, tl.sum(v.to(tl.int64), 0), 0)
        total = tl.sum(lens, 0)
        start = tl.cumsum(lens, 0) - lens  # each user's first packed token
        real = slots < B
        tl.store(cu_ptr + slots, start.to(tl.int32), mask=real)
        tl.store(cum_ptr + slots, (start + slots).to(tl.int32), mask=real)
        tl.store(null_ptr + slots, start + slots, mask=real)
        tl.store(cu_ptr + B, total.to(tl.int32))
        tl.store(cum_ptr + B, (total + B).to(tl.int32))
        for b in range(0, B):
            v = _valid_row(raw_ptr, b, T, n, cols, ok, c1, c2, c3)
            first = tl.sum(tl.where(slots == b, start, 0), 0)
            vi = v.to(tl.int64)
            dest = tl.where(
                v,
                first + tl.cumsum(vi, 0) - 1,
                total + (b * T - first) + tl.cumsum((1 - vi) * ok.to(tl.int64), 0) - 1,
            )
            tl.store(pos_ptr + dest, cols.to(tl.int64), mask=ok)
            tl.store(t2m_ptr + dest, dest + tl.where(v, b + 1, B).to(tl.int64), mask=ok)
            for c in tl.static_range(3):
                i = tl.load(raw_ptr + c * n + b * T + cols, mask=ok, other=0)
                tl.store(ids_ptr + c * n + dest, tl.where(v, i, 0), mask=ok)

    @triton.jit
    def _valid_row(raw_ptr, b, T, n, cols, ok, c1, c2, c3):
        off = b * T + cols
        a = tl.load(raw_ptr + off, mask=ok, other=0)
        d = tl.load(raw_ptr + n + off, mask=ok, other=0)
        c = tl.load(raw_ptr + 2 * n + off, mask=ok, other=0)
        m = tl.load(raw_ptr + 3 * n + off, mask=ok, other=0)
        return _valid(a, d, c, m, ok, c1, c2, c3)

    @triton.jit
    def _valid(a, b, c, m, ok, c1, c2, c3):
        """``batch.valid_tokens`` on loaded lanes (``ok``: the lanes inside the row)."""
        return ok & (m > 0) & (a >= 0) & (a < c1) & (b >= 0) & (b < c2) & (c >= 0) & (c < c3)


# -- public -------------------------------------------------------------------------------------
def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm,
    *,
    x_rows: torch.Tensor | None = None,
    store_residual: bool = True,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    segment: int = 0,
    out_dtype: torch.dtype | None = None,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
):
    """``r = x[x_rows] + residual``; returns ``(r, layer_norm(r))`` (``r`` None unless stored).

    ``x``/``residual``: [N, D] or a broadcast row (``t.expand(N, D)``, row stride 0). With
    ``out`` the normalized rows go to ``out[out_rows[i]]``, or with ``segment`` to
    ``out[i + i // segment + 1]`` (dense memory: one null slot ahead of each user), and ``out``
    is returned in their place.
    """
    n = (
        residual.shape[0]
        if residual is not None
        else (x.shape[0] if x_rows is None else x_rows.shape[0])
    )
    d = x.shape[1]
    dtype = residual.dtype if residual is not None else x.dtype
    out_dtype = out_dtype or (out.dtype if out is not None else dtype)
    if out is not None and out_rows is None and segment < 1:
        raise ValueError("add_layernorm: out needs out_rows or segment >= 1")
    if not triton_usable(x):
        return _add_layernorm_torch(
            x, residual, norm, x_rows, out, out_rows, segment, store_residual, out_dtype
        )
    stride_x, _ = _rows(x)
    stride_r = _rows(residual)[0] if residual is not None else 0
    # not stored: a one-element tensor still tells the kernel the residual's dtype (rounding)
    res = torch.empty(n if store_residual else 1, d, device=x.device, dtype=dtype)
    dst = out if out is not None else torch.empty(n, d, device=x.device, dtype=out_dtype)
    scatter = 0 if out is None else (1 if out_rows is not None else 2)
    norm_only = not store_residual and stride_r == 0
    per = rows_per_program or (NORM_ROWS if norm_only else ADD_LN_ROWS)
    _add_ln_kernel[(triton.cdiv(n, per),)](
        x, x_rows if x_rows is not None else x, residual if residual is not None else x,
        norm.weight, norm.bias, res, dst, out_rows if out_rows is not None else x,
        n, stride_x, stride_r, max(segment, 1), d, norm.eps,
        BLOCK=triton.next_power_of_2(d), ROWS=per, GATHER=x_rows is not None,
        HAS_RES=residual is not None, STORE_RES=store_residual, SCATTER=scatter,
        num_warps=num_warps or (NORM_WARPS if norm_only else ADD_LN_WARPS),
    )  # fmt: skip
    return (res if store_residual else None), dst


def input_validity(l1, l2, l3, mask, sizes, fused=True):
    """The engine's inputs read once: (ids [3, B, T] int64, valid [B, T] bool, lengths [B]
    int64), valid where ``mask > 0`` and every id lies inside its codebook (``sizes``,
    ``batch.valid_tokens``). All four inputs are int64 [B, T]. One launch on CUDA (``fused``);
    else the torch form (no host tensor: capturable too)."""
    if not fused or not triton_usable(l1):
        valid = valid_tokens(l1, l2, l3, mask, sizes)
        return torch.stack([l1, l2, l3]), valid, valid.sum(1)
    b, t = l1.shape
    l1, l2, l3, mask = (a.contiguous() for a in (l1, l2, l3, mask))
    ids = torch.empty(3, b, t, device=l1.device, dtype=torch.int64)
    valid = torch.empty(b, t, device=l1.device, dtype=torch.int8)
    lengths = torch.empty(b, device=l1.device, dtype=torch.int64)
    _inputs_kernel[(b,)](
        l1, l2, l3, mask, ids, valid, lengths, t, b * t, *sizes,
        BLOCK=min(1024, triton.next_power_of_2(t)), num_warps=4,
    )  # fmt: skip
    return ids, valid.view(torch.bool), lengths


# ``pack_inputs`` runs as one program: the sync-free route's inputs stay this small
PACK_MAX_POSITIONS = 8192


def pack_inputs(raw, sizes, fused=True):
    """A packed layout of [B, T] inputs built on their device, without a host round trip.

    ``raw``: int64 [4, B, T] (ids of the three levels, then the mask). Valid positions
    (``mask > 0`` and every id inside its codebook, as ``input_validity``) are packed user by
    user, with the offsets ``packed_index`` gives for their lengths. The padding positions
    follow outside every slot (ids 0; their memory rows after the last slot's): a forward
    computes their rows and no slot reads them. Returns (ids [3, N], pos [N], cu int32
    [B + 1], cu_mem int32 [B + 1], null_idx [B], tok_to_mem [N]) with N = B * T. One launch
    on CUDA (``fused``, B * T <= ``PACK_MAX_POSITIONS``); else the torch form (capturable too:
    no host copies or syncs)."""
    _, b, t = raw.shape
    n = b * t
    if not fused or not triton_usable(raw) or n > PACK_MAX_POSITIONS:
        return _pack_inputs_torch(raw, sizes)
    raw = raw.contiguous()
    dev = raw.device
    ids = torch.empty(3, n, device=dev, dtype=torch.int64)
    pos = torch.empty(n, device=dev, dtype=torch.int64)
    cu = torch.empty(b + 1, device=dev, dtype=torch.int32)
    cu_mem = torch.empty(b + 1, device=dev, dtype=torch.int32)
    null_idx = torch.empty(b, device=dev, dtype=torch.int64)
    tok_to_mem = torch.empty(n, device=dev, dtype=torch.int64)
    _pack_kernel[(1,)](
        raw, ids, pos, cu, cu_mem, null_idx, tok_to_mem, b, t, *sizes,
        BLOCK_T=triton.next_power_of_2(t), BLOCK_B=triton.next_power_of_2(b), num_warps=4,
    )  # fmt: skip
    return ids, pos, cu, cu_mem, null_idx, tok_to_mem


def _pack_inputs_torch(raw, sizes):
    _, b, t = raw.shape
    n, dev = b * t, raw.device
    _, valid, lengths = input_validity(*raw, sizes, fused=False)
    v = valid.reshape(-1)
    total = lengths.sum()
    dest = torch.where(v, v.long().cumsum(0), total + (~v).long().cumsum(0)) - 1
    user = torch.arange(n, device=dev) // t
    packed = torch.zeros(3, n, device=dev, dtype=torch.int64)
    packed[:, dest] = torch.where(valid, raw[:3], 0).reshape(3, n)
    pos = torch.empty(n, device=dev, dtype=torch.int64)
    pos[dest] = torch.arange(t, device=dev).repeat(b)
    tok_to_mem = torch.empty(n, device=dev, dtype=torch.int64)
    tok_to_mem[dest] = dest + torch.where(v, user + 1, b)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    cu_mem = cu + torch.arange(b + 1, device=dev)
    return packed, pos, cu.int(), cu_mem.int(), cu_mem[:-1].clone(), tok_to_mem


def embed_layernorm(ids, pos, tables, norm, num_warps: int = 4):
    """``x = sum(table[i][ids[i]]) + pos_table[pos]``; returns ``(x, layer_norm(x))``.

    ``ids``: [3, N] int64 (in range: invalid tokens are dropped or zeroed before), ``pos``: [N].
    """
    e0, e1, e2, ep = tables
    if not triton_usable(ids):
        x = e0[ids[0]] + e1[ids[1]] + e2[ids[2]] + ep[pos]
        return x, F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
    ids, pos = ids.contiguous(), pos.contiguous()
    n, d = ids.shape[1], e0.shape[1]
    x = torch.empty(n, d, device=ids.device, dtype=e0.dtype)
    h = torch.empty_like(x)
    _embed_ln_kernel[(n,)](
        ids, pos, e0, e1, e2, ep, norm.weight, norm.bias, x, h, n, d, norm.eps,
        BLOCK=triton.next_power_of_2(d), num_warps=num_warps,
    )  # fmt: skip
    return x, h


def step_attention(qkv, past, parent, beams: int, heads: int):
    """A beam step's self-attention for the newest token of each beam; returns [R, D].

    ``qkv``: [R, 3D] this step's projections (rows user-major, ``beams`` per user); ``past``:
    the earlier steps' QKV outputs, [users, 3D] for step 1 (key row = row // beams) and, at step
    3, [users * beams, 3D] for step 2 (key row = ``parent[row]``, the beam this one extends).
    """
    d = qkv.shape[1] // 3
    if not past:  # one key: softmax is 1, the output is the value itself
        return qkv[:, 2 * d :]
    if len(past) > 2 or (len(past) == 2) != (parent is not None):
        raise ValueError("step_attention: past holds 1 step (no parent) or 2 steps (parent)")
    dh = d // heads
    if not triton_usable(qkv) or not (_pow2(heads) and _pow2(dh)):
        return _step_attention_torch(qkv, past, parent, beams, heads)
    out = torch.empty(qkv.shape[0], d, device=qkv.device, dtype=qkv.dtype)
    p2 = past[1] if len(past) == 2 else qkv
    _step_attn_kernel[(qkv.shape[0],)](
        qkv, past[0], p2, parent if parent is not None else qkv, out, beams,
        1.0 / math.sqrt(dh), T=len(past) + 1, H=heads, DH=dh, num_warps=4,
    )  # fmt: skip
    return out


def logsumexp_groupmax_torch(x: torch.Tensor, group: int = 0):
    """``logsumexp_groupmax`` in plain torch (CPU, other dtypes, the unfused engine)."""
    gmax = x.unflatten(-1, (x.shape[-1] // group, group)).amax(-1) if group else None
    return torch.logsumexp(x, -1, keepdim=True), gmax


def logsumexp_groupmax(x: torch.Tensor, group: int = 0):
    """(logsumexp [..., 1], max of each ``group`` columns [..., C / group] or None) of fp32 [..., C].

    One pass over the logits; the group maxima let a top-k look at a few groups only.
    """
    c = x.shape[-1]
    if group and (c % group or not _pow2(group)):
        raise ValueError(f"logsumexp_groupmax: group {group} must be a power of 2 dividing {c}")
    if not triton_usable(x) or x.dtype != torch.float32:
        return logsumexp_groupmax_torch(x, group)
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], 1, device=x.device, dtype=torch.float32)
    gmax = torch.empty(*x.shape[:-1], c // group, device=x.device) if group else None
    block = max(min(4096, triton.next_power_of_2(c)), group)
    _lse_kernel[(x.numel() // c,)](
        x, out, gmax if group else out, c, BLOCK=block, GROUP=group, num_warps=8
    )
    return out, gmax


# -- the beam search's top-k (grouped, two stages) --------------------------------------------
# one program per row holds a row's candidates in registers: the fused path runs where they fit
TOPK_MAX_LANES, TOPK_MAX_K = 8192, 128


def topk_fits(k: int, groups: int, group: int, beams: int) -> bool:
    """Whether the fused beam kernels take a step of ``beams`` beams over ``groups`` groups of
    ``group`` codes (else the torch path: same winners)."""
    lanes = max(groups, k * group, beams * k)
    return k <= TOPK_MAX_K and groups >= k and lanes <= TOPK_MAX_LANES


def topk_groups(gmax: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of each row's ``k`` largest group maxima (fp32 [R, G]), in no order."""
    if not triton_usable(gmax):
        return gmax.topk(k, dim=-1, sorted=False)[1]
    gmax = gmax.contiguous()
    r, g = gmax.shape
    idx = torch.empty(r, k, device=gmax.device, dtype=torch.int64)
    _topk_idx_kernel[(r,)](gmax, idx, g, k, BLOCK=triton.next_power_of_2(g), num_warps=4)
    return idx


def topk_among_groups(logits, groups, group: int, sorted: bool = True):
    """Torch's top ``k`` of the last dim among the ``k`` groups (``groups`` [..., k]) of
    ``group`` columns: (values, columns), each [..., k]."""
    k = groups.shape[-1]
    cols = (groups.unsqueeze(-1) * group + torch.arange(group, device=logits.device)).flatten(-2)
    top, j = logits.gather(-1, cols).topk(k, dim=-1, sorted=sorted)
    return top, cols.gather(-1, j)


def extend_beams(hist, beam, new):
    """Each new beam's codes so far (``hist`` [S, beams, P] of the beam ``beam`` [S, k] it
    extends, then ``new`` [S, k]) and its parent row ``s * beams + beam`` ([S * k])."""
    s, beams, p = hist.shape
    kept = hist.gather(1, beam.unsqueeze(-1).expand(*beam.shape, p))
    parent = (torch.arange(s, device=beam.device).unsqueeze(1) * beams + beam).view(-1)
    return torch.cat([kept, new.unsqueeze(-1)], -1), parent


def topk_in_groups(logits, groups, group: int, lse, score=None):
    """Each row's top ``k`` logits among its ``k`` chosen groups (``groups`` [R, k]) of
    ``group`` columns, as log-probabilities (``logit - lse``, plus the row's beam ``score``):
    (values fp32 [R, k], columns int64 [R, k]), in no order. Chosen by the logits (as torch's
    top-k of the gathered logits is)."""
    r, k = groups.shape
    if not triton_usable(logits):
        top, cols = topk_among_groups(logits, groups, group, sorted=False)
        vals = top - lse.view(r, 1)
        if score is not None:
            vals = score.reshape(r, 1) + vals
        return vals, cols
    logits, groups = logits.contiguous(), groups.contiguous()
    vals = torch.empty(r, k, device=logits.device, dtype=torch.float32)
    codes = torch.empty(r, k, device=logits.device, dtype=torch.int64)
    _topk_in_groups_kernel[(r,)](
        logits, groups, lse.contiguous(), score.contiguous() if score is not None else lse,
        vals, codes, logits.shape[-1], k, G=group, HAS_SCORE=score is not None,
        BLOCK=triton.next_power_of_2(k * group), num_warps=4,
    )  # fmt: skip
    return vals, codes


def beam_select(vals, codes, hist, k: int):
    """The next beams: each user's ``k`` best candidates (``vals``/``codes`` [S, beams * per],
    candidate ``i`` extends beam ``i // per``), best first. ``hist`` [S, beams, P]: each beam's
    codes so far. Returns (scores [S, k], codes so far [S, k, P + 1], parent rows [S * k]
    (``s * beams + beam``), the new codes [S, k]); all int64 but the scores."""
    s, n = vals.shape
    beams, p = hist.shape[1], hist.shape[2]
    per = n // beams
    if not triton_usable(vals):
        scores, flat = vals.topk(k, dim=-1)
        new = codes.gather(1, flat)
        out, parent = extend_beams(hist, torch.div(flat, per, rounding_mode="floor"), new)
        return scores, out, parent, new
    dev = vals.device
    scores = torch.empty(s, k, device=dev, dtype=torch.float32)
    out = torch.empty(s, k, p + 1, device=dev, dtype=torch.int64)
    parent = torch.empty(s * k, device=dev, dtype=torch.int64)
    new = torch.empty(s, k, device=dev, dtype=torch.int64)
    _beam_select_kernel[(s,)](
        vals.contiguous(), codes.contiguous(), hist.contiguous(), scores, out, parent, new,
        n, per, beams, k, P=p, BLOCK=triton.next_power_of_2(n), KB=triton.next_power_of_2(k),
        num_warps=8,
    )  # fmt: skip
    return scores, out, parent, new
