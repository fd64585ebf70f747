"""What `ugt-serving tune` is made of, below its public face (``algorithm/serving/tune.py``):
``settings`` (the searched knobs, read from and written into Triton's ModelConfig), ``search``
(which candidates, in what order, and which one wins), ``store`` (every measured candidate on
disk, for resuming), ``result`` and ``report`` (markdown, JSON, plots)."""
