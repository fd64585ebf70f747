"""GpuEngine: the fast path for a UGTModel on CUDA. ``engine.py`` the forward (kernels from
``kernels.py``), ``batch.py`` the host half (buckets, request grouping, token layouts),
``graphs.py`` the CUDA-graph cache composed into the engine."""
