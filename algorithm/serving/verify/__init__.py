"""Checks against the fp32 reference before anything is served: ``parity.py`` compares two
runners' outputs with ranking-aware metrics; ``accuracy.py`` is the gate an optimized artifact
passes (recall@K overlap, top-1 agreement, rank correlation, score error)."""
