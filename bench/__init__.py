"""The delivery benchmark and its SMTP sink, kept in the repository, not in the wheel.

Run from the repository root: ``python -m bench`` (``--quick`` for a CI-sized run) and
``python -m bench.sink --port 2525`` for the sink on its own.
"""
