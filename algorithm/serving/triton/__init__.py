"""Triton itself: ``schema.py`` (ModelConfig protobuf, the platform table), ``repository.py``
(atomic publish, rollback, cleanup, validation), ``server.py`` (the real tritonserver as a child),
``supervisor.py`` (restarts), ``python_model/`` (the model.py shipped into python-backend
versions)."""
