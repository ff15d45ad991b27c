"""The handlers of Mailman's posting pipeline that delivery depends on, under their names.

``member_recipients`` fills in who gets a post, ``to_outgoing`` queues it, and
``after_delivery`` moves the list's post counter on. ``msg`` is an
``email.message.Message`` and ``msgdata`` a dict, as in Mailman.

A list's members are never all in memory at once: ``member_recipients`` puts a
:class:`MemberRecipients` in ``msgdata``, a read-only set that reads the members
from the database when asked, and ``to_outgoing`` queues them a page at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Set
from datetime import datetime
from email.header import Header, decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import Compat32
from itertools import islice
from typing import Any

from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, QuerySet
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import conf, progress, shards, tasks
from .addresses import address_problem, unique_addresses, unique_members
from .models import DeliveryStatus, MailingList, Member, OutgoingMessage, OutgoingRecipient
from .wire import decode_unknown

logger = logging.getLogger(__name__)

INSERT_BATCH = 1000
MEMBER_PAGE = 2000  # member addresses read at once
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


class MemberRecipients(Set):
    """The addresses of a list's members whose delivery is enabled, as a read-only set
    that asks the database instead of holding them.

    Iterating reads them a page at a time in address order; ``len()`` counts, ``in``
    looks one up (exactly, as a set of the addresses would); it equals a plain set of
    the same addresses. Operators that make a new set (``|``, ``-``, ``&``) make a plain
    one. Each use reads the members as they are then.
    """

    def __init__(self, mlist: MailingList) -> None:
        self.mailing_list = mlist

    def members(self) -> QuerySet[Member]:
        return Member.objects.filter(
            mailing_list=self.mailing_list, delivery_status=DeliveryStatus.ENABLED
        )

    def __iter__(self) -> Iterator[str]:
        # By keyset on the (list, address) index: each page is one short query, on any database.
        members = self.members().order_by("address").values_list("address", flat=True)
        page = list(members[:MEMBER_PAGE])
        while page:
            yield from page
            if len(page) < MEMBER_PAGE:
                return
            page = list(members.filter(address__gt=page[-1])[:MEMBER_PAGE])

    def __len__(self) -> int:
        return self.members().count()

    def __bool__(self) -> bool:
        return self.members().exists()

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self.members().filter(address=address).exists()

    @classmethod
    def _from_iterable(cls, iterable: Iterable[Any]) -> set[Any]:
        return set(iterable)

    def spelled_otherwise(self, address: str) -> bool:
        """Whether another of these members' addresses, lowered, is ``address`` folded."""
        lowered = self.members().annotate(lowered=Lower("address"))
        return lowered.filter(lowered=address.casefold()).exclude(address=address).exists()

    def __repr__(self) -> str:
        return f"<MemberRecipients: the enabled members of {self.mailing_list.address}>"


def member_recipients(mlist: MailingList, msg: Message, msgdata: dict[str, Any]) -> None:
    """Set ``msgdata['recipients']`` to the members whose delivery is enabled
    (a :class:`MemberRecipients`: a set that reads them when asked).

    As in Mailman, recipients already in ``msgdata`` (even an empty set) are left alone.
    """
    if "recipients" in msgdata:
        return
    msgdata["recipients"] = MemberRecipients(mlist)


def to_outgoing(
    mlist: MailingList, msg: Message | bytes | str, msgdata: dict[str, Any], **extra: Any
) -> OutgoingMessage:
    """Queue ``msg`` for delivery to ``msgdata['recipients']`` and return its row.

    ``extra`` keys (``verp=True``, ``sender=...``, ``tolist=True`` …) are merged
    over ``msgdata`` into the row's metadata; neither argument is changed. Keys
    starting with ``_`` are dropped, as Mailman's switchboard drops them.
    Recipients that cannot be addresses (a line break, no domain) are recorded
    as failed with the reason; the rest are queued, each once whatever its case.
    A list's members (:class:`MemberRecipients`) are read and queued a page at a time.
    """
    metadata = {k: v for k, v in {**msgdata, **extra}.items() if not str(k).startswith("_")}
    recipients = metadata.pop("recipients", None) or ()
    metadata["listid"] = mlist.list_id
    metadata = _json_safe(metadata)
    raw = serialize(msg)
    headers = _header_fields(raw)
    due = _deliver_after(metadata) or timezone.now()
    with transaction.atomic():
        row = OutgoingMessage.objects.create(
            mailing_list=mlist,
            list_id=mlist.list_id,
            message=raw,
            message_id=headers["message-id"][:998],
            subject=headers["subject"][:998],
            metadata=metadata,
            next_attempt_at=due,
        )
        if isinstance(recipients, MemberRecipients):
            addresses = unique_members(recipients, recipients.spelled_otherwise)
        else:
            addresses = unique_addresses(recipients)
        total, invalid = _insert_recipients(row, addresses)
        if total:
            OutgoingMessage.objects.filter(pk=row.pk).update(
                recipient_count=total, failed_count=invalid
            )
            row.recipient_count, row.failed_count = total, invalid
            progress.add_to_hour(row.list_id, failed=invalid)
            shards.split(row, conf.get_config())
        # A broker that is down must not fail the post: the sweep delivers it.
        transaction.on_commit(_enqueue_after_commit(row.pk, row.shard_count), robust=True)
    logger.debug("Queued %s for %s", row.message_id or "n/a", mlist.address)
    return row


def _enqueue_after_commit(pk: int, shard_count: int = 0) -> Callable[[], None]:
    """A named callback: Django's robust ``on_commit`` logs a failure by the callback's name."""

    def enqueue_delivery() -> None:
        tasks.enqueue_delivery(pk, runners=shard_count or 1)

    return enqueue_delivery


def after_delivery(mlist: MailingList, msg: Message, msgdata: dict[str, Any]) -> None:
    """Count the post: ``post_id += 1`` and ``last_post_at = now``, in one atomic UPDATE."""
    MailingList.objects.filter(pk=mlist.pk).update(
        post_id=F("post_id") + 1, last_post_at=timezone.now()
    )
    mlist.refresh_from_db(fields=["post_id", "last_post_at"])


def serialize(msg: Message | bytes | str) -> bytes:
    """The post's bytes, exactly as they will go on the wire.

    A ``Message`` whose header values cannot be written as they are (a line
    break inside a value, text the policy cannot encode) is written with
    compat32, each such value on one line: never an exception, never an
    injected header.
    """
    if isinstance(msg, bytes):
        return msg
    if isinstance(msg, str):
        return msg.encode("utf-8", "surrogateescape")
    try:
        return msg.as_bytes()
    except Exception:  # the email package raises many kinds here
        logger.debug("Writing the post with one-line header values", exc_info=True)
    try:
        return msg.as_bytes(policy=_ONE_LINE_VALUES)
    except (UnicodeError, LookupError):
        return msg.as_string(policy=_ONE_LINE_VALUES).encode("utf-8", "surrogateescape")


class _OneLineValues(Compat32):
    """compat32, with a line break inside a header value written as a space."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if isinstance(value, str):
            value = " ".join(value.split())
        return super()._fold(name, value, sanitize)


_ONE_LINE_VALUES = _OneLineValues()


def header_text(value: Any) -> str:
    """A header field's value as a person reads it, on one line: encoded words decoded
    where they can be and left as written where they cannot, raw 8-bit octets read as
    UTF-8 or Windows-1252; never an exception."""
    try:
        if isinstance(value, Header):  # how compat32 hands out a field with raw 8-bit octets
            text = "".join(_chunk_text(data, charset) for data, charset in decode_header(value))
        else:
            text = str(value)
            if any("\udc80" <= char <= "\udcff" for char in text):
                text = decode_unknown(text.encode("utf-8", "surrogateescape"))
            try:
                text = _decoded(text)
            except Exception:  # HeaderParseError, binascii.Error, LookupError …
                text = _ENCODED_WORD.sub(lambda word: _decoded_or_literal(word[0]), text)
    except Exception:  # the email package has many ways to fail; the field is still shown
        text = str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogate for the database
    return _CONTROLS.sub("", " ".join(text.split()))


def _chunk_text(data: bytes | str, charset: str | None) -> str:
    if isinstance(data, str):
        return data
    if charset in (None, "unknown-8bit"):
        return decode_unknown(data)
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return decode_unknown(data)


def _decoded(text: str) -> str:
    return str(make_header(decode_header(text)))


def _decoded_or_literal(word: str) -> str:
    try:
        return _decoded(word)
    except Exception:  # any failure leaves the word as written
        return word


#: Every column of a recipient row but its id, as :func:`_insert_recipients` writes them.
RECIPIENT_COLUMNS = ("message_id", "address", "status", "smtp_code", "smtp_message", "finished_at")


def _insert_recipients(row: OutgoingMessage, addresses: Iterable[Any]) -> tuple[int, int]:
    """A recipient row of ``row`` per address, ``INSERT_BATCH`` at a time, never all at once;
    how many rows, and how many of them failed as invalid.

    Plain INSERTs: ``bulk_create`` builds and compiles a model per row; a million members'
    enqueue took 100 s with it and 20 s with these, SQLite's write lock held meanwhile.
    """
    connection = connections[router.db_for_write(OutgoingRecipient)]
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(OutgoingRecipient._meta.db_table),
        ", ".join(map(quote, RECIPIENT_COLUMNS)),
        ", ".join(["%s"] * len(RECIPIENT_COLUMNS)),
    )
    failed = OutgoingRecipient.Status.FAILED
    values = _recipient_values(row, addresses, connection)
    total = invalid = 0
    with connection.cursor() as cursor:
        while chunk := list(islice(values, INSERT_BATCH)):
            cursor.executemany(sql, chunk)
            total += len(chunk)
            invalid += sum(1 for value in chunk if value[2] == failed)
    return total, invalid


def _recipient_values(
    row: OutgoingMessage, addresses: Iterable[Any], connection: BaseDatabaseWrapper
) -> Iterator[tuple[Any, ...]]:
    """The values of :data:`RECIPIENT_COLUMNS` for each address: pending, or failed and why."""
    pending, failed = OutgoingRecipient.Status.PENDING, OutgoingRecipient.Status.FAILED
    for address in addresses:
        problem = address_problem(address)
        if not problem:
            yield (row.pk, address, pending, None, "", None)
            continue
        logger.warning(
            "Not delivering %s to %r: the address %s", row.message_id or "n/a", address, problem
        )
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        yield (row.pk, str(address)[:254], failed, None, f"invalid address: it {problem}", now)


def _header_fields(raw: bytes) -> dict[str, str]:
    parsed = BytesHeaderParser().parsebytes(raw)
    return {name: header_text(parsed.get(name, "")) for name in ("message-id", "subject")}


def _deliver_after(metadata: dict[str, Any]) -> datetime | None:
    value = metadata.get("deliver_after")
    if isinstance(value, str):
        value = parse_datetime(value)
    if isinstance(value, datetime):
        return value if timezone.is_aware(value) else timezone.make_aware(value)
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
