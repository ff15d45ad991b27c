"""Posts: ``--posts`` posts (1,000; 50 with ``--quick``) to the seed's 3-member list, queued,
then delivered by ``manage.py deliver_pending`` in this process, on one connection and on the
most of ``--connections``, and by two runner processes started together (:mod:`bench.workers`),
as a cluster's two default workers would. One 3-RCPT transaction per post.

Target: 1,500 posts a second; the ratio to the baseline is of posts (transactions) a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.checks import CorrectnessError, check_database
from bench.context import Bench
from bench.database import flush_tables
from bench.lists import create_small_list, enqueue
from bench.queries import breakdown
from bench.report import Outcome, Row, met
from bench.rounds import Timed
from bench.timing import Sample
from bench.workers import added_up, deliver_together

TARGET_POSTS_PER_SECOND = 1_500
QUERY_POSTS = 200
WARM_UP_POSTS = 20


def timed(bench: Bench) -> list[Timed]:
    posts = bench.options.posts
    return [
        *(
            Timed(
                f"posts, {c} conn",
                posts,
                lambda c=c: once_with(bench, posts, c),
                {"connections": c},
                judge=judge,
            )
            for c in sorted({1, max(bench.options.connections)})
        ),
        Timed(
            "posts, 2 processes",
            posts,
            lambda: by_processes(bench, posts, 2),
            {"processes": 2},
            judge=judge,
        ),
    ]


def judge(row: Row) -> None:
    row.note = "deliver_pending; one 3-RCPT transaction per post; N = posts"
    row.target = f">={TARGET_POSTS_PER_SECOND:,} posts/s"
    row.met = (
        f"{met(row.posts_per_second, TARGET_POSTS_PER_SECOND)} ({row.posts_per_second:,.0f}/s)"
    )


def fresh_list() -> Any:
    flush_tables()
    return create_small_list()


def queue(mlist: Any, posts: int) -> float:
    """``posts`` posts to ``mlist``; the seconds queuing took."""
    began = time.perf_counter()
    for number in range(posts):
        enqueue(mlist, number)
    return time.perf_counter() - began


def once_with(bench: Bench, posts: int, connections: int) -> Sample:
    from django.core.management import call_command
    from django.test.utils import override_settings

    mlist = fresh_list()
    with override_settings(LISTDELIVERY=bench.config(SMTP_CONNECTIONS=connections)):
        queued = queue(mlist, posts)
        before = bench.counts()
        with bench.stopwatch() as watch:
            call_command("deliver_pending", verbosity=0)
    what = f"posts, {posts} posts, {connections} connections"
    bench.check_sink(before, posts, 3 * posts, what)
    check_database(posts, 3 * posts, what)
    return watch.sample(posts, 3 * posts, posts=posts, enqueue_seconds=queued)


def by_processes(bench: Bench, posts: int, processes: int) -> Sample:
    """The posts delivered by ``processes`` runner processes at once; their start-up untimed."""
    from django.test.utils import override_settings

    settings = bench.config()
    mlist = fresh_list()
    with override_settings(LISTDELIVERY=settings):
        queued = queue(mlist, posts)
    run = deliver_together(bench, processes, settings)
    what = f"posts, {posts} posts, {processes} processes"
    total = added_up(run.reports)
    if (total.posts, total.delivered, total.recipients) != (posts, posts, 3 * posts):
        raise CorrectnessError(f"{what}: the workers' summaries add up to {total}")
    bench.check_sink(run.sink_before, posts, 3 * posts, what)
    check_database(posts, 3 * posts, what)
    sample = run.sample
    sample.posts, sample.enqueue_seconds = posts, queued
    sample.details = {"posts_by_worker": [report["summary"]["posts"] for report in run.reports]}
    return sample


def warm_up(bench: Bench) -> None:
    once_with(bench, min(bench.options.posts, WARM_UP_POSTS), 1)


def profiled(bench: Bench) -> Callable[[], Sample]:
    return lambda: once_with(bench, bench.options.posts, 1)


def queries(bench: Bench) -> Outcome:
    """Queries per post in deliver_pending (and to queue it)."""
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext, override_settings

    posts = min(bench.options.posts, QUERY_POSTS)
    mlist = fresh_list()
    with override_settings(LISTDELIVERY=bench.config()):
        with CaptureQueriesContext(connection) as queued:
            queue(mlist, posts)
        with CaptureQueriesContext(connection) as delivered:
            call_command("deliver_pending", verbosity=0)
    check_database(posts, 3 * posts, "query count, posts")
    details = {
        "posts": posts,
        "enqueue_queries_per_post": round(len(queued) / posts, 2),
        "deliver_queries": len(delivered),
        "deliver_queries_per_post": round(len(delivered) / posts, 2),
        "deliver_breakdown": breakdown(delivered.captured_queries),
    }
    lines = [
        f"queries, posts ({posts} posts): {details['deliver_queries_per_post']} per post "
        f"delivered, {details['enqueue_queries_per_post']} per post queued",
        "  " + ", ".join(f"{k} {v}" for k, v in details["deliver_breakdown"]),
    ]
    return Outcome(details=details, lines=lines)
