"""Parallel: the personalized post (full personalization, VERP, a member footer and the
one-click link) to ``--parallel-members`` members (20,000; 2,000 with ``--quick``), delivered by
ONE runner process, then, queued afresh, by TWO runner processes started together on the same
database (:mod:`bench.workers`), each with ``SMTP_CONNECTIONS`` ``--parallel-connections`` (1, the default; with
one round trip a copy a second connection per process costs more in thread switches than it
saves in waiting) and ``CLAIM_BATCH`` 1.

Two processes can share one post only where it is split into shards (``SHARD_SIZE``): when
listdelivery has that setting, the post is queued with ``--shard-size`` (default: an eighth of
the members) and the workers get the same; without it, one worker takes the whole post.

Reported: recipients/s of each and its ratio to the baseline, and the ratio two/one (the
median over the rounds of each round's). Targets: two/one at least 1.7, two processes at
least 3.5 times the baseline. Checked after each run: the workers' summaries add up to one
transaction per member, the sink took that many messages (and recipients, where it counts
them), and every recipient row is sent.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.checks import check_database, check_summary
from bench.context import Bench
from bench.database import flush_tables
from bench.lists import PERSONALIZED_LIST, PERSONALIZED_SETTINGS, create_list, enqueue
from bench.report import Row, met
from bench.rounds import Timed
from bench.timing import Sample
from bench.workers import added_up, deliver_together

FULL_MEMBERS = 20_000
QUICK_MEMBERS = 2_000
SHARDS = 8  # the default --shard-size is the members over this
TARGET_TWO_OVER_ONE = 1.7
TARGET_TWO = 3.5
SHOWN = ("SMTP_CONNECTIONS", "CLAIM_BATCH", "SHARD_SIZE")  # the settings the report names


def timed(bench: Bench) -> list[Timed]:
    n = bench.size(bench.options.parallel_members, QUICK_MEMBERS, FULL_MEMBERS)
    settings = worker_settings(bench, n)
    shown = {key: settings[key] for key in SHOWN if key in settings}
    one = Timed("parallel, 1 process", n, lambda: deliver(bench, n, 1, settings), {**shown})
    two = Timed("parallel, 2 processes", n, lambda: deliver(bench, n, 2, settings), {**shown})
    one.judge = note
    two.judge = lambda row: judge_two(row, one.samples, two.samples)
    return [one, two]


def worker_settings(bench: Bench, n: int) -> dict[str, Any]:
    from listdelivery import conf

    settings = {
        "SMTP_HOST": bench.sink.host,
        "SMTP_PORT": bench.sink.port,
        "SMTP_CONNECTIONS": bench.options.parallel_connections,
        "CLAIM_BATCH": 1,
        "ENQUEUE_TASKS": False,
        **PERSONALIZED_SETTINGS,
    }
    if "SHARD_SIZE" in conf.DEFAULTS:
        settings["SHARD_SIZE"] = bench.options.shard_size or max(1, -(-n // SHARDS))
    return settings


def note(row: Row) -> None:
    row.note = (
        "one post, full personalization + VERP + footer + one-click, one runner process "
        f"({', '.join(f'{k} {v}' for k, v in row.config.items())})"
    )


def judge_two(row: Row, one: list[Sample], two: list[Sample]) -> None:
    pairs = [b.rate / a.rate for a, b in zip(one, two, strict=False) if a.rate]
    two_over_one = statistics.median(pairs) if pairs else None
    row.config["two_over_one"] = round(two_over_one, 3) if two_over_one is not None else None
    row.target = f">={TARGET_TWO}x; two/one >={TARGET_TWO_OVER_ONE}"
    row.met = (
        f"{met(row.ratio, TARGET_TWO)}; "
        f"{met(two_over_one, TARGET_TWO_OVER_ONE)} (two/one {two_over_one or 0:.2f})"
    )
    shares = [s.details["recipients_by_worker"] for s in two]
    row.note = f"the same post by two runner processes at once; recipients by worker: {shares}"


def deliver(bench: Bench, n: int, processes: int, settings: dict[str, Any]) -> Sample:
    from django.test.utils import override_settings

    from listdelivery.models import Personalization

    flush_tables()
    mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
    with override_settings(LISTDELIVERY=settings):  # SHARD_SIZE splits the post as it is queued
        began = time.perf_counter()
        enqueue(mlist, 1)
        queued = time.perf_counter() - began
    run = deliver_together(bench, processes, settings)
    what = f"parallel, {n} members, {processes} process(es)"
    check_summary(added_up(run.reports), n, n, 1, what)
    bench.check_sink(run.sink_before, n, n, what)
    check_database(1, n, what)
    sample = run.sample
    sample.enqueue_seconds = queued
    sample.details = {
        "processes": processes,
        "wall_seconds": round(run.wall_seconds, 3),
        "recipients_by_worker": [report["summary"]["recipients"] for report in run.reports],
        "worker_seconds": [round(report["seconds"], 3) for report in run.reports],
    }
    return sample
