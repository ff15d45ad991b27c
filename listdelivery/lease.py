"""The lease protocol: how runners own posts. The only code that writes a lease.

Invariants:

1. A runner sends for a post only while it holds the post's lease: the row's
   ``lease_token`` is the runner's token for that claim, its ``leased_until``
   is in the future, and its status is waiting (queued, retry, held, sending).
   Claiming a post makes it ``sending``; its ending writes what comes next.
2. Claiming is one conditional UPDATE of due rows whose lease is free or
   expired (``SELECT … FOR UPDATE SKIP LOCKED`` first where the database has
   it), with a token no one else has. So no two runners hold a row at once.
3. Every write a runner makes about a post it holds is fenced: ``WHERE pk =
   … AND lease_token = … AND status IN (waiting)``. A fenced write that
   matches no row means the lease is gone — the post was discarded or paused,
   or the lease expired and another runner claimed it — and the runner stops
   without sending another transaction (:class:`LeaseLost`). The one write
   that is not fenced is the record of recipients a server accepted: that is a
   fact whoever holds the post.
4. Every post of a claim but the first is checked again when it starts (a
   fenced read, or a fenced renewal when half its lease has gone by), so a post
   discarded or taken over while it waited behind the others is never started.
   The first starts a moment after the claim, which was its check.
5. While a runner works on a post, a heartbeat thread renews the lease every
   third of ``LEASE_DURATION``, however slow the server, and in between reads
   the row every :data:`CHECK_EVERY` seconds. When a renewal or a read finds
   the post no longer ours (paused, discarded, taken over), or renewals fail
   for so long that the lease may have run out, :attr:`Lease.lost` is set and
   the SMTP layer stops taking new transactions; the runner then stops. So a
   pause or a discard takes effect within about a second plus the transaction
   in flight.
6. Ending a post (its next or final status) releases the lease in the same
   fenced UPDATE that writes the status.
7. A runner that dies leaves its lease to expire; the post is then claimable
   again and at most the batch in flight since its last checkpoint is sent
   again.
8. The shards of a big post (:mod:`listdelivery.shards`) are claimed, held
   and ended like posts, one per claim. The post itself is never claimed: its
   ``leased_until`` only mirrors its shards' (the latest lease of those
   sending), so that "stalled" reads the same for every post.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import Case, F, Q, QuerySet, When
from django.utils import timezone

from . import statements
from .models import OutgoingMessage

logger = logging.getLogger(__name__)

#: Seconds between two reads of the post being delivered, to see a pause or a discard.
CHECK_EVERY = 1.0
#: Seconds between two renewals at the shortest, whatever the lease duration.
MIN_HEARTBEAT = 0.2

UNLEASED: dict[str, Any] = {"lease_token": "", "leased_until": None}


class LeaseLost(Exception):
    """The post is no longer ours (discarded, or taken over after our lease expired): stop."""


def free() -> Q:
    """Rows no runner holds now."""
    return Q(leased_until__isnull=True) | Q(leased_until__lt=timezone.now())


def claim(due: Q, count: int, duration: timedelta, recipients: int = 0) -> Claim:
    """Lease up to ``count`` rows matching ``due`` (and free) to a new token, oldest due first.

    A sharded post is never claimed, only its shards, and at most one shard per
    claim: the other runners take the others at the same time. With ``recipients``
    (not 0), posts after the first are taken only while the claim's recipients stay
    within it: many small posts go together, bigger ones are left to other runners.
    """
    now = timezone.now()
    token = uuid.uuid4().hex
    claimable = due & Q(shard_count=0) & (Q(leased_until__isnull=True) | Q(leased_until__lt=now))
    candidates = OutgoingMessage.objects.filter(claimable).order_by("next_attempt_at", "id")
    with transaction.atomic():
        ids, parents = _choose(candidates, count, recipients)
        if not ids:
            return Claim(token, [], duration)
        statements.take(ids, token, now, now + duration)
        if parents:  # the post is being delivered as soon as one of its shards is
            sending = OutgoingMessage.Status.SENDING
            OutgoingMessage.objects.filter(
                pk__in=parents, status__in=OutgoingMessage.WAITING
            ).update(
                status=sending,
                leased_until=now + duration,
                sending_since=Case(When(status=sending, then=F("sending_since")), default=now),
            )
    rows = (
        OutgoingMessage.objects.filter(lease_token=token, id__in=ids)
        .select_related("mailing_list")
        .order_by("next_attempt_at", "id")
    )
    return Claim(token, list(rows), duration)


def _choose(
    candidates: QuerySet[OutgoingMessage], count: int, recipients: int = 0
) -> tuple[list[int], list[int]]:
    """The ids to claim and the posts of the shards among them, locked where the database can.

    One shard when a shard is due first, else up to ``count`` posts. Only the rows
    taken are locked, so a runner claiming at the same moment takes the next shard
    instead of finding every one locked.
    """
    locking = connection.features.has_select_for_update_skip_locked
    first = list(candidates.values_list("id", "parent_id", "recipient_count")[:count])
    if not first:
        return [], []
    if not locking and all(parent is None for _, parent, _ in first):
        return _within(first, recipients), []  # no shard among them: what some_posts would read

    def locked(rows: QuerySet[OutgoingMessage]) -> QuerySet[OutgoingMessage]:
        return rows.select_for_update(skip_locked=True, of=("self",)) if locking else rows

    def one_shard() -> tuple[list[int], list[int]]:
        shards = locked(candidates.filter(parent__isnull=False))
        taken = list(shards.values_list("id", "parent_id", "recipient_count")[:1])
        return [pk for pk, _, _ in taken], [parent for _, parent, _ in taken]

    def some_posts() -> tuple[list[int], list[int]]:
        posts = locked(candidates.filter(parent__isnull=True))
        rows = posts.values_list("id", "parent_id", "recipient_count")[:count]
        return _within(list(rows), recipients), []

    shard_first = first[0][1] is not None
    for take in (one_shard, some_posts) if shard_first else (some_posts, one_shard):
        ids, parents = take()
        if ids:  # none when others hold them all right now
            return ids, parents
    return [], []


def _within(rows: list[tuple[int, int | None, int]], recipients: int) -> list[int]:
    """The ids of ``rows`` (id, parent, recipients) up to ``recipients`` in all; the first always."""
    taken, total = [], 0
    for pk, _, count in rows:
        total += count
        if taken and recipients and total > recipients:
            break
        taken.append(pk)
    return taken


def release(queryset: QuerySet[OutgoingMessage], **fields: Any) -> int:
    """Take the lease away from the rows (an administrator's action), writing ``fields`` too.

    A runner holding one of them finds out at its next fenced write or heartbeat.
    """
    return queryset.update(**UNLEASED, **fields)


def _by_token(leases: list[Lease]) -> dict[str, list[int]]:
    by_token: dict[str, list[int]] = {}
    for lease in leases:
        by_token.setdefault(lease.token, []).append(lease.row.pk)
    return by_token


def held_of(leases: list[Lease]) -> set[int]:
    """The posts of ``leases`` still held, locked until the caller's transaction ends."""
    return statements.held_of(_by_token(leases), lock=True)


def end_all(leases: list[Lease], **fields: Any) -> int:
    """End several posts alike, letting go of their leases, in one fenced UPDATE.

    For posts :func:`held_of` found held in the same transaction (invariant 6).
    """
    return statements.update_fenced(_by_token(leases), {**UNLEASED, **fields})


class Claim:
    """The posts one claim leased to this runner, started one after the other."""

    def __init__(self, token: str, rows: list[OutgoingMessage], duration: timedelta) -> None:
        self.token = token
        self.rows = rows
        self.leases = [Lease(row, token, duration) for row in rows]
        self.duration = duration

    def start(self, index: int) -> Lease:
        """The lease of the ``index``-th post, checked (invariant 4); :class:`LeaseLost` if gone."""
        lease = self.leases[index]
        if index > 0:
            if time.monotonic() - lease.renewed_at > self.duration.total_seconds() / 2:
                lease.renew()
            elif not lease.held():
                lease.lost.set()
        if lease.lost.is_set():
            raise LeaseLost(lease.row.pk)
        return lease


class Lease:
    """One post held by this runner under ``token``."""

    def __init__(self, row: OutgoingMessage, token: str, duration: timedelta) -> None:
        self.row = row
        self.token = token
        self.duration = duration
        self.lost = threading.Event()
        self.renewed_at = time.monotonic()

    def fenced(self) -> QuerySet[OutgoingMessage]:
        """The row, if and only if we still hold it (invariant 3)."""
        return OutgoingMessage.objects.filter(
            pk=self.row.pk, lease_token=self.token, status__in=OutgoingMessage.WAITING
        )

    def held(self) -> bool:
        """Whether we still hold the post: :meth:`fenced` as one read, its SQL built once
        (every small post of a claim asks as it starts)."""
        return bool(statements.held_of(_by_token([self])))

    def write(self, **fields: Any) -> int:
        """``fields`` (plain values) on the row while we hold it: :meth:`fenced`'s UPDATE, its
        SQL built once, for a checkpoint; 0 if the post is no longer ours."""
        return statements.update_fenced(_by_token([self]), fields)

    def renew(self, **fields: Any) -> None:
        """Extend the lease, writing ``fields`` in the same fenced UPDATE; :class:`LeaseLost` if gone."""
        began = time.monotonic()
        if not self.fenced().update(leased_until=self.expiry(), **fields):
            self.lost.set()
            raise LeaseLost(self.row.pk)
        self.renewed_at = began

    def taken_away(self) -> bool:
        """Whether the row says the post is no longer ours: paused, discarded, taken over.

        A row this connection cannot see (created in a transaction not yet
        committed, as in a test case) says nothing: that is for the renewal to find.
        """
        found = (
            OutgoingMessage.objects.filter(pk=self.row.pk)
            .values_list("lease_token", "status")
            .first()
        )
        return found is not None and (
            found[0] != self.token or found[1] not in OutgoingMessage.WAITING
        )

    def end(self, **fields: Any) -> bool:
        """Write the post's new status and let go of the lease; ``False`` if it was not ours."""
        return bool(self.fenced().update(**UNLEASED, **fields))

    def expiry(self) -> datetime:
        return timezone.now() + self.duration


class Heartbeat:
    """A thread that renews the lease of the post being delivered (invariant 5).

    One per run: :meth:`watch` a lease while delivering it, :meth:`watch` ``None`` after.
    It also renews the leases of the posts sent but not yet written (:meth:`keep`),
    so that a slow post after them never lets their leases run out.
    """

    def __init__(self, duration: timedelta) -> None:
        self.interval = max(duration.total_seconds() / 3, MIN_HEARTBEAT)
        self.tick = min(self.interval, CHECK_EVERY)
        self.duration = duration.total_seconds()
        self._lease: Lease | None = None
        self._kept: list[Lease] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def watch(self, lease: Lease | None) -> None:
        with self._lock:
            self._lease = lease
        if lease is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._beat, name="listdelivery-heartbeat", daemon=True
            )
            self._thread.start()

    def keep(self, leases: list[Lease]) -> None:
        with self._lock:
            self._kept = list(leases)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _beat(self) -> None:
        try:
            while not self._stopping.wait(self.tick):
                with self._lock:
                    lease = self._lease
                    if lease is not None:
                        self._renew(lease)
        finally:
            connection.close()  # this thread's own database connection

    def _renew_kept(self, leases: list[Lease]) -> None:
        """With the lease of the post being delivered: a slow post is what could outlast them."""
        began = time.monotonic()
        try:
            expiry = timezone.now() + timedelta(seconds=self.duration)
            statements.update_fenced(_by_token(leases), {"leased_until": expiry})
        except DatabaseError as error:
            logger.warning("Could not renew the leases of posts sent but not written: %s", error)
            return
        for lease in leases:  # one not renewed is found out when the posts are written
            lease.renewed_at = began

    def _renew(self, lease: Lease) -> None:
        if lease.lost.is_set():
            return
        try:
            if time.monotonic() - lease.renewed_at < self.interval:
                if lease.taken_away():  # between renewals: a read is enough
                    lease.lost.set()
                    raise LeaseLost(lease.row.pk)
                return
            lease.renew()
            if self._kept:
                self._renew_kept(self._kept)
        except LeaseLost:
            logger.warning(
                "Post %s was paused, discarded or taken over while being delivered: "
                "stopping before the next transaction",
                lease.row.pk,
            )
        except DatabaseError as error:
            logger.warning("Could not renew the lease on post %s: %s", lease.row.pk, error)
            if time.monotonic() - lease.renewed_at > self.duration - self.interval:
                lease.lost.set()  # it may have run out: someone else may hold it now
