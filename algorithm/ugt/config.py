"""UGTConfig: the shape of the reference model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from algorithm.errors import ConfigError


@dataclass
class UGTConfig:
    codebook_sizes: tuple[int, int, int] = (1024, 4096, 16384)
    d_model: int = 64
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 1
    d_ff: int = 256
    max_seq_length: int = 1024
    num_recommendations: int = 50
    dropout: float = 0.0

    @classmethod
    def tiny(cls, **overrides) -> UGTConfig:
        """CPU demo size: trains in about a minute on 2 cores."""
        base = dict(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=1, d_ff=256)
        return cls(**{**base, **overrides}).validate()

    @classmethod
    def base(cls, **overrides) -> UGTConfig:
        """GPU benchmark size: about 5 TFLOP for batch 64 x seq_len 1024."""
        base = dict(d_model=512, n_heads=8, n_encoder_layers=8, n_decoder_layers=4, d_ff=2048)
        return cls(**{**base, **overrides}).validate()

    def validate(self) -> UGTConfig:
        cb = tuple(self.codebook_sizes)
        if len(cb) != 3 or any(not isinstance(c, int) or c < 2 for c in cb):
            raise ConfigError("codebook_sizes", self.codebook_sizes, "three integers >= 2")
        self.codebook_sizes = cb
        for name in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "an integer >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError("n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        if not isinstance(self.max_seq_length, int) or not 1 <= self.max_seq_length <= 65536:
            raise ConfigError("max_seq_length", self.max_seq_length, "an integer in [1, 65536]")
        k = self.num_recommendations
        if not isinstance(k, int) or not 1 <= k <= cb[0]:
            raise ConfigError(
                "num_recommendations",
                k,
                f"an integer in [1, codebook_sizes[0]={cb[0]}] (beam width)",
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "a float in [0, 1)")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["codebook_sizes"] = list(self.codebook_sizes)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> UGTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError("UGTConfig", sorted(unknown), f"known fields are {sorted(names)}")
        data = dict(data)
        if "codebook_sizes" in data:
            data["codebook_sizes"] = tuple(data["codebook_sizes"])
        return cls(**data).validate()


INPUT_NAMES = ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "attention_mask")
OUTPUT_NAMES = ("recommendations", "scores")
