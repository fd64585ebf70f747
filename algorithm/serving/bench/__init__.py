"""Measuring a served model: ``loadgen.py`` (requests and the asyncio load generator),
``monitor.py`` (Triton statistics, metrics, host CPU), ``result.py`` (BenchmarkResult and its
grouping), ``report.py`` (markdown/JSON/CSV), ``plots.py`` (PNG figures)."""
