"""A post's progress while a runner works on it, and the hourly totals.

The runner feeds :class:`Progress` the previous and new status of every
recipient it writes; the counts ride along in the runner's own writes (the
fenced UPDATE of each checkpoint), so showing how far a post has got costs
no query of its recipients. :func:`add_to_hour` keeps :class:`DeliveryHour`
in step with the recipients, in the same transaction.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Count
from django.utils import timezone

from . import statements
from .models import DeliveryHour, OutgoingMessage, OutgoingRecipient

logger = logging.getLogger(__name__)
RStatus = OutgoingRecipient.Status
COUNTED = (RStatus.SENT, RStatus.DEFERRED, RStatus.BOUNCED, RStatus.FAILED)
COUNT_FIELDS = {status: f"{status}_count" for status in COUNTED}


def runner_name() -> str:
    """Who is delivering: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def count(post: OutgoingMessage) -> dict[str, int]:
    """The recipients of the post (or shard) by status: one aggregate query."""
    rows = post.recipient_rows().order_by().values_list("status").annotate(n=Count("pk"))
    return dict(rows)


def count_fields(counts: dict[str, int]) -> dict[str, int]:
    """The post's counter fields for ``{status: recipients}``."""
    return {
        "recipient_count": sum(counts.values()),
        **{name: counts.get(status, 0) for status, name in COUNT_FIELDS.items()},
    }


def recount(posts: Any) -> None:
    """Write the counters of ``posts`` (a queryset or ids) again from their recipients.

    For an administrator's action, which moves recipients of many posts at once.
    """
    ids = list(posts.values_list("pk", flat=True)) if hasattr(posts, "values_list") else list(posts)
    shards = OutgoingMessage.objects.filter(pk__in=ids, parent__isnull=False)
    for shard in shards.only("pk", "parent_id", "first_recipient", "last_recipient"):
        ids.remove(shard.pk)  # a shard counts a range of its post's recipients
        OutgoingMessage.objects.filter(pk=shard.pk).update(**count_fields(count(shard)))
    per_post: dict[int, dict[str, int]] = {pk: {} for pk in ids}
    rows = (
        OutgoingRecipient.objects.filter(message__in=ids)
        .order_by()
        .values_list("message", "status")
        .annotate(n=Count("pk"))
    )
    for pk, status, n in rows:
        per_post[pk][status] = n
    for pk, counts in per_post.items():
        OutgoingMessage.objects.filter(pk=pk).update(**count_fields(counts))


@dataclass
class Progress:
    """Counts of one post during one attempt, and its rate."""

    counts: dict[str, int]
    opened: int  # recipients open when the attempt began
    started: float = field(default_factory=time.monotonic)
    visited: int = 0
    transactions: int = 0
    # This attempt's own answers, by status.
    tally: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    first_error: str = ""
    written: dict[str, int] = field(default_factory=dict)  # the counter fields the row holds

    @classmethod
    def of(cls, row: OutgoingMessage) -> Progress:
        """What the row says on a first attempt (counted at enqueue); a count otherwise."""
        if row.attempts <= 1 and row.recipient_count:
            counts = {status: getattr(row, name) for status, name in COUNT_FIELDS.items()}
            counts[RStatus.PENDING] = row.pending_count
        else:
            counts = count(row)
        opened = counts.get(RStatus.PENDING, 0) + counts.get(RStatus.DEFERRED, 0)
        written = {name: getattr(row, name) for name in COUNT_FIELDS.values()}
        return cls(counts, opened, written=written)

    def moved(self, status: str, was_deferred: bool) -> None:
        """One recipient answered ``status`` this attempt."""
        before = RStatus.DEFERRED if was_deferred else RStatus.PENDING
        self.counts[before] = self.counts.get(before, 0) - 1
        self.counts[status] = self.counts.get(status, 0) + 1
        self.tally[status] += 1
        self.visited += 1

    def changes(self, fields: dict[str, Any]) -> dict[str, float]:
        """How far the counters and the rate in ``fields`` moved since the row last held
        them; they are the row's from now on."""
        names = (*COUNT_FIELDS.values(), "rate")
        moved = {name: (fields[name] or 0) - (self.written.get(name) or 0) for name in names}
        self.written = {name: fields[name] for name in names}
        return moved

    def note_error(self, text: str) -> None:
        if not self.first_error and text:
            self.first_error = text

    def fields(self) -> dict[str, Any]:
        """The row's counters, rate and estimated finish, as of now."""
        elapsed = time.monotonic() - self.started
        rate = self.visited / elapsed if elapsed > 0 and self.visited else None
        left = max(self.opened - self.visited, 0)
        estimate = timezone.now() + timedelta(seconds=left / rate) if rate else None
        return {**count_fields(self.counts), "rate": rate, "finish_estimate": estimate}


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(dt_timezone.utc).replace(minute=0, second=0, microsecond=0)


def add_to_hour(list_id: str, sent: int = 0, bounced: int = 0, failed: int = 0) -> None:
    """Add answers to this hour's totals for the list, inside the caller's transaction.

    The totals are worth less than the recipients written beside them: a failed write
    (a full disk) is logged, and the caller's transaction goes on.
    """
    if not (sent or bounced or failed):
        return
    try:
        with transaction.atomic():
            _add_to_hour(list_id, sent, bounced, failed)
    except DatabaseError as error:
        logger.error("Could not add to the hourly totals of %s: %s", list_id, error)


def _add_to_hour(list_id: str, sent: int, bounced: int, failed: int) -> None:
    hour = hour_of(timezone.now())
    if statements.add_to_hour(hour, list_id, sent, bounced, failed):
        return
    try:
        with transaction.atomic():
            DeliveryHour.objects.create(
                hour=hour, list_id=list_id, sent=sent, bounced=bounced, failed=failed
            )
    except IntegrityError:  # another runner made the hour's row first, or the write failed
        if not statements.add_to_hour(hour, list_id, sent, bounced, failed):
            raise
