"""The outgoing runner: claims due posts, has them delivered, and keeps the books.

The runner orchestrates: it claims due posts (:mod:`listdelivery.lease`),
decides whether a post is VERP'd and which delivery module sends it, has the
SMTP replies judged (:mod:`listdelivery.rules`), writes each batch's results
back, and decides when a post is done, retried, held or given up. The
delivery modules send; the SMTP layer talks. Nothing below this module
touches the database.

Recipients are written back after every batch of ``CHECKPOINT_EVERY``
transactions, so a runner killed at any instant repeats at most the batch it
had in flight; what a server accepted is recorded even when the rest of a
checkpoint cannot be.
"""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from functools import lru_cache
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, transaction
from django.db.models import Count, F, Q
from django.db.models.functions import Lower
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.module_loading import import_string

from . import conf, progress, redact, rules, shards, signals, statements
from .addresses import address_problem
from .bounces import score_bounces
from .decorate import Decoration, list_headers
from .delivery import BaseDelivery, Post, Recipient
from .lease import Claim, Heartbeat, Lease, LeaseLost, claim, end_all, held_of
from .models import (
    BounceEvent,
    DeliveryAttempt,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    RunnerPass,
)
from .progress import Progress
from .rules import PostFailure, Verdicts, judge, storable_code, storable_text
from .smtp import SMTPPool
from .wire import plain_fields

logger = logging.getLogger(__name__)
smtp_log = logging.getLogger("listdelivery.smtp")

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status
ID_CHUNK = 5000
PREFETCH_LIMIT = 1000  # recipients read at once for all the posts of one claim


@dataclass
class RunSummary:
    posts: int = 0
    shards: int = 0  # of big posts: a post ends (and is counted below) with its last shard
    delivered: int = 0
    retrying: int = 0
    held: int = 0
    failed: int = 0
    discarded: int = 0
    recipients: int = 0
    deferred: int = 0
    bounced: int = 0
    transactions: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        shards = f" and {self.shards} shards of big posts" if self.shards else ""
        return (
            f"{self.posts} posts{shards} ({self.delivered} delivered, {self.retrying} to retry, "
            f"{self.held} held, {self.failed} failed, {self.discarded} discarded); "
            f"{self.recipients} recipients accepted, {self.deferred} deferred, "
            f"{self.bounced} bounced; {self.transactions} SMTP transactions in {self.seconds:.2f} s"
        )

    def count(self, status: str) -> None:
        name = {
            Status.DELIVERED: "delivered",
            Status.RETRY: "retrying",
            Status.QUEUED: "retrying",  # set aside until a limit allows: it will go on
            Status.HELD: "held",
            Status.FAILED: "failed",
            Status.DISCARDED: "discarded",
        }[status]
        setattr(self, name, getattr(self, name) + 1)


def decide_verp(mlist: MailingList, metadata: dict[str, Any], config: dict[str, Any]) -> bool:
    """Mailman's VERP rule for ``mlist``'s current post (see :func:`listdelivery.rules.decide_verp`)."""
    return rules.decide_verp(mlist.personalize, mlist.post_id, metadata, config)


@dataclass
class Ending:
    """How a post leaves this run: its status, why, and the row fields that go with it."""

    status: str
    error: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    give_up: bool = False  # its open recipients become failed
    problem: str = ""  # the kind of server trouble (rules.PROBLEMS) that holds or delays it


@dataclass
class Prefetched:
    """A post's open recipients read with those of the rest of its claim."""

    recipients: dict[str, int]
    complete: bool
    deferred: set[int] = field(default_factory=set)  # ids of the recipients deferred before


@dataclass
class Entry:
    """A small post's one batch, sent and waiting in the books to be written with others."""

    lease: Lease
    mlist: MailingList
    post: Post
    batch: dict[str, int]
    verdicts: Verdicts
    unsaved: dict[str, Any]
    ending: Ending
    progress: Progress | None


@dataclass
class Books:
    """The results of small posts, written together in one transaction.

    Written before the post after them would bring their recipients past
    ``CHECKPOINT_EVERY`` (so a crash sends at most that many copies again, as
    with a personalized post's batch, and never more than a bulk batch), before
    a post that is not small, when the oldest has waited a third of a lease, and
    at the end of the run. The heartbeat renews their leases meanwhile.
    """

    entries: list[Entry] = field(default_factory=list)
    recipients: int = 0
    since: float = 0.0

    def add(self, entry: Entry) -> None:
        if not self.entries:
            self.since = time.monotonic()
        self.entries.append(entry)
        self.recipients += len(entry.batch)

    def full_with(self, recipients: int, config: dict[str, Any]) -> bool:
        return bool(self.entries) and (
            self.recipients + recipients > config["CHECKPOINT_EVERY"] or self.due(config)
        )

    def due(self, config: dict[str, Any]) -> bool:
        waited = time.monotonic() - self.since
        return bool(self.entries) and (
            self.recipients >= config["CHECKPOINT_EVERY"]
            or waited > config["LEASE_DURATION"].total_seconds() / 3
        )

    def take(self) -> list[Entry]:
        entries, self.entries, self.recipients = self.entries, [], 0
        return entries


class OutgoingRunner:
    """Process every due row once, in this process, and return a :class:`RunSummary`."""

    def __init__(
        self,
        *,
        limit: int | None = None,
        list_address: str | None = None,
        on_post: Callable[[OutgoingMessage, RunSummary], None] | None = None,
    ) -> None:
        self.limit = limit
        self.list_address = list_address
        self.on_post = on_post
        self.name = progress.runner_name()
        self._progress: Progress | None = None  # of the post being delivered
        self._books = Books()  # small posts' results, written together

    def run(self) -> RunSummary:
        self.config = config = conf.get_config()
        summary = RunSummary()
        began = time.monotonic()
        started = timezone.now()
        due = Q(status__in=OutgoingMessage.WAITING, next_attempt_at__lte=started)
        if self.list_address:
            due &= Q(mailing_list__address__iexact=self.list_address)
        with SMTPPool(config) as pool, Heartbeat(config["LEASE_DURATION"]) as heartbeat:
            self._heartbeat = heartbeat
            modules = {
                name: import_string(config[name])(pool, config)
                for name in ("BULK_DELIVERY", "INDIVIDUAL_DELIVERY")
            }
            while self.limit is None or summary.posts + summary.shards < self.limit:
                wanted = config["CLAIM_BATCH"]
                if self.limit is not None:
                    wanted = min(wanted, self.limit - summary.posts - summary.shards)
                posts = claim(
                    due, wanted, config["LEASE_DURATION"], recipients=config["SHARD_SIZE"]
                )
                if not posts.rows:
                    break
                known = self._prefetch_recipients(posts.rows)
                for index, row in enumerate(posts.rows):
                    if row.is_shard:
                        summary.shards += 1
                    else:
                        summary.posts += 1
                    if self._books.due(self.config):
                        self._write_books(summary)
                    self._process_safely(
                        posts, index, heartbeat, modules, summary, known.get(row.pk)
                    )
                    if self.on_post:
                        self.on_post(row, summary)
            self._write_books(summary)
        if summary.bounced:
            score_bounces()
        summary.seconds = time.monotonic() - began
        self._record_pass(summary)
        return summary

    def _record_pass(self, summary: RunSummary) -> None:
        """Say when a runner last finished a pass, for the health check: one row."""
        fields = {
            "finished_at": timezone.now(),
            "runner": self.name,
            "posts": summary.posts,
            "seconds": summary.seconds,
        }
        try:
            if not RunnerPass.objects.filter(pk=1).update(**fields):
                RunnerPass.objects.update_or_create(pk=1, defaults=fields)
        except DatabaseError as error:
            logger.warning("Could not record the end of this pass: %s", error)

    # -- one post -----------------------------------------------------------

    def _process_safely(
        self,
        posts: Claim,
        index: int,
        heartbeat: Heartbeat,
        modules: dict[str, BaseDelivery],
        summary: RunSummary,
        known: Prefetched | None = None,
    ) -> None:
        lease = posts.leases[index]
        self._progress = None
        try:
            posts.start(index)
            heartbeat.watch(lease)
            self._process(lease, modules, summary, known)
        except LeaseLost:
            logger.warning(
                "Stopped delivering %s: it was paused or discarded, or its lease expired "
                "and another runner took it over",
                _label(lease.row),
            )
            self._after_lease_lost(lease)
        except Exception as error:
            self._after_unexpected_error(lease, summary, error)
        finally:
            heartbeat.watch(None)
            self._progress = None

    def _after_lease_lost(self, lease: Lease) -> None:
        """Record the attempt that stopped, and the counts it left, if it had begun."""
        if self._progress is None:
            return
        row = lease.row
        try:
            status = OutgoingMessage.objects.filter(pk=row.pk).values_list("status", flat=True)
            now_status = status.first()
            outcome = now_status if now_status in (Status.PAUSED, Status.DISCARDED) else "lost"
            with transaction.atomic():
                if outcome != "lost":  # our last checkpoint's counts did not land: count
                    progress.recount([row.pk])
                    if row.is_shard:
                        shards.rollup(row.parent_id)
                self._record_attempt(row, outcome, _STOPPED[outcome])
        except DatabaseError as error:
            logger.warning("Could not record the stopped attempt on %s: %s", _label(row), error)

    def _after_unexpected_error(self, lease: Lease, summary: RunSummary, error: Exception) -> None:
        """Retry a post that met an error of our own, but not for ever.

        After ``UNEXPECTED_ERROR_LIMIT`` such attempts in a row, or past the retry
        deadline, the post fails with the error as its reason.
        """
        row = lease.row
        description = self._describe(error)
        streak = row.unexpected_errors + 1
        limit = self.config["UNEXPECTED_ERROR_LIMIT"]
        logger.error(
            "Unexpected error while delivering %s (%d of %d in a row):\n%s",
            _label(row),
            streak,
            limit,
            self._redact("".join(traceback.format_exception(error)[:-1])) + description,
        )
        now = timezone.now()
        deadline = row.deliver_until or now + self.config["DELIVERY_RETRY_PERIOD"]
        if streak >= limit or now > deadline:
            reason = f"failed: the same kind of error {streak} times in a row: {description}"
            fields = {"unexpected_errors": streak, "finished_at": now}
            ending = Ending(Status.FAILED, reason, fields, give_up=True)
        else:
            reason = f"unexpected error ({streak} of {limit} before giving up): {description}"
            ending = Ending(
                Status.RETRY,
                reason,
                {
                    "next_attempt_at": self._backoff(row),
                    "deliver_until": deadline,
                    "unexpected_errors": streak,
                },
            )
        try:
            self._end_alone(lease, summary, ending)
        except (LeaseLost, DatabaseError) as second:
            logger.error("Could not record the error of %s: %s", _label(row), second)

    def _describe(self, error: BaseException) -> str:
        """The error in words that hold no secret (a Unicode error quotes the text it failed on)."""
        if isinstance(error, UnicodeError):
            text = f"{type(error).__name__}: text that cannot be encoded or decoded"
        else:
            text = f"{type(error).__name__}: {error}"
        return storable_text(self._redact(text))

    def _redact(self, text: str) -> str:
        return redact.without(self.config["SMTP_PASSWORD"], text)

    def _process(
        self,
        lease: Lease,
        modules: dict[str, BaseDelivery],
        summary: RunSummary,
        known: Prefetched | None,
    ) -> None:
        row = lease.row
        mlist = row.mailing_list
        if mlist is None:
            self._discard(lease, summary, f"the mailing list {row.list_id} was deleted")
            return
        raw = row.raw
        headers = _header_values(raw)
        if not headers:
            self._discard(lease, summary, "the message has no header fields: it is not a post")
            return
        metadata = dict(row.metadata) if isinstance(row.metadata, dict) else {}
        unsaved: dict[str, Any] = {}  # row fields written with the first checkpoint
        if "verp_reason" not in metadata:  # what decided, for the post's page
            metadata["verp_reason"] = rules.verp_reason(
                mlist.personalize, mlist.post_id, metadata, self.config
            )
            unsaved["metadata"] = metadata
        if "verp" not in metadata:
            metadata["verp"] = decide_verp(mlist, metadata, self.config)
        if row.unexpected_errors:
            unsaved["unexpected_errors"] = 0
        sender = metadata.get("sender") or mlist.bounces_address
        problem = address_problem(sender)
        if problem:
            self._discard(lease, summary, f"the envelope sender {sender!r} {problem}")
            return
        post = Post(
            relays=self._relays_for(mlist),
            message=raw,
            sender=sender,
            message_id=str(headers.get("message-id", "")).strip(),
            verp=metadata["verp"],
            personalize=mlist.personalize,
            list_address=mlist.address,
            metadata=metadata,
            decoration=self._decoration(mlist, metadata),
        )
        individual = post.verp or mlist.personalize != "none"
        module = modules["INDIVIDUAL_DELIVERY" if individual else "BULK_DELIVERY"]
        if "personalize" not in metadata:  # what this post was delivered as, for its page
            metadata["personalize"] = mlist.personalize
            unsaved["metadata"] = metadata
        self._progress = Progress.of(row)
        if known is None:
            known = Prefetched({}, complete=False)
        began = time.monotonic()
        tally: Counter[str] = Counter()
        refusals: list[tuple[str, int | None, str]] = []
        post_failure = None
        ended = False
        batch_size = module.batch_size_for(post)
        # A post that goes in one batch joins the books written with the claim's others;
        # before any other, those are written, so that a crash repeats one batch at most.
        small = known.complete and len(known.recipients) <= (batch_size or len(known.recipients))
        if not small or self._books.full_with(len(known.recipients), self.config):
            self._write_books(summary)
        for batch, last in self._open_recipients(row, batch_size, known):
            recipients = self._addressees(mlist, batch, individual)
            verdicts = judge(module.deliver(post, recipients, stop=lease.lost))
            tally["transactions"] += verdicts.transactions
            for (status, code, text), addresses in verdicts.groups.items():
                tally[status] += len(addresses)
                if status != RStatus.SENT:
                    refusals.extend((address, code, text) for address in addresses)
            post_failure = verdicts.post_failure
            self._tally_progress(batch, verdicts, known)
            # A batch cut short by a lost lease is not the last, whatever was read.
            last = last and not lease.lost.is_set()
            # After the last batch the tally often proves the outcome: end in the same write.
            ending = (
                self._ending_from_tally(row, tally, refusals) if last and not post_failure else None
            )
            if small and ending is not None and not ending.give_up:
                self._books.add(
                    Entry(lease, mlist, post, batch, verdicts, unsaved, ending, self._progress)
                )
                self._heartbeat.keep([entry.lease for entry in self._books.entries])
            else:
                self._checkpoint(lease, mlist, post, batch, verdicts, unsaved, ending, summary)
            unsaved = {}
            if post_failure or last:
                ended = ending is not None
                break
        self._log_delivery(
            row, post, headers, tally, refusals, post_failure, time.monotonic() - began
        )
        summary.transactions += tally["transactions"]
        summary.recipients += tally[RStatus.SENT]
        summary.deferred += tally[RStatus.DEFERRED]
        summary.bounced += tally[RStatus.BOUNCED]
        if not ended:
            self._conclude(lease, summary, post_failure, _last_reply(refusals), unsaved)

    def _tally_progress(self, batch: dict[str, int], verdicts: Verdicts, known: Prefetched) -> None:
        tracked = self._progress
        assert tracked is not None
        tracked.transactions += verdicts.transactions
        for (status, code, text), addresses in verdicts.groups.items():
            if status != RStatus.SENT:
                tracked.note_error(f"{code} {text}" if code else text)
            for address in addresses:
                if address in batch:
                    tracked.moved(status, batch[address] in known.deferred)
        if verdicts.post_failure:
            tracked.note_error(verdicts.post_failure.reason)

    def _prefetch_recipients(self, rows: list[OutgoingMessage]) -> dict[int, Prefetched]:
        """The open recipients of all the claimed posts, in one query of at most
        ``PREFETCH_LIMIT`` rows.

        Small posts are the common case, and one query for the whole claim beats
        one per post. A post the query cut short gets what was read, marked
        incomplete, and pages the rest itself; posts after it page everything.
        """
        rows = [row for row in rows if not row.is_shard]  # a shard is big: it pages its own
        found = list(
            OutgoingRecipient.objects.filter(message__in=rows, status__in=OutgoingRecipient.OPEN)
            .order_by("message_id", "id")
            .values_list("message_id", "id", "address", "status")[: PREFETCH_LIMIT + 1]
        )
        cut = found[PREFETCH_LIMIT][0] if len(found) > PREFETCH_LIMIT else None
        known = {
            row.pk: Prefetched({}, complete=row.pk != cut)
            for row in rows
            if cut is None or row.pk <= cut
        }
        for message_id, pk, address, status in found[:PREFETCH_LIMIT]:
            known[message_id].recipients[address] = pk
            if status == RStatus.DEFERRED:
                known[message_id].deferred.add(pk)
        return known

    def _open_recipients(
        self, row: OutgoingMessage, batch_size: int | None, known: Prefetched
    ) -> Iterator[tuple[dict[str, int], bool]]:
        """``(batch, is the last)`` of recipients still to send, by keyset: each visited once per run.

        The ids of those deferred before go into ``known.deferred``.
        """
        cursor = 0
        # Without a batch size everyone goes in one transaction: only a complete read will do.
        if (known.recipients or known.complete) and (batch_size or known.complete):
            items = list(known.recipients.items())
            size = batch_size or len(items) or 1
            if not known.complete:
                items = items[: len(items) - len(items) % size]  # whole batches only
            for start in range(0, len(items), size):
                batch = dict(items[start : start + size])
                last = known.complete and start + size >= len(items)
                yield batch, last
                if last:
                    return
                cursor = max(batch.values())
            if known.complete:
                return
        while True:
            page = statements.open_recipients(row, cursor, batch_size or None)
            batch = {}
            for pk, address, status in page:
                batch[address] = pk
                if status == RStatus.DEFERRED:
                    known.deferred.add(pk)
            if not batch:
                return
            last = not batch_size or len(batch) < batch_size
            yield batch, last
            if last:
                return
            cursor = max(batch.values())

    def _addressees(
        self, mlist: MailingList, batch: dict[str, int], individual: bool
    ) -> list[Recipient]:
        """The batch's recipients, with member names and ids for personal copies (one query).

        Members are matched whatever the case of the address, as they are stored.
        """
        if not individual:
            return [Recipient(address) for address in batch]
        members = {
            address.casefold(): (name, pk)
            for address, name, pk in statements.members(mlist.pk, list(batch))
        }
        others = [a.lower() for a in batch if a.casefold() not in members]
        if others:  # rare: an address not written as the member's (no index serves this)
            found = Member.objects.annotate(key=Lower("address"))
            found = found.filter(mailing_list=mlist, key__in=others)
            members.update(
                (address.casefold(), (name, pk))
                for address, name, pk in found.values_list("address", "display_name", "pk")
            )
        return [
            Recipient(address, *members.get(address.casefold(), ("", None))) for address in batch
        ]

    def _relays_for(self, mlist: MailingList) -> tuple[str, ...]:
        """The relays this list may use, as ``LIST_RELAYS`` says (empty: all)."""
        names = self.config["LIST_RELAYS"].get(mlist.address.lower())
        return tuple(names or ())

    def _decoration(self, mlist: MailingList, metadata: dict[str, Any]) -> Decoration:
        """List headers always; header and footer unless the post says not to (Mailman's keys)."""
        plain = bool(metadata.get("nodecorate") or metadata.get("isdigest"))
        base_url = self.config["UNSUBSCRIBE_BASE_URL"].rstrip("/")
        return Decoration(
            header="" if plain else mlist.header,
            footer="" if plain else mlist.footer,
            variables=mlist.variables(),
            list_headers=list_headers(
                mlist.list_id,
                mlist.display_name,
                mlist.address,
                mlist.leave_address,
                mlist.archive_url,
            ),
            one_click=bool(base_url),
            unsubscribe_url=base_url + _unsubscribe_path(),
            list_pk=mlist.pk,
        )

    # -- bookkeeping --------------------------------------------------------

    def _checkpoint(
        self,
        lease: Lease,
        mlist: MailingList,
        post: Post,
        batch: dict[str, int],
        verdicts: Verdicts,
        unsaved: dict[str, Any],
        ending: Ending | None,
        summary: RunSummary,
    ) -> None:
        """Write one batch's results, and renew the lease or end the post, in one transaction.

        Should that transaction fail, the recipients the server accepted are
        recorded on their own before the error goes on: they must never be sent again.
        """
        self._write_books(summary)
        groups = dict(verdicts.groups)
        sent = [batch[a] for a in groups.pop((RStatus.SENT, None, ""), []) if a in batch]
        answered = Counter()
        for (status, _code, _text), addresses in groups.items():
            answered[status] += sum(1 for a in addresses if a in batch)
        tracked = self._progress
        assert tracked is not None
        try:
            with transaction.atomic():
                _record_sent(sent)
                self._record_refusals(mlist, post, batch, groups)
                progress.add_to_hour(
                    mlist.list_id,
                    sent=len(sent),
                    bounced=answered[RStatus.BOUNCED],
                    failed=answered[RStatus.FAILED],
                )
                if ending:
                    kept = self._end(lease, summary, ending, **unsaved)
                else:
                    fields = {"leased_until": lease.expiry(), **tracked.fields()}
                    kept = lease.write(updated_at=timezone.now(), **fields, **unsaved)
                    if kept and lease.row.is_shard:
                        shards.add_progress(lease.row.parent_id, tracked.changes(fields), fields)
        except DatabaseError:
            with transaction.atomic():
                progress.add_to_hour(mlist.list_id, sent=_record_sent(sent))
            raise
        if not kept:
            lease.lost.set()
            raise LeaseLost(lease.row.pk)
        lease.renewed_at = time.monotonic()

    def _record_refusals(
        self,
        mlist: MailingList,
        post: Post,
        batch: dict[str, int],
        groups: dict[tuple[str, int | None, str], list[str]],
    ) -> None:
        now = timezone.now()
        bounces = []
        for (status, code, text), addresses in groups.items():
            code, text = storable_code(code), storable_text(text)
            finished = None if status == RStatus.DEFERRED else now
            for ids in _chunks([batch[a] for a in addresses if a in batch]):
                OutgoingRecipient.objects.filter(
                    id__in=ids, status__in=OutgoingRecipient.OPEN
                ).update(status=status, smtp_code=code, smtp_message=text, finished_at=finished)
            if status == RStatus.BOUNCED:
                bounces += [
                    BounceEvent(
                        mailing_list=mlist,
                        address=address,
                        smtp_code=code,
                        smtp_message=text,
                        message_id=storable_text(post.message_id, 998),
                        context=BounceEvent.Context.NORMAL,
                        created_at=now,
                    )
                    for address in addresses
                ]
        if bounces:
            BounceEvent.objects.bulk_create(bounces)

    def _ending_from_tally(
        self, row: OutgoingMessage, tally: Counter[str], refusals: list
    ) -> Ending | None:
        """The outcome when this run visited every open recipient; ``None`` if it takes a COUNT."""
        still_open = tally[RStatus.DEFERRED]
        if not still_open and not tally[RStatus.SENT]:
            return None  # whether an earlier attempt delivered to anyone needs counting
        return self._ending(row, still_open, True, None, _last_reply(refusals))

    def _conclude(
        self,
        lease: Lease,
        summary: RunSummary,
        post_failure: PostFailure | None,
        last_reply: str = "",
        unsaved: dict[str, Any] | None = None,
    ) -> None:
        row = lease.row
        counts = dict(
            row.recipient_rows()
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        if not counts:
            self._discard(lease, summary, "no recipients: nothing to deliver")
            return
        if self._progress is not None:
            self._progress.counts = counts
        still_open = counts.get(RStatus.PENDING, 0) + counts.get(RStatus.DEFERRED, 0)
        ending = self._ending(
            row, still_open, bool(counts.get(RStatus.SENT)), post_failure, last_reply
        )
        self._end_alone(lease, summary, ending, **(unsaved or {}))

    def _ending(
        self,
        row: OutgoingMessage,
        still_open: int,
        any_sent: bool,
        post_failure: PostFailure | None,
        last_reply: str,
    ) -> Ending:
        """Delivered, failed, held for an administrator, or retried under Mailman's progress rule."""
        if not still_open:
            if any_sent:
                return Ending(Status.DELIVERED, fields={"finished_at": timezone.now()})
            return Ending(Status.FAILED, shards.NOBODY_ACCEPTED, {"finished_at": timezone.now()})
        if post_failure and post_failure.kind == "limited":
            # Not a failure: the post goes on when the limits allow, and this run was no attempt.
            logger.info("Setting %s aside: %s", _label(row), post_failure.reason)
            wait = timedelta(seconds=post_failure.retry_after or 1.0)
            return Ending(
                Status.QUEUED if row.attempts <= 1 else Status.RETRY,
                post_failure.reason,
                {"next_attempt_at": timezone.now() + wait, "attempts": F("attempts") - 1},
                problem="limited",
            )
        if post_failure and post_failure.needs_admin:
            logger.error(
                "Holding %s until an administrator acts: %s", _label(row), post_failure.reason
            )
            return Ending(
                Status.HELD,
                f"{post_failure.reason} (held until an administrator retries it)",
                {"next_attempt_at": None, "last_failure_count": still_open},
                problem=post_failure.kind,
            )
        now = timezone.now()
        deadline = row.deliver_until
        if still_open != row.last_failure_count or deadline is None:
            deadline = now + self.config["DELIVERY_RETRY_PERIOD"]
        elif now > deadline:
            smtp_log.error("Discarding message with persistent temporary failures: %s", _label(row))
            reason = (
                f"gave up: {still_open} recipients still failing after "
                f"{self.config['DELIVERY_RETRY_PERIOD']} without progress"
            )
            return Ending(Status.FAILED, reason, {"finished_at": now}, give_up=True)
        problem = ""
        if post_failure:
            status, reason = post_failure.status, post_failure.reason
            problem = post_failure.kind
            verb = "Holding" if status == Status.HELD else "Will retry"
            logger.error("%s %s: %s", verb, _label(row), reason)
        else:
            status = Status.RETRY
            reason = f"{still_open} recipients to retry; last reply: {last_reply or 'none'}"
        return Ending(
            status,
            reason,
            {
                "next_attempt_at": self._backoff(row),
                "deliver_until": deadline,
                "last_failure_count": still_open,
            },
            problem=problem,
        )

    def _end(self, lease: Lease, summary: RunSummary, ending: Ending, **fields: Any) -> bool:
        """Apply an ending inside the caller's transaction; ``False`` if the lease was lost."""
        row = lease.row
        now = timezone.now()
        if ending.give_up:
            still_open = row.recipient_rows()
            # The deferred keep the server's last reply to them; the others get the reason.
            given_up = still_open.filter(status=RStatus.DEFERRED).update(
                status=RStatus.FAILED, finished_at=now
            )
            given_up += still_open.filter(status=RStatus.PENDING).update(
                status=RStatus.FAILED, smtp_message=storable_text(ending.error), finished_at=now
            )
            progress.add_to_hour(row.list_id, failed=given_up)
        if ending.give_up or self._progress is None:
            counts = progress.count_fields(progress.count(row))
        else:
            counts = progress.count_fields(self._progress.counts)
        error = storable_text(ending.error, 10_000)
        if not lease.end(
            status=ending.status,
            last_error=error,
            updated_at=now,
            problem=ending.problem,
            rate=None,
            finish_estimate=None,
            **counts,
            **ending.fields,
            **fields,
        ):
            return False
        row.status, row.last_error = ending.status, error
        self._record_attempt(row, ending.status, error)
        if row.is_shard:
            self._end_of_shard(row, summary)
        else:
            summary.count(ending.status)
            _announce(row, ending)
        return True

    def _end_of_shard(self, shard: OutgoingMessage, summary: RunSummary) -> None:
        """Roll the shard's ending up into its post; the last shard to end ends the post."""
        before, post = shards.rollup(shard.parent_id)
        if post is None or post.status == before:
            return
        if post.status in (Status.QUEUED, Status.RETRY, Status.SENDING):
            return  # other shards go on: not news
        if post.status != Status.PAUSED:
            summary.count(post.status)
        fields = {"next_attempt_at": post.next_attempt_at}
        _announce(post, Ending(post.status, post.last_error, fields))

    def _record_attempt(self, row: OutgoingMessage, outcome: str, reason: str) -> None:
        """One row of the post's attempt history (inside the caller's transaction)."""
        self._save_attempts([self._attempt(row, outcome, reason, self._progress)])

    def _save_attempts(self, attempts: list[DeliveryAttempt]) -> None:
        """History is worth less than the posts' status: a failed write is logged, not raised."""
        try:
            with transaction.atomic():
                statements.insert(attempts)
        except DatabaseError as error:
            posts = ", ".join(str(attempt.message_id) for attempt in attempts)
            logger.error("Could not record the attempts on post(s) %s: %s", posts, error)

    def _attempt(
        self, row: OutgoingMessage, outcome: str, reason: str, tracked: Progress | None
    ) -> DeliveryAttempt:
        tally = tracked.tally if tracked else {}
        now = timezone.now()
        return DeliveryAttempt(
            message_id=row.pk,
            number=row.attempts,
            runner=self.name,
            started_at=row.sending_since or now,
            finished_at=now,
            accepted=tally.get(RStatus.SENT, 0),
            deferred=tally.get(RStatus.DEFERRED, 0),
            bounced=tally.get(RStatus.BOUNCED, 0),
            failed=tally.get(RStatus.FAILED, 0),
            transactions=tracked.transactions if tracked else 0,
            first_error=storable_text(tracked.first_error if tracked else ""),
            outcome=outcome,
            reason=reason,
        )

    # -- the books of small posts ---------------------------------------------

    def _write_books(self, summary: RunSummary) -> None:
        """Write the small posts waiting in the books, in one transaction.

        What the server accepted, the refusals, the hour's totals, each post's
        ending (one fenced UPDATE for the posts that end alike) and the
        attempts: a handful of statements for a whole claim of small posts
        instead of as many for each. A post whose lease was lost meanwhile
        keeps only its accepted recipients, as at any checkpoint.
        """
        entries = self._books.take()
        if not entries:
            return
        self._heartbeat.keep([])
        current = self._progress  # of the post being delivered, if any: the books are others'
        try:
            self._write(entries, summary)
        finally:
            self._progress = current

    def _write(self, entries: list[Entry], summary: RunSummary) -> None:
        sent: dict[str, list[int]] = {}
        for entry in entries:
            accepted = entry.verdicts.groups.get((RStatus.SENT, None, ""), [])
            ids = [entry.batch[a] for a in accepted if a in entry.batch]
            sent.setdefault(entry.mlist.list_id, []).extend(ids)
        try:
            with transaction.atomic():
                held = self._write_entries(entries, sent, summary)
        except DatabaseError as error:
            with transaction.atomic():
                for list_id, ids in sent.items():
                    progress.add_to_hour(list_id, sent=_record_sent(ids))
            for entry in entries:
                self._progress = entry.progress
                self._after_unexpected_error(entry.lease, summary, error)
            return
        for entry in entries:
            if entry.lease.row.pk in held:
                _announce(entry.lease.row, entry.ending)
            else:
                logger.warning(
                    "Stopped delivering %s: it was paused or discarded, or its lease expired "
                    "and another runner took it over",
                    _label(entry.lease.row),
                )
                self._progress = entry.progress
                self._after_lease_lost(entry.lease)

    def _write_entries(
        self, entries: list[Entry], sent: dict[str, list[int]], summary: RunSummary
    ) -> set[int]:
        """The books' writes, inside the caller's transaction; the posts still ours."""
        held = held_of([entry.lease for entry in entries])  # locked first, as admin actions do
        answered: dict[str, Counter[str]] = {}
        for entry in entries:
            groups = dict(entry.verdicts.groups)
            groups.pop((RStatus.SENT, None, ""), None)
            if groups:
                self._record_refusals(entry.mlist, entry.post, entry.batch, groups)
            totals = answered.setdefault(entry.mlist.list_id, Counter())
            for (status, _code, _text), addresses in groups.items():
                totals[status] += sum(1 for a in addresses if a in entry.batch)
        for list_id, ids in sent.items():
            _record_sent(ids)
            totals = answered.get(list_id, Counter())
            progress.add_to_hour(
                list_id,
                sent=len(ids),
                bounced=totals[RStatus.BOUNCED],
                failed=totals[RStatus.FAILED],
            )
        now = timezone.now()
        alike: dict[str, tuple[dict[str, Any], list[Entry]]] = {}
        for entry in entries:
            if entry.lease.row.pk not in held:
                continue
            fields = self._ending_fields(entry, now)
            key = json.dumps(fields, sort_keys=True, cls=DjangoJSONEncoder)
            alike.setdefault(key, (fields, []))[1].append(entry)
        for fields, group in alike.values():
            end_all([entry.lease for entry in group], **fields)
        attempts = []
        for entry in entries:
            row = entry.lease.row
            if row.pk in held:
                row.status, row.last_error = entry.ending.status, entry.ending.error
                attempts.append(self._attempt(row, row.status, row.last_error, entry.progress))
                summary.count(row.status)
        self._save_attempts(attempts)
        return held

    def _ending_fields(self, entry: Entry, now: datetime) -> dict[str, Any]:
        """What :meth:`_end` writes for this ending, times as of ``now`` (so that posts match)."""
        ending = entry.ending
        counts = progress.count_fields(entry.progress.counts if entry.progress else {})
        fields = {**ending.fields, **entry.unsaved}
        if "finished_at" in fields:
            fields["finished_at"] = now
        return {
            "status": ending.status,
            "last_error": storable_text(ending.error, 10_000),
            "updated_at": now,
            "problem": ending.problem,
            "rate": None,
            "finish_estimate": None,
            **counts,
            **fields,
        }

    def _backoff(self, row: OutgoingMessage) -> datetime:
        """Exponential, from ``DELIVERY_RETRY_DELAY`` up to ``DELIVERY_RETRY_MAX_DELAY``, with jitter."""
        first = self.config["DELIVERY_RETRY_DELAY"]
        delay = min(first * 2 ** max(row.attempts - 1, 0), self.config["DELIVERY_RETRY_MAX_DELAY"])
        delay = max(delay, timedelta(seconds=1))
        return timezone.now() + delay * random.uniform(1.0, 1.2)

    def _discard(self, lease: Lease, summary: RunSummary, reason: str) -> None:
        logger.error("Discarding %s: %s", _label(lease.row), reason)
        ending = Ending(Status.DISCARDED, reason, {"finished_at": timezone.now()}, give_up=True)
        self._end_alone(lease, summary, ending)

    def _end_alone(self, lease: Lease, summary: RunSummary, ending: Ending, **fields: Any) -> None:
        """Apply an ending in a transaction of its own."""
        with transaction.atomic():
            kept = self._end(lease, summary, ending, **fields)
        if not kept:
            raise LeaseLost(lease.row.pk)

    def _log_delivery(
        self,
        row: OutgoingMessage,
        post: Post,
        headers: dict[str, Any],
        tally: Counter[str],
        refusals: Sequence[tuple[str, int | None, str]],
        post_failure: tuple[str, str] | None,
        seconds: float,
    ) -> None:
        """Mailman's four smtp.log lines: every, success or refused, and one per failure."""
        if not smtp_log.isEnabledFor(logging.INFO):
            return
        msgid = post.message_id or "n/a"
        attempted = sum(
            tally[s] for s in (RStatus.SENT, RStatus.DEFERRED, RStatus.BOUNCED, RStatus.FAILED)
        )
        smtp_log.info(
            "%s smtp to %s for %d recips, completed in %.4f seconds",
            msgid,
            post.list_address,
            attempted,
            seconds,
        )
        sender = _address_of(str(headers.get("from", ""))) or post.sender
        size = len(post.message)
        if post_failure:
            return  # logged once at error level by _finish, not once per recipient
        if refusals:
            smtp_log.info(
                "%s post to %s from %s, %d bytes, %d failures",
                msgid,
                post.list_address,
                sender,
                size,
                len(refusals),
            )
            for address, code, text in refusals:
                smtp_log.info(
                    "%s delivery to %s failed with code %s, %s", msgid, address, code, text
                )
        else:
            smtp_log.info("%s post to %s from %s, %d bytes", msgid, post.list_address, sender, size)


ENDING_SIGNALS = {
    Status.DELIVERED: signals.post_delivered,
    Status.FAILED: signals.post_failed,
    Status.DISCARDED: signals.post_discarded,
    Status.HELD: signals.post_held,
}


def _announce(row: OutgoingMessage, ending: Ending) -> None:
    """Tell the host site, once the ending is committed (a retry is not news)."""
    signal = ENDING_SIGNALS.get(ending.status)
    if signal is None:
        return
    arguments: dict[str, Any] = {"post": row, "mailing_list": row.mailing_list}
    if ending.status != Status.DELIVERED:
        arguments["reason"] = row.last_error
    if ending.status == Status.HELD:
        arguments["needs_admin"] = ending.fields.get("next_attempt_at", False) is None
    signals.send_on_commit(signal, OutgoingMessage, **arguments)


def _record_sent(ids: list[int]) -> int:
    """What the server accepted is a fact, whoever holds the post now: never fenced."""
    now = timezone.now()
    return sum(statements.mark_sent(chunk, now) for chunk in _chunks(ids))


_STOPPED = {
    Status.PAUSED: "paused by an administrator",
    Status.DISCARDED: "cancelled by an administrator",
    "lost": "the lease ran out and another runner took the post over",
}


def _last_reply(refusals: list[tuple[str, int | None, str]]) -> str:
    return next(
        (
            f"{code} {text}" if code else text
            for _, code, text in reversed(refusals)
            if text or code
        ),
        "",
    )


@lru_cache(maxsize=1)
def _unsubscribe_path() -> str:
    try:
        return reverse("listdelivery:unsubscribe", args=["TOKEN"]).replace("TOKEN", "{token}")
    except NoReverseMatch:
        return "/unsubscribe/{token}/"


def _header_values(raw: bytes) -> dict[str, Any]:
    """The first value of each header field, by lowercased name, as the email package reads it."""
    values = plain_fields(raw)
    if values is None:  # not plain: the parser says (a value may be a Header)
        parsed = BytesHeaderParser().parsebytes(raw)
        values = {name.lower(): parsed.get(name) for name in reversed(parsed.keys())}
    return values


@lru_cache(maxsize=256)  # a list's posts come from few people
def _address_of(field: str) -> str:
    """The first address of a From field ("" when there is none)."""
    found = getaddresses([field])
    return found[0][1] if found else ""


def _label(row: OutgoingMessage) -> str:
    return f"post {row.pk} ({row.message_id or 'no Message-ID'})"


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]
