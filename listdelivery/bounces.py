"""Inbound bounces: who bounced, a ``BounceEvent`` for it, and Mailman's bounce score.

The VERP'd envelope address says exactly which member bounced, so it is
tried first; otherwise flufl.bounce reads the DSN (RFC 3464 and the
non-standard formats of common MTAs) for permanently failed recipients.
Every ``BounceEvent`` — refused at delivery or reported later — then counts
once per member and day; a member whose score reaches
``BOUNCE_SCORE_THRESHOLD`` has delivery disabled by bounces. Scores older
than ``BOUNCE_INFO_STALE_AFTER`` start again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from email import message_from_string
from email.message import Message
from email.utils import getaddresses

from django.db import transaction
from django.db.models.functions import Lower
from django.utils import timezone

from . import conf, verp
from .models import BounceEvent, DeliveryStatus, MailingList, Member

logger = logging.getLogger(__name__)

#: Headers in which MTAs put the address a message was delivered to.
ENVELOPE_HEADERS = ("X-Original-To", "Delivered-To", "Envelope-To", "X-Envelope-To", "To")


class NotABounce(ValueError):
    """The message says nothing we can use: it is reported and skipped."""


@dataclass
class Bounce:
    mailing_list: MailingList
    addresses: list[str]
    found_by: str  # "verp" or "dsn"
    message_id: str = ""
    diagnostic: str = ""
    events: list[BounceEvent] = field(default_factory=list)
    not_members: list[str] = field(default_factory=list)


def find_bounce(
    msg: Message, envelope_to: str | None = None, list_address: str | None = None
) -> Bounce:
    """Which list and which members this bounce is about; :class:`NotABounce` if it cannot tell."""
    candidates = [envelope_to] if envelope_to else []
    for header in ENVELOPE_HEADERS:
        candidates += [address for _, address in getaddresses(msg.get_all(header, []))]
    config = conf.get_config()
    for candidate in filter(None, candidates):
        base, suffix = verp.split_suffix(candidate, config["VERP_DELIMITER"])
        mlist = _list_for_bounces_address(base)
        if mlist and suffix:
            member = verp.decode(
                candidate, config["VERP_FORMAT"], bounces=mlist.list_name + "-bounces"
            )
            if member:
                return Bounce(mlist, [member], "verp", _original_message_id(msg), _diagnostic(msg))
    mlist = _find_list(candidates, list_address)
    failed = _dsn_failures(msg)
    if not failed:
        raise NotABounce(
            "no permanently failed recipient found (not a bounce, or only a delay warning)"
        )
    return Bounce(mlist, sorted(failed), "dsn", _original_message_id(msg), _diagnostic(msg))


def record_bounce(bounce: Bounce) -> Bounce:
    """A ``BounceEvent`` (context "bounce") for every bouncing member, then score them."""
    members = _members_by_address(bounce.mailing_list, bounce.addresses)
    now = timezone.now()
    for address in bounce.addresses:
        member = members.get(address.casefold())
        if member is None:
            bounce.not_members.append(address)
            continue
        bounce.events.append(
            BounceEvent(
                mailing_list=bounce.mailing_list,
                address=member.address,
                smtp_message=bounce.diagnostic,
                message_id=bounce.message_id,
                context=BounceEvent.Context.BOUNCE,
                created_at=now,
            )
        )
    BounceEvent.objects.bulk_create(bounce.events)
    score_bounces()
    return bounce


def score_bounces() -> int:
    """Apply Mailman's bounce score to every event not yet counted; return how many were."""
    config = conf.get_config()
    threshold, stale_after = config["BOUNCE_SCORE_THRESHOLD"], config["BOUNCE_INFO_STALE_AFTER"]
    counted = 0
    pending = BounceEvent.objects.filter(processed=False).order_by("created_at", "id")
    for event in pending.iterator(chunk_size=500):
        with transaction.atomic():
            member = (
                Member.objects.select_for_update()
                .annotate(key=Lower("address"))
                .filter(mailing_list_id=event.mailing_list_id, key=event.address.lower())
                .first()
            )
            if member is not None:
                _count(member, event, threshold, stale_after)
            BounceEvent.objects.filter(pk=event.pk).update(processed=True)
        counted += 1
    return counted


def _count(member: Member, event: BounceEvent, threshold: int, stale_after) -> None:
    day = timezone.localdate(event.created_at)
    last = member.last_bounce_received
    if last == day:
        return  # one bounce a day counts, however many posts bounced that day
    if last is None or last + stale_after < day:
        member.bounce_score = 1
    else:
        member.bounce_score += 1
    member.last_bounce_received = day
    fields = ["bounce_score", "last_bounce_received"]
    if member.bounce_score >= threshold and member.delivery_status == DeliveryStatus.ENABLED:
        member.delivery_status = DeliveryStatus.BY_BOUNCES
        fields.append("delivery_status")
        logger.info(
            "Disabled delivery to %s on %s: bounce score %s reached %s",
            member.address,
            event.mailing_list_id,
            member.bounce_score,
            threshold,
        )
    member.save(update_fields=fields)


def _list_for_bounces_address(address: str) -> MailingList | None:
    local, _, domain = address.rpartition("@")
    if not local.lower().endswith("-bounces"):
        return None
    posting = f"{local[: -len('-bounces')]}@{domain}"
    return MailingList.objects.filter(address__iexact=posting).first()


def _find_list(candidates: list[str], list_address: str | None) -> MailingList:
    if list_address:
        mlist = MailingList.objects.filter(address__iexact=list_address).first()
        if mlist is None:
            raise NotABounce(f"there is no mailing list {list_address!r}")
        return mlist
    delimiter = conf.get("VERP_DELIMITER")
    for candidate in candidates:
        mlist = _list_for_bounces_address(verp.split_suffix(candidate, delimiter)[0])
        if mlist:
            return mlist
    raise NotABounce("it was not sent to a list's bounces address (give --list)")


def _dsn_failures(msg: Message) -> set[str]:
    from flufl.bounce import scan_message

    try:
        found = scan_message(msg)
    except Exception as error:  # flufl's heuristics can trip over broken MIME
        raise NotABounce(f"the bounce could not be read: {type(error).__name__}") from None
    addresses = set()
    for raw in found:
        address = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        address = address.strip().strip("<>")
        if "@" in address:
            addresses.add(address)
    return addresses


def _members_by_address(mlist: MailingList, addresses: list[str]) -> dict[str, Member]:
    keys = [a.lower() for a in addresses]
    found = Member.objects.annotate(key=Lower("address")).filter(mailing_list=mlist, key__in=keys)
    return {member.address.casefold(): member for member in found}


def _original_message_id(msg: Message) -> str:
    """The Message-ID of the post that bounced, from the returned headers or message."""
    for part in msg.walk():
        if part.get_content_type() in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message) and inner.get("Message-ID"):
                return str(inner["Message-ID"]).strip()
        if part.get_content_type() == "text/rfc822-headers":
            headers = message_from_string(part.get_payload(decode=True).decode("utf-8", "replace"))
            if headers.get("Message-ID"):
                return str(headers["Message-ID"]).strip()
    return ""


def _diagnostic(msg: Message) -> str:
    """The first Diagnostic-Code of a DSN, if any, for the administrator."""
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload() or []:
                if isinstance(block, Message) and block.get("Diagnostic-Code"):
                    return " ".join(str(block["Diagnostic-Code"]).split())[:1000]
    return ""
