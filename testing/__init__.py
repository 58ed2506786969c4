"""Helpers for the tests and the benchmarks: real local clusters (nats-server, gateways,
history workers) and the API keys they are started with.

Not part of the installed ``realtime`` distribution (pyproject's package list leaves it
out): it is imported from a checkout, with the repository root on ``sys.path`` (pytest's
``pythonpath``, or ``python -m bench...`` run from the root).
"""
