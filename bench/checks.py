"""What every timed run is checked against: the sink's counters, the runner's summary, the rows.

A failed check raises :class:`CorrectnessError`: the benchmark then prints what it measured,
says what went wrong, and exits with status 1.
"""

from __future__ import annotations

from typing import Any


class CorrectnessError(Exception):
    """The sink or the database disagrees with what the benchmark expected."""


def check_sink(
    sink: Any, before: tuple[int, int | None], messages: int, recipients: int, what: str
) -> None:
    """The sink took exactly ``messages`` (and, where it counts them, ``recipients``) since
    ``before`` (its counters then)."""
    after = sink.wait_for(before[0] + messages)
    got = after[0] - before[0]
    if got != messages:
        raise CorrectnessError(f"{what}: the sink received {got} messages, expected {messages}")
    if after[1] is not None and before[1] is not None:
        got = after[1] - before[1]
        if got != recipients:
            raise CorrectnessError(
                f"{what}: the sink received {got} recipients, expected {recipients}"
            )


def check_delivered(posts: int, what: str) -> None:
    """Every queued row ended delivered: at least ``posts`` of them (a big post's shards are
    rows too)."""
    from listdelivery.models import OutgoingMessage

    delivered = OutgoingMessage.objects.filter(status=OutgoingMessage.Status.DELIVERED).count()
    left = OutgoingMessage.objects.exclude(status=OutgoingMessage.Status.DELIVERED).count()
    if left or delivered < posts:
        raise CorrectnessError(
            f"{what}: {delivered} rows delivered and {left} not (expected {posts} posts)"
        )


def check_database(posts: int, recipients: int, what: str) -> None:
    """Every queued row ended delivered, and exactly ``recipients`` recipient rows exist,
    every one sent."""
    from listdelivery.models import OutgoingRecipient

    check_delivered(posts, what)
    rows = OutgoingRecipient.objects.count()
    sent = OutgoingRecipient.objects.filter(status=OutgoingRecipient.Status.SENT).count()
    if sent != recipients or rows != recipients:
        raise CorrectnessError(
            f"{what}: {sent} of {rows} recipient rows sent, expected {recipients}"
        )


def check_summary(summary: Any, transactions: int, recipients: int, posts: int, what: str) -> None:
    """The runner (or the runners, added up) reported what was expected."""
    got = (summary.transactions, summary.recipients, summary.delivered)
    if got != (transactions, recipients, posts):
        raise CorrectnessError(
            f"{what}: the runner reported {summary}; expected {posts} delivered, "
            f"{recipients} recipients in {transactions} transactions"
        )
