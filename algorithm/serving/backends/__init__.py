"""Optimizer backends and their registry (filled in by the optimizer issue)."""
