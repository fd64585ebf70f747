"""The Triton python-backend model (``model.py``) shipped into python repositories."""
