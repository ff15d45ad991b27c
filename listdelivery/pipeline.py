"""The handlers of Mailman's posting pipeline that delivery depends on, under their names.

``member_recipients`` fills in who gets a post, ``to_outgoing`` queues it, and
``after_delivery`` moves the list's post counter on. ``msg`` is an
``email.message.Message`` and ``msgdata`` a dict, as in Mailman.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from email.header import Header, decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import Compat32
from itertools import islice
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import conf, progress, shards, tasks
from .addresses import address_problem, unique_addresses
from .models import DeliveryStatus, MailingList, Member, OutgoingMessage, OutgoingRecipient
from .wire import decode_unknown

logger = logging.getLogger(__name__)

INSERT_BATCH = 1000
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def member_recipients(mlist: MailingList, msg: Message, msgdata: dict[str, Any]) -> None:
    """Set ``msgdata['recipients']`` to the members whose delivery is enabled.

    As in Mailman, recipients already in ``msgdata`` (even an empty set) are left alone.
    """
    if "recipients" in msgdata:
        return
    msgdata["recipients"] = set(
        Member.objects.filter(mailing_list=mlist, delivery_status=DeliveryStatus.ENABLED)
        .values_list("address", flat=True)
        .iterator(chunk_size=5000)
    )


def to_outgoing(
    mlist: MailingList, msg: Message | bytes | str, msgdata: dict[str, Any], **extra: Any
) -> OutgoingMessage:
    """Queue ``msg`` for delivery to ``msgdata['recipients']`` and return its row.

    ``extra`` keys (``verp=True``, ``sender=...``, ``tolist=True`` …) are merged
    over ``msgdata`` into the row's metadata; neither argument is changed. Keys
    starting with ``_`` are dropped, as Mailman's switchboard drops them.
    Recipients that cannot be addresses (a line break, no domain) are recorded
    as failed with the reason; the rest are queued.
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
        # In slices: bulk_create would turn a generator into one list of every row.
        rows = _recipient_rows(row, unique_addresses(recipients))
        total = invalid = 0
        while chunk := list(islice(rows, INSERT_BATCH)):
            OutgoingRecipient.objects.bulk_create(chunk)
            total += len(chunk)
            invalid += sum(1 for r in chunk if r.status == OutgoingRecipient.Status.FAILED)
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


def _recipient_rows(row: OutgoingMessage, addresses: list[Any]) -> Iterable[OutgoingRecipient]:
    failed = OutgoingRecipient.Status.FAILED
    for address in addresses:
        problem = address_problem(address)
        if problem:
            logger.warning(
                "Not delivering %s to %r: the address %s", row.message_id or "n/a", address, problem
            )
            yield OutgoingRecipient(
                message=row,
                address=str(address)[:254],
                status=failed,
                smtp_message=f"invalid address: it {problem}",
                finished_at=timezone.now(),
            )
        else:
            yield OutgoingRecipient(message=row, address=address)


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
