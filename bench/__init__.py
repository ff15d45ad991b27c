"""The delivery benchmark and its SMTP sink, kept in the repository, not in the wheel.

Run from the repository root: ``python -m bench`` (``--quick`` for a CI-sized run,
``--only NAME,...`` for some scenarios) and ``python -m bench.sink --port 2525`` for the sink
on its own. The parts:

- :mod:`bench.cli`: the command line; :mod:`bench.rounds`: what runs when;
- :mod:`bench.scenarios`: the registry of scenarios, one module each;
- :mod:`bench.report`: rows, ratios to the baseline, the table and the JSON;
- :mod:`bench.sinks` (the sink processes), :mod:`bench.sink` (the asyncio sink),
  :mod:`bench.cpu` and :mod:`bench.timing` (CPU and wall time), :mod:`bench.database`,
  :mod:`bench.lists` (lists and posts), :mod:`bench.deliver` (one post in this process),
  :mod:`bench.workers` (runner processes started together), :mod:`bench.checks`.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
