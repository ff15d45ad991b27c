"""Personalized: one post to ``--members`` members (10,000; 500 with ``--quick``) with ``full``
personalization, VERP, a footer with member data and an RFC 8058 one-click link per copy,
queued with ``to_outgoing`` and sent by ``OutgoingRunner().run()`` in this process, once per
``--connections`` value (``SMTP_CONNECTIONS``). One SMTP transaction per member.

Target: at least 1.5 times the baseline's msgs/s on more than one connection (aim 2.0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bench.checks import check_summary
from bench.context import Bench
from bench.database import flush_tables
from bench.deliver import deliver_one_post
from bench.lists import PERSONALIZED_LIST, PERSONALIZED_SETTINGS, create_list, enqueue
from bench.queries import breakdown
from bench.report import Outcome, Row, met
from bench.rounds import Timed
from bench.timing import Sample

TARGET = 1.5
AIM = 2.0
QUERY_MEMBERS = 2_000
NOTE = (
    "full personalization + VERP + a member footer and one-click unsubscribe: "
    "one transaction per member"
)


def timed(bench: Bench) -> list[Timed]:
    n = bench.options.members
    return [
        Timed(
            f"personalized, {c} conn",
            n,
            lambda c=c: once_with(bench, n, c),
            {"connections": c},
            judge=judge,
        )
        for c in bench.options.connections
    ]


def judge(row: Row) -> None:
    row.note = NOTE
    if row.config["connections"] > 1:
        row.target = f">={TARGET}x (aim {AIM}x)"
        row.met = met(row.ratio, TARGET, AIM)


def once_with(bench: Bench, n: int, connections: int) -> Sample:
    from listdelivery.models import Personalization

    flush_tables()
    mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
    config = bench.config(SMTP_CONNECTIONS=connections, **PERSONALIZED_SETTINGS)
    what = f"personalized, {n} members, {connections} connections"
    return deliver_one_post(bench, mlist, config, n, n, what)


def warm_up(bench: Bench) -> None:
    once_with(bench, min(bench.options.members, 50), max(bench.options.connections))


def profiled(bench: Bench) -> Callable[[], Sample]:
    return lambda: once_with(bench, bench.options.members, 1)


def queries(bench: Bench) -> Outcome:
    """Queries per checkpoint batch of a personalized post (and to queue it)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext, override_settings

    from listdelivery import conf
    from listdelivery.models import Personalization
    from listdelivery.runner import OutgoingRunner

    n = min(bench.options.members, QUERY_MEMBERS)
    flush_tables()
    mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
    with override_settings(LISTDELIVERY=bench.config(**PERSONALIZED_SETTINGS)):
        batch = conf.get("CHECKPOINT_EVERY")
        with CaptureQueriesContext(connection) as queued:
            enqueue(mlist, 1)
        with CaptureQueriesContext(connection) as delivered:
            summary = OutgoingRunner().run()
    check_summary(summary, n, n, 1, "query count, personalized")
    batches = math.ceil(n / batch)
    details = {
        "members": n,
        "checkpoint_every": batch,
        "batches": batches,
        "enqueue_queries": len(queued),
        "deliver_queries": len(delivered),
        "deliver_queries_per_batch": round(len(delivered) / batches, 2),
        "deliver_breakdown": breakdown(delivered.captured_queries),
    }
    lines = [
        f"queries, personalized ({n} members, batches of {batch}): "
        f"{details['deliver_queries_per_batch']} per batch ({len(delivered)} in {batches} "
        f"batches); {len(queued)} to queue",
        "  " + ", ".join(f"{k} {v}" for k, v in details["deliver_breakdown"]),
    ]
    return Outcome(details=details, lines=lines)
