"""Every scenario of ``python -m bench``, by the name ``--only`` takes: :data:`SCENARIOS`.

A scenario is a module with one or both of

- ``timed(bench) -> list[Timed]``: measurements taken once a round (``--repeat`` rounds),
  each right after a round of the baseline, reported as the median over the rounds;
- ``once(bench) -> Outcome``: a measurement made once a run (its times are set by limits,
  or it is too long to repeat), after a round of the baseline;

and optionally ``warm_up(bench)`` (an untimed small pass before the first round),
``queries(bench) -> Outcome`` (untimed: database queries per post or batch) and
``profiled(bench) -> callable`` (what ``--profile`` runs under cProfile).

Adding a scenario: write its module and add one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Scenario:
    module: str
    summary: str
    by_default: bool = True  # part of a run without --only (with --quick too)


SCENARIOS: dict[str, Scenario] = {
    "personalized": Scenario(
        "bench.scenarios.personalized",
        "one post to N members, full personalization + VERP + member footer + one-click link, "
        "once per --connections value",
    ),
    "bulk": Scenario(
        "bench.scenarios.bulk",
        "one post to N members without personalization, MAX_RECIPIENTS 10 and 500",
    ),
    "posts": Scenario(
        "bench.scenarios.posts", "--posts posts to a 3-member list through deliver_pending"
    ),
    "parallel": Scenario(
        "bench.scenarios.parallel",
        "the personalized post to --parallel-members members by one runner process, then by two",
    ),
    "memory": Scenario(
        "bench.scenarios.memory",
        "peak RSS of fresh processes queuing and delivering a personalized post",
    ),
    "dashboard": Scenario(
        "bench.scenarios.dashboard", "the dashboard's 30-day chart over millions of recipient rows"
    ),
    "shaped": Scenario(
        "bench.scenarios.shaped", "traffic shaping against sinks that note when mail arrives"
    ),
    "xverp": Scenario(
        "bench.scenarios.xverp",
        "a VERP'd post through a private Postfix: XVERP chunks against one copy each",
    ),
    "million": Scenario(
        "bench.scenarios.million",
        "a post to a million members (bench/million.py): times and peak memory",
        by_default=False,
    ),
}

#: Names --only also takes, for the scenarios they were once called.
ALIASES = {"many": "posts"}


def load(name: str) -> ModuleType:
    return importlib.import_module(SCENARIOS[name].module)
