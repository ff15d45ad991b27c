"""Dashboard: the 30-day chart at volume, hourly totals against a count over the recipients.

Part of ``python -m bench`` (``--only dashboard`` for this alone). It fills, with
raw ``INSERT … SELECT`` from a recursive CTE (SQLite) or ``generate_series``
(PostgreSQL), a recipients table of ``--dashboard-rows`` rows (5 million by
default, 10 million on request; 100,000 with ``--quick``) answered over the last
30 days across :data:`LISTS` lists, and the hourly totals of those same answers,
as the runner keeps them. Then it times:

- **old**: the query the dashboard made until the hourly totals existed, a COUNT
  over the recipients by day with ``TruncDate`` (one run);
- **new**: :func:`listdelivery.dashboard.charts`, both charts built from one query
  over the hourly totals (median of :data:`REPEAT` runs).

Both must find the same totals (a correctness check). The rows are deleted afterwards.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta
from typing import Any

from bench.checks import CorrectnessError
from bench.context import Bench
from bench.report import Outcome, Row

# 10 million rows took over 3 minutes to write on SQLite on 2 busy cores (--dashboard-rows
# 10000000 for that); the hourly totals, and so the new chart's time, do not grow with them.
FULL_ROWS = 5_000_000
QUICK_ROWS = 100_000
LISTS = 10
REPEAT = 5
CHUNK = 1_000_000
SPAN_SECONDS = 30 * 86_400
STRIDE = 7_919  # a prime: consecutive recipients land far apart within the 30 days


def once(bench: Bench) -> Outcome:
    rows = bench.size(bench.options.dashboard_rows, QUICK_ROWS, FULL_ROWS)
    chart = run(rows, bench.progress)
    row = Row(
        scenario="dashboard: 30-day chart",
        n=rows,
        seconds=chart["new_ms"] / 1000,
        messages=0,
        recipients=0,
        note=f"from the hourly totals; a COUNT by day over the recipients took {chart['old_ms']} ms",
    )
    line = (
        f"dashboard, 30-day chart over {rows:,} recipient rows: COUNT by day "
        f"{chart['old_ms']} ms, hourly totals {chart['new_ms']} ms ({chart['ratio']}x)"
    )
    return Outcome(rows=[row], details=chart, lines=[line])


def run(rows: int, progress: Any = print) -> dict[str, Any]:
    """Fill, time both ways, check they agree, clean up; returns the figures."""
    from django.db import connection

    from listdelivery.models import DeliveryHour, OutgoingRecipient

    now = datetime.now().astimezone()
    began = time.perf_counter()
    try:
        posts = _lists_and_posts()
        _fill_recipients(connection, rows, posts, now, progress)
        _fill_hours(connection)
        filled = time.perf_counter() - began
        hours = DeliveryHour.objects.count()
        progress(f"dashboard: {rows:,} recipient rows, {hours:,} hourly rows")
        # The old way takes a minute at 10M rows on SQLite: once, on the table just written.
        old_ms, old_totals = _timed(lambda: _old_way(now), repeat=1, warm_up=False)
        new_ms, new_totals = _timed(lambda: _new_way(now), repeat=REPEAT)
    finally:
        _clean_up()
    if old_totals != new_totals:
        raise CorrectnessError(
            f"the 30-day chart from hourly totals {new_totals} differs from the recipients' "
            f"count {old_totals}"
        )
    result = {
        "recipient_rows": rows,
        "fill_seconds": round(filled, 1),
        "old_ms": round(old_ms, 2),
        "new_ms": round(new_ms, 2),
        "ratio": round(old_ms / new_ms, 1) if new_ms else None,
        "accepted_30_days": old_totals[0],
        "failed_30_days": old_totals[1],
        "recipient_table": OutgoingRecipient._meta.db_table,
    }
    progress(
        f"dashboard, 30-day chart over {rows:,} recipients: COUNT by day {old_ms:.1f} ms, "
        f"hourly totals {new_ms:.1f} ms ({result['ratio']}× faster); filled in {filled:.1f} s"
    )
    return result


def _lists_and_posts() -> list[tuple[int, str]]:
    """``LISTS`` lists with one delivered post each: ``[(post pk, list ID)]``."""
    from listdelivery.models import MailingList, OutgoingMessage

    posts = []
    for number in range(LISTS):
        mlist = MailingList.objects.create(address=f"chart{number}@bench.example.org")
        post = OutgoingMessage.objects.create(
            mailing_list=mlist,
            list_id=mlist.list_id,
            message=b"Subject: chart\n\nchart\n",
            status=OutgoingMessage.Status.DELIVERED,
        )
        posts.append((post.pk, mlist.list_id))
    return posts


def _fill_recipients(
    connection: Any, rows: int, posts: list[tuple[int, str]], now: datetime, progress: Any
) -> None:
    """Recipients spread evenly over the last 30 days: every 200th failed, every 50th bounced."""
    from listdelivery.models import OutgoingRecipient

    table = OutgoingRecipient._meta.db_table
    first_post = posts[0][0]  # created one after another: consecutive primary keys
    assert [pk for pk, _list in posts] == list(range(first_post, first_post + LISTS))
    # %% is a modulo: the statement has parameters (both drivers read it so).
    status = "CASE WHEN x %% 200 = 0 THEN 'failed' WHEN x %% 50 = 0 THEN 'bounced' ELSE 'sent' END"
    epoch = int(now.timestamp())
    if connection.vendor == "postgresql":
        numbers = "SELECT x FROM generate_series(%s, %s) AS x"
        finished = f"to_timestamp({epoch} - x * {STRIDE} %% {SPAN_SECONDS})"
    else:
        numbers = (
            "WITH RECURSIVE n(x) AS (SELECT %s UNION ALL SELECT x + 1 FROM n WHERE x < %s) "
            "SELECT x FROM n"
        )
        finished = (
            f"strftime('%%Y-%%m-%%d %%H:%%M:%%S', {epoch} - x * {STRIDE} %% {SPAN_SECONDS}, "
            "'unixepoch')"
        )
    sql = (
        f"INSERT INTO {table} (message_id, address, status, smtp_code, smtp_message, finished_at) "
        f"SELECT {first_post} + x %% {LISTS}, 'r' || x || '@example.org', {status}, NULL, '', "
        f"{finished} FROM ({numbers}) AS numbers"
    )
    began = time.perf_counter()
    with connection.cursor() as cursor:
        for start in range(1, rows + 1, CHUNK):
            cursor.execute(sql, [start, min(start + CHUNK - 1, rows)])
            if rows > CHUNK:
                done = min(start + CHUNK - 1, rows)
                progress(f"dashboard: {done:,} recipients in {time.perf_counter() - began:.0f} s")


def _fill_hours(connection: Any) -> None:
    """The hourly totals of those answers, as the runner adds them up."""
    from listdelivery.models import DeliveryHour, OutgoingMessage, OutgoingRecipient

    hour = (
        "date_trunc('hour', r.finished_at)"
        if connection.vendor == "postgresql"
        else "strftime('%Y-%m-%d %H:00:00', r.finished_at)"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {DeliveryHour._meta.db_table} (hour, list_id, sent, bounced, failed) "
            f"SELECT {hour}, m.list_id, "
            "SUM(CASE WHEN r.status = 'sent' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN r.status = 'bounced' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN r.status = 'failed' THEN 1 ELSE 0 END) "
            f"FROM {OutgoingRecipient._meta.db_table} r "
            f"JOIN {OutgoingMessage._meta.db_table} m ON m.id = r.message_id "
            f"GROUP BY {hour}, m.list_id"
        )


def _old_way(now: datetime) -> tuple[int, int]:
    """The 30-day chart's query before the hourly totals: a COUNT over recipients by day."""
    from django.db.models import Count, Q
    from django.db.models.functions import TruncDate
    from django.utils import timezone

    from listdelivery.models import OutgoingRecipient

    status = OutgoingRecipient.Status
    first_day = timezone.localdate(now) - timedelta(days=29)
    since = timezone.make_aware(datetime.combine(first_day, datetime.min.time()))
    rows = (
        OutgoingRecipient.objects.filter(finished_at__gte=since)
        .annotate(bucket=TruncDate("finished_at"))
        .values("bucket")
        .annotate(
            sent=Count("pk", filter=Q(status=status.SENT)),
            failed=Count("pk", filter=Q(status__in=(status.BOUNCED, status.FAILED))),
        )
        .order_by("bucket")
    )
    by_day = list(rows)
    return sum(row["sent"] for row in by_day), sum(row["failed"] for row in by_day)


def _new_way(now: datetime) -> tuple[int, int]:
    from listdelivery import dashboard

    days = dashboard.charts(now)[1]
    return days.sent, days.failed


def _timed(build: Any, repeat: int, warm_up: bool = True) -> tuple[float, Any]:
    """Median milliseconds of ``repeat`` runs (after one to warm up), and what it returned."""
    result = build() if warm_up else None
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = build()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), result


def _clean_up() -> None:
    from django.core.management.color import no_style
    from django.db import connection

    from listdelivery.models import (
        DeliveryAttempt,
        DeliveryHour,
        MailingList,
        OutgoingMessage,
        OutgoingRecipient,
    )

    models = (DeliveryHour, DeliveryAttempt, OutgoingRecipient, OutgoingMessage)
    tables = [model._meta.db_table for model in models]
    connection.ops.execute_sql_flush(
        connection.ops.sql_flush(no_style(), tables, allow_cascade=False)
    )
    MailingList.objects.filter(address__endswith="@bench.example.org").delete()
