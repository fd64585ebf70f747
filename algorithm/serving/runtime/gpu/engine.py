"""GpuEngine: the fast inference path for a UGTModel on CUDA (the same function, less work).

What it does differently from ``UGTModel.forward`` (which stays the reference; tests compare):
- weights in bf16/fp16; the output heads, log-softmax and beam scores in fp32;
- padding-free: the valid tokens of all users are packed into one ``[N, D]`` matrix and self-
  and cross-attention run per user through flash attention's variable-length kernel, so there is
  no float mask and no work on padding; a batch without padding may use dense SDPA instead;
  ``layout="padded"`` keeps the pad-to-longest + additive-mask path as the measured baseline;
- the decoder keeps its self-attention K/V across the 3 beam steps (the reference recomputes its
  <= 3-token prefix), so each step computes only the newest token of each beam; the encoder
  memory's cross-attention K/V are computed once per user and shared by all K beams;
- two-stage top-k on raw logits: log-softmax is a per-row shift, so the top-k indices are the
  same and only the K winners are shifted by the row's logsumexp;
- CUDA graphs per (users, tokens) bucket: counts are rounded up to buckets and the spare slots
  hold dummy users whose outputs are dropped, so a handful of graphs serve any request mix.

Every input is treated exactly as the reference treats it: ids outside their codebook and
masked positions are padding, positions keep their column index, and an all-padding history
attends to the learned null memory slot only.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithm.errors import ConfigError
from algorithm.serving.runtime.gpu import kernels as fk
from algorithm.serving.runtime.gpu.batch import Tokens, to_host
from algorithm.serving.runtime.gpu.graphs import GraphCache
from algorithm.serving.runtime.gpu.layouts import TokenLayouts

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARLEN_KERNELS = ("auto", "flash", "fa4", "cudnn", "reference")
SDPA_BACKENDS = (None, "flash", "cudnn", "efficient", "math")
LAYOUTS = ("packed", "padded")
GELUS = ("exact", "tanh_fused")
HEAD_PRECISIONS = ("fp32", "tf32", "bf16_fp32_out")
STEP_ATTENTION = ("elementwise", "einsum")
TOPK = ("two_stage", "flat")


@dataclass
class EngineConfig:
    """How GpuEngine computes; every choice keeps the reference's function."""

    dtype: str = "bf16"
    layout: str = "packed"  # "packed": no work on padding; "padded": pad-to-longest baseline
    # packed attention: flash (torch's FlashAttention-2, CUDA fp16/bf16), fa4 (FlashAttention-4's
    # CuTe kernels, PyPI flash-attn-4, Hopper), cudnn, reference. cudnn: impractically slow with
    # torch 2.11 (issue 14 run 24: 128 histories' parity pass unfinished after ~290 s)
    varlen_kernel: str = "auto"
    dense_when_full: bool = True  # batches without padding: dense SDPA instead of varlen
    sdpa_backend: str | None = None  # dense/padded attention; None = torch's choice
    gelu: str = "exact"  # "tanh_fused": cuBLASLt GELU epilogue (tanh approximation)
    head_precision: str = (
        "tf32"  # output heads: fp32 weights (tf32 or full fp32) or bf16 in / fp32 out
    )
    step_attention: str = "elementwise"  # the decoder's <= 3-key self-attention over its cache
    topk: str = "two_stage"  # beam step: per-beam top-K then top-K of K*K, or one top-K of K*C
    topk_group: int = 16  # > 0 (a power of 2): top-K among the K groups of codes of largest max
    fused_ops: bool = True  # gpu/kernels.py: fused add+LayerNorm, embeddings, cache attention, lse
    # fused_ops' encoder: each residual add done by the GEMM that writes the sub-layer's output
    # (x += o @ W^T in cuBLAS's epilogue, in place); the biases those GEMMs leave out are carried
    # as one fp32 row per LayerNorm, added where the norm reads x: x is never rewritten by a norm
    # (H100, issue 14 run 12: 64 x 1024 13.71 -> 13.28 ms, recall unchanged)
    residual_gemm: bool = True
    # fused_ops' beam search: each level's grouped top-k in three Triton kernels (the groups,
    # the codes in them, the next beams with their histories) instead of ~20 torch launches
    fused_topk: bool = True
    # engine(l1, l2, l3, mask) on device tensors: the inputs read, checked and counted in one
    # Triton kernel (~8 launches before)
    fused_inputs: bool = True
    # engine(l1, l2, l3, mask) on tensors already on the engine's GPU, of at most this many
    # positions (B x T; 0: never): no host round trip. The inputs are packed on the device
    # (kernels.pack_inputs) inside a CUDA graph keyed by (B, T), the padding positions after
    # the users, outside every slot: at a few hundred rows the GEMMs cost what fewer rows cost,
    # while reading the lengths back stalls the GPU for the host's layout and launch (H200,
    # run 26: 1 x 128 1.01 -> 0.93 ms; run 25: 1 x 1024 1.23 -> 1.36 ms, hence 256)
    sync_free_positions: int = 256
    # fused_ops' decoder: layer 0 up to its cross-attention is, at the first beam step, the same
    # for every user (the bos token; one key, so attention returns its value) and, at the
    # second, a function of the first code alone: both computed once per engine (1 row, and a
    # table of codebook_sizes[0] rows gathered by code) instead of ~10 launches per forward
    decoder_tables: bool = True  # (H200, run 26: ~0.03 ms per forward at every shape)
    cuda_graphs: bool = True
    max_graphs: int = 512  # LRU bound on captured graphs (64 dense + ~200 mix keys warmed)
    capture_new_shapes: bool = True  # False: shapes first seen after freeze_graphs() run eagerly
    # frozen, a packed batch with no warmed graph of its users bucket that fits it may take one
    # of a larger users bucket (dummy users of one token) instead of running eagerly
    round_up_users: bool = True
    max_users: int = 64  # one forward's users (infer_requests splits larger groups)
    max_tokens: int = 65536  # one forward's packed tokens
    # CUDA events the host waits on (a queued batch's end, the staging buffer's last copy) block
    # the waiting thread (cudaEventBlockingSync) instead of spinning on a core
    blocking_sync: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> EngineConfig:
        for name, allowed in (
            ("dtype", tuple(DTYPES)),
            ("layout", LAYOUTS),
            ("varlen_kernel", VARLEN_KERNELS),
            ("sdpa_backend", SDPA_BACKENDS),
            ("gelu", GELUS),
            ("head_precision", HEAD_PRECISIONS),
            ("step_attention", STEP_ATTENTION),
            ("topk", TOPK),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, getattr(self, name), f"one of {allowed}")
        for name in ("max_graphs", "max_users", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "an integer >= 1")
        n = self.sync_free_positions
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= fk.PACK_MAX_POSITIONS:
            raise ConfigError(
                "sync_free_positions", n, f"an integer in [0, {fk.PACK_MAX_POSITIONS}] (0: off)"
            )
        g = self.topk_group
        if isinstance(g, bool) or not isinstance(g, int) or g < 0 or g & (g - 1):
            raise ConfigError("topk_group", g, "0 or a power of 2")
        return self


def _fa4_varlen():
    """FlashAttention-4's variable-length forward (``varlen_kernel="fa4"``), or a ConfigError
    saying how to get it."""
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func
    except Exception as e:  # not installed, or its CUTLASS DSL finds no usable CUDA flavor
        raise ConfigError(
            "varlen_kernel",
            "fa4",
            f"FlashAttention-4 does not import here ({type(e).__name__}: {e})",
            hint="pip install flash-attn-4 'nvidia-cutlass-dsl[cu13]' (cu12 for a CUDA 12 "
            "driver); its Hopper forward needs an sm90 GPU. Or use varlen_kernel='flash'.",
        ) from e
    return flash_attn_varlen_func


# -- FLOPs ------------------------------------------------------------------------------------
def count_flops(config, lengths: Sequence[int], kv_cache: bool = False) -> dict:
    """FLOPs (2 per multiply-add) of one forward over users with these history lengths.

    Counts every matrix product (linear layers, attention scores and values, output heads);
    embeddings, norms, softmax and top-k are not counted. ``kv_cache=False`` is the reference
    algorithm (``UGTModel.forward``: dense causal prefixes recomputed at each beam step), the
    number the floor is computed from; ``kv_cache=True`` is what GpuEngine executes (with its
    default ``decoder_tables``: layer 0's QKV, output and query projections of the first two
    beam steps are computed once per engine, not per forward).
    """
    d, f, k = config.d_model, config.d_ff, config.num_recommendations
    c1, c2, c3 = config.codebook_sizes
    lens = [int(n) for n in lengths]
    users, tokens = len(lens), sum(lens)
    sq = sum(n * n for n in lens)
    mem = tokens + users  # one null slot per user
    out = {
        "encoder_linear": 2 * tokens * (4 * d * d + 2 * d * f) * config.n_encoder_layers,
        "encoder_attention": 2 * 2 * d * sq * config.n_encoder_layers,
        "memory_kv": 2 * mem * 2 * d * d * config.n_decoder_layers,
    }
    # (beams, prefix length t) per step; the reference runs all t tokens, the cache only the last
    steps = [(1, 1), (k, 2), (k, 3)]
    lin = attn_self = attn_cross = 0
    for beams, t in steps:
        queries = t if not kv_cache else 1
        keys_self = t * t if not kv_cache else t  # dense t x t scores (what SDPA computes)
        lin += beams * queries * (6 * d * d + 2 * d * f)
        attn_self += beams * 2 * d * keys_self
        attn_cross += beams * queries * 2 * d  # x (memory length) below
    dec = config.n_decoder_layers
    # decoder_tables: layer 0's QKV (3), output and cross query (1 + 1) at steps 1 and 2
    tables = 5 * d * d * (1 + k) if kv_cache else 0
    out["decoder_linear"] = 2 * users * (lin * dec - tables)
    out["decoder_self_attention"] = 2 * users * attn_self * dec
    out["decoder_cross_attention"] = 2 * attn_cross * mem * dec
    out["heads"] = 2 * users * d * (c1 + k * c2 + k * c3)
    out["total"] = sum(out.values())
    return out


class GpuEngine:
    """``engine(l1, l2, l3, mask) -> (recs int64 [B, K, 3], scores fp32 [B, K])`` on any device.

    On CPU (tests) it runs in fp32 with a reference attention loop; on CUDA it is the fast path.
    """

    def __init__(self, model, config: EngineConfig | None = None, device=None):
        cfg = config or EngineConfig()
        self.config = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # "cuda": the current device, named
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES[cfg.dtype]
        if not cuda and self.dtype != torch.float32:
            logger.info(
                "GpuEngine on %s: %s runs slowly there; tests use fp32", self.device, cfg.dtype
            )
        kernel = cfg.varlen_kernel
        if kernel == "auto":
            kernel = "flash" if cuda and self.dtype != torch.float32 else "reference"
        if kernel in ("flash", "fa4", "cudnn") and (not cuda or self.dtype == torch.float32):
            raise ConfigError(
                "varlen_kernel",
                kernel,
                "'reference' on CPU or in fp32 (flash needs CUDA fp16/bf16)",
            )
        self._fa4 = _fa4_varlen() if kernel == "fa4" else None
        self.kernel = kernel
        self.model_config = mc = model.config
        self.k, self.h, self.d = mc.num_recommendations, mc.n_heads, mc.d_model
        self.dh = self.d // self.h
        self.sizes = tuple(mc.codebook_sizes)
        m = copy.deepcopy(model).eval()
        m.to(device=self.device, dtype=self.dtype)
        for p in m.parameters():
            p.requires_grad_(False)
        self.m = m
        self.head_dtype = torch.float32 if cfg.head_precision != "bf16_fp32_out" else self.dtype
        self.heads = [
            (
                h.weight.detach().to(self.device, self.head_dtype),
                h.bias.detach().to(self.device, torch.float32),
            )
            for h in model.heads
        ]
        # residual_gemm: the running sum of the encoder's residual-GEMM biases, one fp32 row per
        # norm (from the model's own weights, not their bf16 copies)
        biases = [b for layer in model.encoder for b in (layer.attn.out.bias, layer.ffn[3].bias)]
        self._pending_bias = (
            torch.stack([b.detach().float() for b in biases]).cumsum(0).to(self.device)
        )
        self.graphs = GraphCache(
            self.device, cfg.cuda_graphs and cuda, cfg.max_graphs, cfg.capture_new_shapes
        )
        self.layouts = TokenLayouts(m, cfg, self.device, self.dtype, self.graphs, kernel)
        self._first_rows: list = []  # decoder_tables: every buffer a graph may read
        self._tables = self._decoder_tables() if cfg.decoder_tables and cfg.fused_ops else None

    # -- building blocks ------------------------------------------------------------------
    def _sdpa(self, q, k, v, mask):
        backend = self.config.sdpa_backend
        if backend is None or self.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {
            "flash": "FLASH_ATTENTION",
            "cudnn": "CUDNN_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH",
        }
        with sdpa_kernel([getattr(SDPBackend, names[backend])]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, len_q, len_k):
        """Per-segment attention over packed [total, H, Dh] q/k/v."""
        if self._fa4 is not None:
            return self._fa4(
                q,
                k,
                v,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
            )[0]
        if self.kernel == "flash":
            return torch.ops.aten._flash_attention_forward(
                q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False
            )[0]
        if self.kernel == "cudnn":
            return torch.ops.aten._cudnn_attention_forward(
                q, k, v, None, cu_q, cu_k, max_q, max_k, False, 0.0, False, False
            )[0]
        out = torch.zeros_like(q)
        sq = sk = 0
        for lq, lk in zip(len_q, len_k, strict=True):
            if lq and lk:
                o = F.scaled_dot_product_attention(
                    q[sq : sq + lq].transpose(0, 1),
                    k[sk : sk + lk].transpose(0, 1),
                    v[sk : sk + lk].transpose(0, 1),
                )
                out[sq : sq + lq] = o.transpose(0, 1)
            sq, sk = sq + lq, sk + lk
        return out

    def _ffn_hidden(self, ffn, h):
        lin1 = ffn[0]
        if self.config.gelu == "tanh_fused":
            return torch._addmm_activation(lin1.bias, h, lin1.weight.t(), use_gelu=True)
        return F.gelu(lin1(h))

    def _ffn(self, ffn, h):
        return ffn[3](self._ffn_hidden(ffn, h))

    def _self_attention(self, qkv, t: Tokens):
        n = qkv.shape[0]
        if t.kind == "packed":
            q, k, v = qkv.view(n, 3, self.h, self.dh).unbind(1)
            o = self._varlen(q, k, v, t.cu, t.cu, t.max_len, t.max_len, t.lengths, t.lengths)
            return o.reshape(n, self.d)
        b = t.users
        q, k, v = qkv.view(b, -1, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        o = self._sdpa(q, k, v, t.enc_mask)
        return o.transpose(1, 2).reshape(n, self.d)

    def _encode(self, t: Tokens):
        m = self.m
        e = m.item_emb
        x = e[0](t.ids[0]) + e[1](t.ids[1]) + e[2](t.ids[2]) + m.pos_emb(t.pos)
        for layer in m.encoder:
            o = self._self_attention(layer.attn.qkv(layer.norm1(x)), t)
            x = x + layer.attn.out(o)
            x = x + self._ffn(layer.ffn, layer.norm2(x))
        return self._memory(m.encoder_norm(x), t)

    def _memory(self, x, t: Tokens):
        """Encoder output [N, D] -> memory rows: each user's null slot, then its tokens."""
        null = self.m.null_memory.view(1, self.d)
        if t.kind == "packed":
            mem = x.new_empty(x.shape[0] + t.users, self.d)
            mem.index_copy_(0, t.null_idx, null.expand(t.users, self.d).contiguous())
            mem.index_copy_(0, t.tok_to_mem, x)
            return mem
        b = t.users
        return torch.cat([null.expand(b, 1, self.d), x.view(b, -1, self.d)], 1).view(-1, self.d)

    def _encode_fused(self, t: Tokens):
        """The encoder with one fused add+LayerNorm per sub-layer; the last norm writes its rows
        straight into the memory matrix (between the null slots). With ``residual_gemm`` the
        residual adds happen in the GEMMs instead (``_residual``)."""
        m, d, layers = self.m, self.d, self.m.encoder
        tables = (*(e.weight for e in m.item_emb), m.pos_emb.weight)
        x, h = fk.embed_layernorm(t.ids, t.pos, tables, layers[0].norm1)
        mem = x.new_empty(x.shape[0] + t.users, d)
        null = m.null_memory.view(1, d).expand(t.users, d)
        if t.kind == "packed":
            mem.index_copy_(0, t.null_idx, null.contiguous())
            where = {"out_rows": t.tok_to_mem}
        else:  # B x T: user b's rows start at b * (T + 1)
            mem.view(t.users, -1, d)[:, 0] = null
            where = {"segment": t.max_len}
        norms = [n for layer in layers for n in (layer.norm1, layer.norm2)][1:] + [m.encoder_norm]
        for i, layer in enumerate(layers):
            o = self._self_attention(layer.attn.qkv(h), t)
            x, h = self._residual(layer.attn.out, o, x, norms[2 * i], 2 * i)
            a = self._ffn_hidden(layer.ffn, h)
            if i + 1 < len(layers):
                x, h = self._residual(layer.ffn[3], a, x, norms[2 * i + 1], 2 * i + 1)
        self._residual(layer.ffn[3], a, x, norms[-1], len(norms) - 1, out=mem, **where)
        return mem

    def _residual(self, linear, inp, x, norm, j: int, out=None, **where):
        """``x + linear(inp)`` and its LayerNorm ``norm``: returns (new x, normed rows).

        Plain: the GEMM writes ``linear(inp)`` and a fused add+LayerNorm reads it with ``x``
        and writes both outputs. ``residual_gemm``: ``x += inp @ W^T`` in the GEMM's epilogue
        (in place, read once), the norm reads ``x`` plus the fp32 sum of the biases left out so
        far (``_pending_bias[j]``) and writes the normed rows only."""
        last = out is not None
        if not self.config.residual_gemm:
            return fk.add_layernorm(linear(inp), x, norm, store_residual=not last, out=out, **where)
        x.addmm_(inp, linear.weight.t())
        pending = self._pending_bias[j].expand(x.shape[0], self.d)
        _, h = fk.add_layernorm(
            x, pending, norm, store_residual=False, out=out, out_dtype=x.dtype, **where
        )
        return x, h

    def _memory_kv(self, mem, t: Tokens):
        kvs = []
        for layer in self.m.decoder:
            kv = layer.cross_attn.kv(mem)
            if t.kind == "packed":
                kvs.append(kv.view(-1, 2, self.h, self.dh).unbind(1))
            else:
                kvs.append(
                    kv.view(t.users, -1, 2, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
                )
        return kvs

    def _cross(self, q, k, v, t: Tokens, beams: int):
        """q: [S * beams, D] (user-major) against the user's memory K/V."""
        if t.kind == "packed":
            lens_mem = None if t.lengths is None else tuple(n + 1 for n in t.lengths)
            lens_q = None if t.lengths is None else (beams,) * len(t.lengths)
            o = self._varlen(
                q.view(-1, self.h, self.dh),
                k,
                v,
                t.cu_beams[beams],
                t.cu_mem,
                beams,
                t.max_len + 1,
                lens_q,
                lens_mem,
            )
            return o.reshape(-1, self.d)
        qd = q.view(t.users, beams, self.h, self.dh).transpose(1, 2)
        o = self._sdpa(qd, k, v, t.mem_mask)
        return o.transpose(1, 2).reshape(-1, self.d)

    def _decode(self, y, cache, kvs, t: Tokens, beams: int):
        """One beam step for the newest token of each beam; cache: per layer (K, V) [R, t, H, Dh]."""
        m, h, dh = self.m, self.h, self.dh
        scale = 1.0 / math.sqrt(dh)
        new_cache = []
        for layer, (mk, mv), past in zip(m.decoder, kvs, cache, strict=True):
            q, k, v = layer.self_attn.qkv(layer.norm1(y)).view(-1, 3, h, dh).unbind(1)
            keys = k[:, None] if past is None else torch.cat([past[0], k[:, None]], 1)
            vals = v[:, None] if past is None else torch.cat([past[1], v[:, None]], 1)
            new_cache.append((keys, vals))
            if self.config.step_attention == "einsum":
                s = torch.einsum("rhd,rthd->rht", q.float(), keys.float()) * scale
                o = torch.einsum("rht,rthd->rhd", s.softmax(-1), vals.float()).to(y.dtype)
            else:  # t <= 3 keys: broadcast products beat thousands of tiny batched GEMMs
                a = ((q.unsqueeze(1) * keys).float().sum(-1) * scale).softmax(1)  # [R, t, H]
                o = (a.unsqueeze(-1) * vals.float()).sum(1).to(y.dtype)
            y = y + layer.self_attn.out(o.reshape(-1, self.d))
            cq = layer.cross_attn.q(layer.norm2(y))
            y = y + layer.cross_attn.out(self._cross(cq, mk, mv, t, beams))
            y = y + self._ffn(layer.ffn, layer.norm3(y))
        return y, new_cache

    def _self_block(self, i: int, y, h, past, parent, beams: int):
        """Decoder layer ``i``'s self-attention sub-layer up to its cross-attention's query:
        (this step's QKV, the new residual stream, the query)."""
        layer = self.m.decoder[i]
        qkv = layer.self_attn.qkv(h)
        o = fk.step_attention(qkv, [p[i] for p in past], parent, beams, self.h)
        y, h = fk.add_layernorm(layer.self_attn.out(o), y, layer.norm2)
        return qkv, y, layer.cross_attn.q(h)

    def _decoder_tables(self):
        """Layer 0's ``_self_block`` at the first two beam steps, which depend on no input and
        on the first code alone: ((QKV, query, residual) [1, .] of step 1, the same
        [codebook_sizes[0], .] of step 2 per first code)."""
        m, d, lvl, norm1 = self.m, self.d, self.m.level_emb.weight, self.m.decoder[0].norm1
        with torch.inference_mode():
            y, h = fk.add_layernorm(m.bos.view(1, d), lvl[:1], norm1)
            qkv1, y1, q1 = self._self_block(0, y, h, [], None, 1)
            emb = m.code_emb[0].weight
            c = emb.shape[0]
            y, h = fk.add_layernorm(emb, lvl[1].expand(c, d), norm1)
            past = [[qkv1.expand(c, -1).contiguous()]]  # step 1, layer 0
            qkv2, y2, q2 = self._self_block(0, y, h, past, None, 1)
        return (qkv1, q1, y1), (qkv2, q2, y2)

    def _first_step_rows(self, s: int):
        """Step 1's QKV and query rows for ``s`` users: views of a buffer filled outside any
        graph capture (graphs keep reading it: a larger one never frees a smaller)."""
        qkv, q, _ = self._tables[0]
        rows = self._first_rows[-1] if self._first_rows else None
        if rows is None or rows[0].shape[0] < s:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # no buffer this large yet (GraphCache.capture's warm-up run makes one before
                # capturing): the graph copies the rows itself
                return qkv.expand(s, -1).contiguous(), q.expand(s, -1).contiguous()
            rows = tuple(p.expand(max(s, 64), -1).contiguous() for p in (qkv, q))
            self._first_rows.append(rows)
        return rows[0][:s], rows[1][:s]

    def _decode_fused(self, y, h, past, kvs, t: Tokens, beams: int, parent, start=None):
        """One beam step with fused add+LayerNorm; ``h`` is norm1 of ``y``. Self-attention reads
        the earlier steps' QKV outputs (``past``) through ``parent`` instead of a K/V cache.
        ``start``: layer 0's ``_self_block`` from ``decoder_tables`` instead, (QKV, query,
        residual stream, and the rows of it to gather or None).
        Returns (decoder_norm output in the heads' input dtype, this step's QKV per layer)."""
        m, layers = self.m, self.m.decoder
        qkvs = []
        for i, (layer, (mk, mv)) in enumerate(zip(layers, kvs, strict=True)):
            rows = None
            if i == 0 and start is not None:
                qkv, q, y, rows = start
            else:
                qkv, y, q = self._self_block(i, y, h, past, parent, beams)
            qkvs.append(qkv)
            c = layer.cross_attn.out(self._cross(q, mk, mv, t, beams))
            if rows is None:
                y, h = fk.add_layernorm(c, y, layer.norm3)
            else:  # the residual gathered from its table as the norm reads it
                y, h = fk.add_layernorm(y, c, layer.norm3, x_rows=rows)
            f = self._ffn(layer.ffn, h)
            if i + 1 < len(layers):
                y, h = fk.add_layernorm(f, y, layers[i + 1].norm1)
        _, h = fk.add_layernorm(
            f, y, m.decoder_norm, store_residual=False, out_dtype=self.head_dtype
        )
        return h, qkvs

    def _head(self, h, level: int):
        """fp32 logits from the decoder_norm output."""
        w, b = self.heads[level]
        p = self.config.head_precision
        if p == "bf16_fp32_out" and h.is_cuda:
            return torch.mm(h, w.t(), out_dtype=torch.float32) + b
        h = h.float()
        if p == "tf32" and h.is_cuda:
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return F.linear(h, w.float(), b)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        return F.linear(h, w.float(), b)

    def _lse_groups(self, logits, k: int):
        """(logsumexp [..., 1], max of each ``topk_group`` codes or None) of fp32 logits."""
        g, c = self.config.topk_group, logits.shape[-1]
        g = g if g and c % g == 0 and c // g >= k and self.config.topk != "flat" else 0
        if self.config.fused_ops:
            return fk.logsumexp_groupmax(logits, g)
        return fk.logsumexp_groupmax_torch(logits, g)

    @staticmethod
    def _topk(logits, k: int, gmax):
        """Top-k of the last dim; with group maxima, among the k groups of largest maxima only
        (the same winners: a group holding one of the k largest values has one of the k
        largest maxima)."""
        if gmax is None:
            return logits.topk(k, dim=-1)
        g = logits.shape[-1] // gmax.shape[-1]
        return fk.topk_among_groups(logits, gmax.topk(k, dim=-1)[1], g)

    def _beam_step(self, logits, scores):
        """logits [S, K, C] fp32, scores [S, K] -> (scores, beam, code), each [S, K]."""
        s, k = scores.shape
        lse, gmax = self._lse_groups(logits, k)
        if self.config.topk == "flat":
            c = logits.shape[-1]
            scores, flat = (scores.unsqueeze(-1) + (logits - lse)).view(s, k * c).topk(k, dim=-1)
            return scores, torch.div(flat, c, rounding_mode="floor"), flat % c
        top, code = self._topk(logits, k, gmax)  # log-softmax is a per-row shift: same winners
        cand = (scores.unsqueeze(-1) + (top - lse)).reshape(s, k * k)
        scores, flat = cand.topk(k, dim=-1)
        beam = torch.div(flat, k, rounding_mode="floor")
        return scores, beam, code.reshape(s, k * k).gather(1, flat)

    def _forward(self, t: Tokens):
        if t.kind == "inputs":
            t = self._packed_on_device(t)
        if self.config.fused_ops:
            return self._forward_fused(t)
        m, k, d = self.m, self.k, self.d
        s = t.users
        kvs = self._memory_kv(self._encode(t), t)
        none = [None] * len(m.decoder)
        y = (m.bos.view(1, d) + m.level_emb.weight[0]).expand(s, d)
        y, cache = self._decode(y, none, kvs, t, 1)
        logits = self._head(m.decoder_norm(y), 0)
        lse, gmax = self._lse_groups(logits, k)
        top, c1 = self._topk(logits, k, gmax)
        scores = top - lse
        cache = [
            tuple(
                c.unsqueeze(1).expand(s, k, *c.shape[1:]).reshape(s * k, *c.shape[1:]) for c in kv
            )
            for kv in cache
        ]
        y = m.code_emb[0](c1).view(s * k, d) + m.level_emb.weight[1]
        y, cache = self._decode(y, cache, kvs, t, k)
        scores, beam, c2 = self._beam_step(self._head(m.decoder_norm(y), 1).view(s, k, -1), scores)
        c1 = c1.gather(1, beam)
        flat = (torch.arange(s, device=beam.device).unsqueeze(1) * k + beam).view(-1)
        cache = [(kk[flat], vv[flat]) for kk, vv in cache]
        y = m.code_emb[1](c2).view(s * k, d) + m.level_emb.weight[2]
        y, _ = self._decode(y, cache, kvs, t, k)
        scores, beam, c3 = self._beam_step(self._head(m.decoder_norm(y), 2).view(s, k, -1), scores)
        codes = [c1.gather(1, beam), c2.gather(1, beam), c3]
        return torch.stack(codes, dim=-1), scores

    def _forward_fused(self, t: Tokens):
        m, k, d = self.m, self.k, self.d
        s, lvl, first = t.users, m.level_emb.weight, m.decoder[0].norm1
        kvs = self._memory_kv(self._encode_fused(t), t)
        if self._tables is not None:
            start = (*self._first_step_rows(s), self._tables[0][2].expand(s, d), None)
            hn, qkv1 = self._decode_fused(None, None, [], kvs, t, 1, None, start)
        else:
            y, h = fk.add_layernorm(m.bos.view(1, d).expand(s, d), lvl[0].expand(s, d), first)
            hn, qkv1 = self._decode_fused(y, h, [], kvs, t, 1, None)
        scores, c1 = self._first_beams(self._head(hn, 0), k)
        if self._tables is not None:
            qkv, q, y = self._tables[1]
            rows = c1.view(-1)
            start = (qkv.index_select(0, rows), q.index_select(0, rows), y, rows)
            hn, qkv2 = self._decode_fused(None, None, [qkv1], kvs, t, k, None, start)
        else:
            emb = m.code_emb[0].weight
            y, h = fk.add_layernorm(emb, lvl[1].expand(s * k, d), first, x_rows=c1.view(-1))
            hn, qkv2 = self._decode_fused(y, h, [qkv1], kvs, t, k, None)
        hist = c1.view(s, k, 1)
        scores, hist, parent, c2 = self._next_beams(self._head(hn, 1).view(s, k, -1), scores, hist)
        emb = m.code_emb[1].weight
        y, h = fk.add_layernorm(emb, lvl[2].expand(s * k, d), first, x_rows=c2.view(-1))
        hn, _ = self._decode_fused(y, h, [qkv1, qkv2], kvs, t, k, parent)
        scores, hist, _, _ = self._next_beams(self._head(hn, 2).view(s, k, -1), scores, hist)
        return hist, scores

    def _packed_on_device(self, t: Tokens) -> Tokens:
        """The packed layout of raw inputs (kind "inputs", ``ids`` [4, B * T]), built on the
        device: B users, the padding positions after them (``kernels.pack_inputs``)."""
        b, w = t.users, t.max_len
        ids, pos, cu, cu_mem, null_idx, t2m = fk.pack_inputs(
            t.ids.view(4, b, w), self.sizes, fused=self.config.fused_ops
        )
        p = Tokens("packed", b, w, ids, pos, cu, cu_mem, t2m, null_idx, t.cu_beams)
        if self.kernel == "reference":  # its host loop needs the lengths (tests on the CPU)
            p.lengths = tuple(cu.diff().tolist())
        return p

    def _fused_group(self, c: int, k: int, beams: int) -> int:
        """The group size of the fused beam kernels for ``c`` codes, or 0 where they don't apply
        (the torch two-stage/flat top-k runs there, with the same winners)."""
        cfg, g = self.config, self.config.topk_group
        if not cfg.fused_topk or cfg.topk == "flat" or not g or c % g or c // g < k:
            return 0
        return g if fk.topk_fits(k, c // g, g, beams) else 0

    def _first_beams(self, logits, k: int):
        """The first level's K beams: (scores [S, K] log-probabilities, codes int64 [S, K])."""
        g = self._fused_group(logits.shape[-1], k, 1)
        lse, gmax = self._lse_groups(logits, k)
        if not g:
            top, code = self._topk(logits, k, gmax)
            return top - lse, code
        return fk.topk_in_groups(logits, fk.topk_groups(gmax, k), g, lse)

    def _next_beams(self, logits, scores, hist):
        """One beam step over logits [S, K, C]: (scores [S, K], codes so far [S, K, P + 1],
        parent row of each new beam [S * K], the new codes [S, K]), best first."""
        s, k, c = logits.shape
        g = self._fused_group(c, k, k)
        if not g:
            scores, beam, code = self._beam_step(logits, scores)
            return (scores, *fk.extend_beams(hist, beam, code), code)
        rows = logits.view(s * k, c)
        lse, gmax = self._lse_groups(rows, k)
        vals, codes = fk.topk_in_groups(rows, fk.topk_groups(gmax, k), g, lse, scores)
        return fk.beam_select(vals.view(s, k * k), codes.view(s, k * k), hist, k)

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _replay(self, t: Tokens):
        layouts, graphs = self.layouts, self.graphs
        if t.kind == "packed" and self.kernel == "reference":
            return self._forward(layouts.materialized(t))  # host loop over lengths: not capturable
        key, tb = layouts.graph_key_and_static(t)
        entry = graphs.lookup(key)
        if entry is None and graphs.closed:
            graphs.eager_runs += 1  # a capture would stall this batch for tens of ms
            return self._forward(layouts.materialized(tb))
        if entry is None:
            static = self._static_inputs(layouts.materialized(tb))
            label = f"{tb.users} users x {static.ids.shape[1]} tokens"
            entry = graphs.capture(key, static, self._forward, label)
        graph, static, outs = entry
        if tb.kind == "inputs":  # the caller's four tensors, stacked into the graph's input
            torch.stack(tb.inputs, out=static.ids.view(4, tb.users, tb.max_len))
        elif tb.staged is not None and static.buf is not None:
            layouts.staging.copy_to(tb.staged, static.buf)  # one host-to-device copy, all inputs
        else:
            tb = layouts.materialized(tb)
            for i, (dst, src) in enumerate(zip(static.tensors(), tb.tensors(), strict=True)):
                if i == 1 and tb.kind == "dense":
                    continue  # a dense layout's positions are fixed by its key (B, T)
                dst.copy_(src, non_blocking=True)
        graph.replay()
        return outs

    def _static_inputs(self, t: Tokens) -> Tokens:
        """A private copy of ``t``'s device tensors: the graph's inputs, refilled per replay."""
        if t.kind == "inputs":
            return Tokens("inputs", t.users, t.max_len, t.ids.clone(), None, key=t.key,
                          cu_beams=t.cu_beams)  # fmt: skip
        if t.buf is not None:  # a host-built layout: static inputs are views of one buffer
            static = self.layouts.with_buffer(t, t.buf.clone())
            static.lengths = static.staged = None
            return static
        static = Tokens(**{**t.__dict__, "lengths": None})
        static.ids, static.pos = t.ids.clone(), t.pos.clone()
        for name in ("cu", "cu_mem", "tok_to_mem", "null_idx", "enc_mask", "mem_mask"):
            if getattr(t, name) is not None:
                setattr(static, name, getattr(t, name).clone())
        if t.cu_beams:
            static.cu_beams = {k: v.clone() for k, v in t.cu_beams.items()}
        return static

    # -- public ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, t: Tokens, users: int | None = None, host: bool | str = False):
        """(recs [users, K, 3], scores [users, K]) for a prepared layout; outputs stay on the
        device, or with ``host`` are copied to host memory (one copy per output, no clones).

        ``host="async"``: the copies to (pinned) host memory are queued on the engine's stream
        behind the forward and the call returns at once; the tensors are valid once the stream
        gets there (record an event after this call and wait on it). The next forward is queued
        behind these copies, so its replay cannot overwrite the graph's outputs before they
        are out."""
        users = t.users if users is None else users
        if self.graphs.enabled:
            # capture and replay follow the *current* device: make it this engine's (cuda:1 ...)
            with torch.cuda.device(self.device):
                recs, scores = self._replay(t)
                if host:
                    return to_host(recs[:users], host), to_host(scores[:users], host)
                return recs[:users].clone(), scores[:users].clone()
        recs, scores = self._forward(self.layouts.materialized(t))
        if host:
            return to_host(recs[:users], host), to_host(scores[:users], host)
        return recs[:users], scores[:users]

    def __call__(self, l1, l2, l3, mask):
        t, b = self.tokens_from_arrays(l1, l2, l3, mask)
        return self.run(t, b)

    # the layouts' public routes, on the engine for its callers (runners, model.py, benchmarks)
    def tokens_from_arrays(self, l1, l2, l3, mask) -> tuple[Tokens, int]:
        return self.layouts.tokens_from_arrays(l1, l2, l3, mask)

    def tokens_from_requests(self, requests) -> tuple[Tokens, list[int]]:
        return self.layouts.tokens_from_requests(requests)

    def tokens_from_batch(self, batch) -> Tokens:
        return self.layouts.tokens_from_batch(batch)

    def freeze_graphs(self) -> None:
        """After warm-up: shapes not captured yet run eagerly if ``capture_new_shapes`` is False."""
        self.graphs.freeze()

    @property
    def graph_count(self) -> int:
        """CUDA graphs held now (0 without graphs)."""
        return len(self.graphs)

    @property
    def eager_runs(self) -> int:
        return self.graphs.eager_runs

    @property
    def rounded_up(self) -> int:
        return self.graphs.rounded_up

    def warmup(self, shapes: Sequence[tuple[int, int]]) -> int:
        """Run (and capture) full-length batches of these (batch, seq_len); returns graphs held."""
        for b, n in shapes:
            ids = torch.zeros(b, n, dtype=torch.int64, device=self.device)
            self(ids, ids, ids, torch.ones_like(ids))
        return len(self.graphs)
