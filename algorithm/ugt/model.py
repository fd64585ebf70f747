"""UGTModel: encoder + 3-step beam search over semantic ids, one graph per request.

Design points that serving depends on (ARCHITECTURE.md, "The model being served"):
- one token per item: the sum of its three level embeddings plus a position embedding;
- the encoder output and each decoder layer's cross-attention K/V are computed once per user
  and shared by all K beams: beams are folded into the query axis of cross-attention instead
  of repeating the memory K times;
- the decoder recomputes its <= 3-token prefix at each step (no cache, no control flow);
- log-softmax and beam scores in fp32, whatever the weights' dtype;
- ids outside their codebook are treated as padding inside the graph, so every runtime has a
  defined behaviour for them; a learned "null" memory slot keeps all-masked histories finite
  and makes the result independent of how much padding follows the history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithm.errors import CheckpointError, ConfigError
from algorithm.ugt.checkpoint import read_checkpoint, save_checkpoint
from algorithm.ugt.config import UGTConfig

# Additive mask value: exp() of it is exactly 0 in fp32, and it is finite in fp16/bf16.
MASKED = -30000.0


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, D/H]."""
    b, t, d = x.shape
    return x.reshape(b, t, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dh] -> [B, T, H*Dh]."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key-padding mask [B, L] (True = attend) -> additive [B, 1, 1, L]."""
    return ((~valid).to(dtype) * MASKED)[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        q, k, v = (_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal
        )
        return self.out(_merge(o))


class CrossAttention(nn.Module):
    """Queries from the decoder, K/V from the user's memory, computed once by ``memory_kv``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)

    def forward(self, x, k, v, attn_mask):
        q = _heads(self.q(x), self.n_heads)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.out(_merge(o))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )


class EncoderLayer(nn.Module):
    def __init__(self, cfg: UGTConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask):
        x = x + self.drop(self.attn(self.norm1(x), attn_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: UGTConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, cfg.n_heads, cfg.dropout)
        self.cross_attn = CrossAttention(d, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, k, v, mem_mask):
        """y: [B, beams, T, D]; self-attention per beam, cross-attention per user."""
        b, beams, t, d = y.shape
        s = y.reshape(b * beams, t, d)
        s = s + self.drop(self.self_attn(self.norm1(s), is_causal=True))
        u = s.reshape(b, beams * t, d)
        u = u + self.drop(self.cross_attn(self.norm2(u), k, v, mem_mask))
        u = u + self.drop(self.ffn(self.norm3(u)))
        return u.reshape(b, beams, t, d)


class UGTModel(nn.Module):
    """forward(l1, l2, l3, mask) -> (recommendations int64 [B, K, 3], scores fp32 [B, K])."""

    def __init__(self, config: UGTConfig | None = None):
        super().__init__()
        cfg = (config or UGTConfig.tiny()).validate()
        if cfg.num_recommendations > min(cfg.codebook_sizes):
            raise ConfigError(
                "num_recommendations",
                cfg.num_recommendations,
                f"at most the smallest codebook ({min(cfg.codebook_sizes)}): it is the beam width",
            )
        self.config = cfg
        d, (c1, c2, c3) = cfg.d_model, cfg.codebook_sizes
        self.item_emb = nn.ModuleList([nn.Embedding(c, d) for c in (c1, c2, c3)])
        self.pos_emb = nn.Embedding(cfg.max_seq_length, d)
        self.null_memory = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers)])
        self.encoder_norm = nn.LayerNorm(d)
        self.bos = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.code_emb = nn.ModuleList([nn.Embedding(c, d) for c in (c1, c2)])
        self.level_emb = nn.Embedding(3, d)
        self.decoder = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers)])
        self.decoder_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleList([nn.Linear(d, c) for c in (c1, c2, c3)])
        self.apply(self._init)
        nn.init.normal_(self.null_memory, std=0.02)
        nn.init.normal_(self.bos, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # -- encoder -------------------------------------------------------------------------
    def encode(self, l1, l2, l3, attention_mask):
        """Returns the memory [B, 1 + L, D] (null slot first) and its additive mask."""
        sizes = self.config.codebook_sizes
        valid = attention_mask > 0
        for ids, size in zip((l1, l2, l3), sizes, strict=True):
            valid = valid & (ids >= 0) & (ids < size)
        zero = torch.zeros_like(l1)
        x = sum(
            emb(torch.where(valid, ids, zero))
            for emb, ids in zip(self.item_emb, (l1, l2, l3), strict=True)
        )
        x = x + self.pos_emb.weight[: l1.shape[1]]
        dtype = x.dtype
        enc_mask = additive_mask(valid, dtype)
        for layer in self.encoder:
            x = layer(x, enc_mask)
        x = self.encoder_norm(x)
        b = x.shape[0]
        memory = torch.cat([self.null_memory.to(dtype).expand(b, 1, -1), x], dim=1)
        mem_valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        return memory, additive_mask(mem_valid, dtype)

    def memory_kv(self, memory):
        return [layer.cross_attn.memory_kv(memory) for layer in self.decoder]

    # -- decoder -------------------------------------------------------------------------
    def prefix(self, codes: list[torch.Tensor], batch: int) -> torch.Tensor:
        """Decoder input for a prefix of already chosen codes ([B, beams] each) -> [B, beams, T, D]."""
        beams = codes[0].shape[1] if codes else 1
        bos = (self.bos + self.level_emb.weight[0]).expand(batch, beams, 1, -1)
        toks = [bos] + [
            (self.code_emb[i](c) + self.level_emb.weight[i + 1]).unsqueeze(2)
            for i, c in enumerate(codes)
        ]
        return torch.cat(toks, dim=2)

    def decode_logits(self, y, kvs, mem_mask, level: int, last_only: bool = True):
        for layer, (k, v) in zip(self.decoder, kvs, strict=True):
            y = layer(y, k, v, mem_mask)
        h = self.decoder_norm(y[:, :, -1] if last_only else y)
        return self.heads[level](h).float()

    # -- public ---------------------------------------------------------------------------
    def check_inputs(self, l1, l2, l3, attention_mask) -> None:
        shapes = {t.shape for t in (l1, l2, l3, attention_mask)}
        if len(shapes) != 1 or l1.dim() != 2:
            raise ValueError(
                f"the four inputs must share one [batch, seq_len] shape, got {[tuple(s) for s in shapes]}"
            )
        b, t = l1.shape
        if b < 1 or not 1 <= t <= self.config.max_seq_length:
            raise ValueError(
                f"need batch >= 1 and 1 <= seq_len <= {self.config.max_seq_length}, got {b}x{t}"
            )

    def forward(self, encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask):
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            self.check_inputs(encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask)
        k = self.config.num_recommendations
        b = encoder_l1_ids.shape[0]
        memory, mem_mask = self.encode(
            encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask
        )
        kvs = self.memory_kv(memory)

        logp = self.decode_logits(self.prefix([], b), kvs, mem_mask, 0).log_softmax(
            -1
        )  # [B, 1, C1]
        scores, c1 = logp[:, 0].topk(k, dim=-1)
        codes = [c1]
        for level in (1, 2):
            logp = self.decode_logits(self.prefix(codes, b), kvs, mem_mask, level).log_softmax(-1)
            cand = scores.unsqueeze(-1) + logp  # [B, K, C]
            # Two-stage top-k: the global top K are among each beam's own top K.
            per_beam, per_code = cand.topk(k, dim=-1)  # [B, K, K]
            scores, flat = per_beam.reshape(b, k * k).topk(k, dim=-1)
            beam = torch.div(flat, k, rounding_mode="floor")
            new_code = per_code.reshape(b, k * k).gather(1, flat)
            codes = [c.gather(1, beam) for c in codes] + [new_code]
        return torch.stack(codes, dim=-1), scores

    def loss(self, encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask, target):
        """Teacher-forced cross-entropy of the next item's 3 codes; target: [B, 3]."""
        b = target.shape[0]
        memory, mem_mask = self.encode(
            encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask
        )
        kvs = self.memory_kv(memory)
        y = self.prefix([target[:, :1], target[:, 1:2]], b)  # [B, 1, 3, D]
        for layer, (k, v) in zip(self.decoder, kvs, strict=True):
            y = layer(y, k, v, mem_mask)
        h = self.decoder_norm(y[:, 0])  # [B, 3, D]
        return sum(F.cross_entropy(self.heads[i](h[:, i]).float(), target[:, i]) for i in range(3))

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, path) -> str:
        return save_checkpoint(self, path)

    @classmethod
    def load(cls, path, map_location: str = "cpu") -> UGTModel:
        return load_checkpoint(path, map_location=map_location)


def load_checkpoint(path, map_location: str = "cpu") -> UGTModel:
    """A UGTModel from a checkpoint (safetensors, or a weights-only torch file), in eval mode."""
    config, state = read_checkpoint(path)
    model = UGTModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match UGTModel({config}); missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    return model.to(map_location).eval()
