"""The outgoing runner: claims due posts, has them delivered, and keeps the books.

The runner decides: which rows are due, whether a post is VERP'd, which
delivery module sends it, what an SMTP reply means (sent, retry later,
bounce, held), and when to give up. The delivery modules send; the SMTP
layer talks. Nothing below this module touches the database.

Crash safety rests on two things. A row is claimed with a lease (a
conditional UPDATE; ``SELECT … FOR UPDATE SKIP LOCKED`` first where the
database has it), so no two runners hold a row at once, and an expired lease
makes the row claimable again. Recipients are written back after every batch
of ``CHECKPOINT_EVERY`` transactions, so a runner killed at any instant
repeats at most the batch it had in flight.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from functools import lru_cache
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, F, Q
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.module_loading import import_string

from . import conf
from .addresses import address_problem
from .bounces import score_bounces
from .decorate import Decoration, list_headers
from .delivery import BaseDelivery, Post, Recipient
from .models import (
    BounceEvent,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from .smtp import Outcome, SMTPPool

logger = logging.getLogger(__name__)
smtp_log = logging.getLogger("listdelivery.smtp")

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status
ID_CHUNK = 5000
PREFETCH_LIMIT = 1000  # recipients read at once for all the posts of one claim


@dataclass
class RunSummary:
    posts: int = 0
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
        return (
            f"{self.posts} posts ({self.delivered} delivered, {self.retrying} to retry, "
            f"{self.held} held, {self.failed} failed, {self.discarded} discarded); "
            f"{self.recipients} recipients accepted, {self.deferred} deferred, "
            f"{self.bounced} bounced; {self.transactions} SMTP transactions in {self.seconds:.2f} s"
        )


def decide_verp(mlist: MailingList, metadata: dict[str, Any], config: dict[str, Any]) -> bool:
    """Mailman's rule (``runners/outgoing.py``), in its order.

    Metadata ``verp`` wins; a personalized list is VERP'd only with
    ``VERP_PERSONALIZED_DELIVERIES``; otherwise ``VERP_DELIVERY_INTERVAL`` 0
    never, 1 always, N when the list's current ``post_id`` is a multiple of N.
    """
    if "verp" in metadata:
        return bool(metadata["verp"])
    if mlist.personalize != Personalization.NONE:
        return bool(config["VERP_PERSONALIZED_DELIVERIES"])
    interval = config["VERP_DELIVERY_INTERVAL"]
    if interval <= 0:
        return False
    return interval == 1 or mlist.post_id % interval == 0


def is_permanent(code: int) -> bool:
    """5xx is permanent, except 552, which RFC 5321 lets mean "too many recipients"."""
    return code >= 500 and code != 552


@dataclass
class Verdicts:
    """What one batch of outcomes means, grouped for a fixed number of UPDATEs."""

    groups: dict[tuple[str, int | None, str], list[str]] = field(
        default_factory=lambda: defaultdict(list)
    )
    post_failure: tuple[str, str] | None = None  # (status for the post, reason)
    transactions: int = 0

    def add(
        self, status: str, addresses: Iterable[str], code: int | None = None, text: str = ""
    ) -> None:
        self.groups[(status, code, text)].extend(addresses)


def judge(outcomes: Iterable[Outcome]) -> Verdicts:
    """Sort SMTP outcomes into sent, deferred, bounced and failed recipients, and post-level trouble.

    Unlike Mailman, a failure that is not about a recipient (bad credentials,
    TLS, a 5xx to MAIL FROM, a 5xx at DATA for several recipients) never
    becomes a bounce: the recipients stay queued and the post is held.
    """
    verdicts = Verdicts()
    for outcome in outcomes:
        verdicts.transactions += 1
        recipients = outcome.transaction.recipients
        failure = outcome.failure
        if failure is None:
            verdicts.add(RStatus.SENT, outcome.accepted)
            for address, (code, text) in outcome.refused.items():
                status = RStatus.BOUNCED if is_permanent(code) else RStatus.DEFERRED
                verdicts.add(status, [address], code, text)
            continue
        if failure.stage == "smtputf8":
            verdicts.add(RStatus.FAILED, recipients, failure.code, failure.text)
        elif failure.stage == "data" and len(recipients) == 1 and is_permanent(failure.code):
            verdicts.add(RStatus.BOUNCED, recipients, failure.code, failure.text)
        else:
            verdicts.add(RStatus.DEFERRED, recipients, failure.code, failure.text)
            reason = f"SMTP {failure.stage} failed: {failure.code} {failure.text}"
            if is_permanent(failure.code) or failure.stage == "tls":
                verdicts.post_failure = (Status.HELD, reason)
            elif failure.concerns_session and verdicts.post_failure is None:
                verdicts.post_failure = (Status.RETRY, reason)
    return verdicts


@dataclass
class Ending:
    """How a post leaves this run: its status, why, and when it is due again."""

    status: str
    error: str = ""
    retry_at: datetime | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    give_up: bool = False  # its open recipients become failed


@dataclass
class Prefetched:
    """A post's open recipients read with those of the rest of its claim."""

    recipients: dict[str, int]
    complete: bool


class LeaseLost(Exception):
    """Another runner took the row over after our lease expired: stop touching it."""


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

    def run(self) -> RunSummary:
        self.config = config = conf.get_config()
        summary = RunSummary()
        began = time.monotonic()
        started = timezone.now()
        with SMTPPool(config) as pool:
            modules = {
                name: import_string(config[name])(pool, config)
                for name in ("BULK_DELIVERY", "INDIVIDUAL_DELIVERY")
            }
            while self.limit is None or summary.posts < self.limit:
                wanted = config["CLAIM_BATCH"]
                if self.limit is not None:
                    wanted = min(wanted, self.limit - summary.posts)
                token, rows = self.claim(started, wanted)
                if not rows:
                    break
                known = self._prefetch_recipients(rows)
                for row in rows:
                    summary.posts += 1
                    self._process_safely(row, token, modules, summary, known.get(row.pk))
                    if self.on_post:
                        self.on_post(row, summary)
        if summary.bounced:
            score_bounces()
        summary.seconds = time.monotonic() - began
        return summary

    # -- claiming -----------------------------------------------------------

    def claim(self, started: datetime, count: int) -> tuple[str, list[OutgoingMessage]]:
        """Lease up to ``count`` due rows to this runner; nobody else can hold them meanwhile."""
        now = timezone.now()
        token = uuid.uuid4().hex
        due = Q(status__in=OutgoingMessage.WAITING, next_attempt_at__lte=started) & (
            Q(leased_until__isnull=True) | Q(leased_until__lt=now)
        )
        candidates = OutgoingMessage.objects.filter(due)
        if self.list_address:
            candidates = candidates.filter(mailing_list__address__iexact=self.list_address)
        with transaction.atomic():
            candidates = candidates.order_by("next_attempt_at", "id")
            if connection.features.has_select_for_update_skip_locked:
                candidates = candidates.select_for_update(skip_locked=True, of=("self",))
            ids = list(candidates.values_list("id", flat=True)[:count])
            if not ids:
                return token, []
            OutgoingMessage.objects.filter(due, id__in=ids).update(
                lease_token=token,
                leased_until=now + self.config["LEASE_DURATION"],
                attempts=F("attempts") + 1,
            )
        rows = (
            OutgoingMessage.objects.filter(lease_token=token, id__in=ids)
            .select_related("mailing_list")
            .order_by("next_attempt_at", "id")
        )
        return token, list(rows)

    # -- one post -----------------------------------------------------------

    def _process_safely(
        self,
        row: OutgoingMessage,
        token: str,
        modules: dict[str, BaseDelivery],
        summary: RunSummary,
        known: Prefetched | None = None,
    ) -> None:
        try:
            self._keep_lease(row, token)
            self._process(row, token, modules, summary, known)
        except LeaseLost:
            logger.warning(
                "Stopped delivering %s: it was discarded, or its lease expired and another "
                "runner took it over",
                _label(row),
            )
        except Exception as error:
            logger.exception(
                "Unexpected error while delivering %s; it will be retried", _label(row)
            )
            self._finish(
                row,
                token,
                Status.RETRY,
                summary,
                error=f"unexpected error: {type(error).__name__}: {error}",
                retry_at=self._backoff(row),
            )

    def _keep_lease(self, row: OutgoingMessage, token: str) -> None:
        """Renew a claimed post's lease if it waited long behind the others of its claim.

        A lease that ran out before the post was even started may already be
        another runner's: sending then would duplicate, so check first.
        """
        now = timezone.now()
        lease = self.config["LEASE_DURATION"]
        if row.leased_until and row.leased_until - now > lease / 2:
            return
        if not self._fenced(row, token).update(leased_until=now + lease):
            raise LeaseLost(row.pk)
        row.leased_until = now + lease

    def _process(
        self,
        row: OutgoingMessage,
        token: str,
        modules: dict[str, BaseDelivery],
        summary: RunSummary,
        known: Prefetched | None,
    ) -> None:
        mlist = row.mailing_list
        if mlist is None:
            self._discard(row, token, summary, f"the mailing list {row.list_id} was deleted")
            return
        raw = row.raw
        headers = BytesHeaderParser().parsebytes(raw)
        if not headers.keys():
            self._discard(row, token, summary, "the message has no header fields: it is not a post")
            return
        metadata = dict(row.metadata) if isinstance(row.metadata, dict) else {}
        unsaved: dict[str, Any] = {}  # row fields written with the first checkpoint
        if "verp" not in metadata:
            metadata["verp"] = decide_verp(mlist, metadata, self.config)
            unsaved["metadata"] = metadata
        sender = metadata.get("sender") or mlist.bounces_address
        problem = address_problem(sender)
        if problem:
            self._discard(row, token, summary, f"the envelope sender {sender!r} {problem}")
            return
        post = Post(
            message=raw,
            sender=sender,
            message_id=str(headers.get("message-id", "")).strip(),
            verp=metadata["verp"],
            personalize=mlist.personalize,
            list_address=mlist.address,
            metadata=metadata,
            decoration=self._decoration(mlist, metadata),
        )
        individual = post.verp or mlist.personalize != Personalization.NONE
        module = modules["INDIVIDUAL_DELIVERY" if individual else "BULK_DELIVERY"]
        began = time.monotonic()
        tally: Counter[str] = Counter()
        refusals: list[tuple[str, int | None, str]] = []
        post_failure = None
        ended = False
        for batch, last in self._open_recipients(row, module.batch_size, known):
            recipients = self._addressees(mlist, batch, individual)
            verdicts = judge(module.deliver(post, recipients))
            tally["transactions"] += verdicts.transactions
            for (status, code, text), addresses in verdicts.groups.items():
                tally[status] += len(addresses)
                if status != RStatus.SENT:
                    refusals.extend((address, code, text) for address in addresses)
            post_failure = verdicts.post_failure
            # After the last batch the tally often proves the outcome: end in the same write.
            ending = (
                self._ending_from_tally(row, tally, refusals) if last and not post_failure else None
            )
            self._checkpoint(row, token, mlist, post, batch, verdicts, unsaved, ending, summary)
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
            self._conclude(row, token, summary, post_failure, _last_reply(refusals), unsaved)

    def _prefetch_recipients(self, rows: list[OutgoingMessage]) -> dict[int, Prefetched]:
        """The open recipients of all the claimed posts, in one query of at most
        ``PREFETCH_LIMIT`` rows.

        Small posts are the common case, and one query for the whole claim beats
        one per post. A post the query cut short gets what was read, marked
        incomplete, and pages the rest itself; posts after it page everything.
        """
        found = list(
            OutgoingRecipient.objects.filter(message__in=rows, status__in=OutgoingRecipient.OPEN)
            .order_by("message_id", "id")
            .values_list("message_id", "id", "address")[: PREFETCH_LIMIT + 1]
        )
        cut = found[PREFETCH_LIMIT][0] if len(found) > PREFETCH_LIMIT else None
        known = {
            row.pk: Prefetched({}, complete=row.pk != cut)
            for row in rows
            if cut is None or row.pk <= cut
        }
        for message_id, pk, address in found[:PREFETCH_LIMIT]:
            known[message_id].recipients[address] = pk
        return known

    def _open_recipients(
        self, row: OutgoingMessage, batch_size: int | None, known: Prefetched | None = None
    ) -> Iterator[tuple[dict[str, int], bool]]:
        """``(batch, is the last)`` of recipients still to send, by keyset: each visited once per run."""
        cursor = 0
        # Without a batch size everyone goes in one transaction: only a complete read will do.
        if known is not None and (batch_size or known.complete):
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
            page = (
                OutgoingRecipient.objects.filter(
                    message=row, status__in=OutgoingRecipient.OPEN, id__gt=cursor
                )
                .order_by("id")
                .values_list("id", "address")
            )
            if batch_size:
                page = page[:batch_size]
            batch = {address: pk for pk, address in page}
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
        """The batch's recipients, with member names and ids for personal copies (one query)."""
        if not individual:
            return [Recipient(address) for address in batch]
        members = {
            address: (name, pk)
            for address, name, pk in Member.objects.filter(
                mailing_list=mlist, address__in=list(batch)
            ).values_list("address", "display_name", "pk")
        }
        return [Recipient(address, *members.get(address, ("", None))) for address in batch]

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

    def _fenced(self, row: OutgoingMessage, token: str):
        return OutgoingMessage.objects.filter(pk=row.pk, lease_token=token)

    def _checkpoint(
        self,
        row: OutgoingMessage,
        token: str,
        mlist: MailingList,
        post: Post,
        batch: dict[str, int],
        verdicts: Verdicts,
        unsaved: dict[str, Any],
        ending: Ending | None,
        summary: RunSummary,
    ) -> None:
        """Write one batch's results, and renew the lease or end the post, in one transaction."""
        now = timezone.now()
        bounces = [
            BounceEvent(
                mailing_list=mlist,
                address=address,
                smtp_code=code,
                smtp_message=text,
                message_id=post.message_id,
                context=BounceEvent.Context.NORMAL,
                created_at=now,
            )
            for (status, code, text), addresses in verdicts.groups.items()
            if status == RStatus.BOUNCED
            for address in addresses
        ]
        with transaction.atomic():
            for (status, code, text), addresses in verdicts.groups.items():
                finished = None if status == RStatus.DEFERRED else now
                for ids in _chunks([batch[a] for a in addresses if a in batch]):
                    # What the server accepted is a fact, even for a post discarded meanwhile.
                    current = (
                        ~Q(status=RStatus.SENT)
                        if status == RStatus.SENT
                        else Q(status__in=OutgoingRecipient.OPEN)
                    )
                    OutgoingRecipient.objects.filter(current, id__in=ids).update(
                        status=status, smtp_code=code, smtp_message=text, finished_at=finished
                    )
            if bounces:
                BounceEvent.objects.bulk_create(bounces)
            if ending:
                kept = self._end(row, token, summary, ending, **unsaved)
            else:
                lease = now + self.config["LEASE_DURATION"]
                kept = self._fenced(row, token).update(leased_until=lease, **unsaved)
        if not kept:
            raise LeaseLost(row.pk)

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
        row: OutgoingMessage,
        token: str,
        summary: RunSummary,
        post_failure: tuple[str, str] | None,
        last_reply: str = "",
        unsaved: dict[str, Any] | None = None,
    ) -> None:
        counts = dict(
            OutgoingRecipient.objects.filter(message=row)
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        if not counts:
            self._discard(row, token, summary, "no recipients: nothing to deliver")
            return
        still_open = counts.get(RStatus.PENDING, 0) + counts.get(RStatus.DEFERRED, 0)
        ending = self._ending(
            row, still_open, bool(counts.get(RStatus.SENT)), post_failure, last_reply
        )
        self._end_alone(row, token, summary, ending, **(unsaved or {}))

    def _ending(
        self,
        row: OutgoingMessage,
        still_open: int,
        any_sent: bool,
        post_failure: tuple[str, str] | None,
        last_reply: str,
    ) -> Ending:
        """Delivered, failed, or retried later under Mailman's progress rule."""
        if not still_open:
            if any_sent:
                return Ending(Status.DELIVERED)
            return Ending(Status.FAILED, "no recipient accepted the post")
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
            return Ending(Status.FAILED, reason, give_up=True)
        status, reason = post_failure or (
            Status.RETRY,
            f"{still_open} recipients to retry; last reply: {last_reply or 'none'}",
        )
        if post_failure:
            verb = "Holding" if status == Status.HELD else "Will retry"
            logger.error("%s %s: %s", verb, _label(row), reason)
        return Ending(
            status,
            reason,
            retry_at=self._backoff(row),
            fields={"deliver_until": deadline, "last_failure_count": still_open},
        )

    def _end(
        self, row: OutgoingMessage, token: str, summary: RunSummary, ending: Ending, **fields: Any
    ) -> bool:
        """Apply an ending inside the caller's transaction; ``False`` if the lease was lost."""
        if ending.give_up:
            OutgoingRecipient.objects.filter(message=row, status__in=OutgoingRecipient.OPEN).update(
                status=RStatus.FAILED, smtp_message=ending.error[:1000], finished_at=timezone.now()
            )
        return self._finish(
            row,
            token,
            ending.status,
            summary,
            error=ending.error,
            retry_at=ending.retry_at,
            **ending.fields,
            **fields,
        )

    def _backoff(self, row: OutgoingMessage) -> datetime:
        """Exponential, from ``DELIVERY_RETRY_DELAY`` up to ``DELIVERY_RETRY_MAX_DELAY``, with jitter."""
        first = self.config["DELIVERY_RETRY_DELAY"]
        delay = min(first * 2 ** max(row.attempts - 1, 0), self.config["DELIVERY_RETRY_MAX_DELAY"])
        delay = max(delay, timedelta(seconds=1))
        return timezone.now() + delay * random.uniform(1.0, 1.2)

    def _discard(self, row: OutgoingMessage, token: str, summary: RunSummary, reason: str) -> None:
        logger.error("Discarding %s: %s", _label(row), reason)
        self._end_alone(row, token, summary, Ending(Status.DISCARDED, reason, give_up=True))

    def _end_alone(
        self, row: OutgoingMessage, token: str, summary: RunSummary, ending: Ending, **fields: Any
    ) -> None:
        """Apply an ending in a transaction of its own."""
        with transaction.atomic():
            kept = self._end(row, token, summary, ending, **fields)
        if not kept:
            raise LeaseLost(row.pk)

    def _finish(
        self,
        row: OutgoingMessage,
        token: str,
        status: str,
        summary: RunSummary,
        *,
        error: str = "",
        retry_at: datetime | None = None,
        **fields: Any,
    ) -> bool:
        """Record the row's new status and let go of the lease; ``False`` if it was not ours."""
        now = timezone.now()
        if retry_at is not None:
            fields["next_attempt_at"] = retry_at
        else:
            fields["finished_at"] = now
        updated = self._fenced(row, token).update(
            status=status,
            last_error=error,
            lease_token="",
            leased_until=None,
            updated_at=now,
            **fields,
        )
        if not updated:
            return False
        row.status = status
        row.last_error = error
        counter = {
            Status.DELIVERED: "delivered",
            Status.RETRY: "retrying",
            Status.HELD: "held",
            Status.FAILED: "failed",
            Status.DISCARDED: "discarded",
        }[status]
        setattr(summary, counter, getattr(summary, counter) + 1)
        return True

    def _log_delivery(
        self,
        row: OutgoingMessage,
        post: Post,
        headers: Any,
        tally: Counter[str],
        refusals: Sequence[tuple[str, int | None, str]],
        post_failure: tuple[str, str] | None,
        seconds: float,
    ) -> None:
        """Mailman's four smtp.log lines: every, success or refused, and one per failure."""
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
        senders = getaddresses([str(headers.get("from", ""))])
        sender = senders[0][1] if senders and senders[0][1] else post.sender
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


def _last_reply(refusals: list[tuple[str, int | None, str]]) -> str:
    return next((f"{code} {text}" for _, code, text in reversed(refusals) if code), "")


@lru_cache(maxsize=1)
def _unsubscribe_path() -> str:
    try:
        return reverse("listdelivery:unsubscribe", args=["TOKEN"]).replace("TOKEN", "{token}")
    except NoReverseMatch:
        return "/unsubscribe/{token}/"


def _label(row: OutgoingMessage) -> str:
    return f"post {row.pk} ({row.message_id or 'no Message-ID'})"


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]
