"""Inbound bounces: who bounced, a ``BounceEvent`` for it, and Mailman's bounce score.

Only permanent failures count. A VERP'd envelope address says exactly which
member a message is about, so it is tried first: every VERP'd address among
the envelope headers counts, but only if the message is a bounce — a delivery
report (RFC 3464) must report a failed action, a delay warning or an
automatic reply (out of office, vacation) is skipped. Otherwise flufl.bounce
reads the report (RFC 3464 and the formats of common MTAs) for permanently
failed recipients. One bounce message counts once, however often it is read
(``BounceEvent.fingerprint``).

Every ``BounceEvent`` — refused at delivery or reported later — then counts
once per member and day; a member whose score reaches
``BOUNCE_SCORE_THRESHOLD`` has delivery disabled by bounces and the score
starts again at 0. Bounces for a member whose delivery is disabled do not
count. Scores older than ``BOUNCE_INFO_STALE_AFTER`` start again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from email import message_from_bytes, message_from_string
from email.message import Message
from email.utils import getaddresses

from django.db import transaction
from django.db.models.functions import Lower
from django.utils import timezone

from . import conf, signals, verp
from .models import BounceEvent, DeliveryStatus, MailingList, Member

logger = logging.getLogger(__name__)

#: Larger messages are skipped unread: bounces are small, and the rest is memory.
MAX_BOUNCE_BYTES = 10 * 1024 * 1024
#: Real bounces nest 3 to 6 MIME levels; the parser's cost grows with the depth.
MAX_MIME_DEPTH = 20
#: Headers in which MTAs put the address a message was delivered to (Mailman reads
#: To, Delivered-To, Envelope-To and Apparently-To).
ENVELOPE_HEADERS = (
    "X-Original-To",
    "Delivered-To",
    "Envelope-To",
    "X-Envelope-To",
    "Apparently-To",
    "To",
)
MESSAGE_ID_LENGTH = BounceEvent._meta.get_field("message_id").max_length
#: Subjects of out-of-office and vacation replies in the languages most seen.
AUTO_REPLY_SUBJECT = re.compile(
    r"out of (the )?office|vacation|holiday|\bauto(matic|mated)?[ -]?(reply|response|answer)"
    r"|autoreply|^auto:|away from (my|the) (desk|office|e-?mail)|abwesen|automatische antwort"
    r"|r[ée]ponse automatique|absence|respuesta autom[áa]tica|fuera de la oficina"
    r"|risposta automatica|fuori sede|automatisch antwoord|afwezig",
    re.IGNORECASE,
)
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
_DELIMITER_LINE = re.compile(rb"^--([^\r\n]+?)(--)?[ \t]*\r?$", re.MULTILINE)


class NotABounce(ValueError):
    """The message says nothing we can use: it is reported and skipped."""


@dataclass
class Bounce:
    mailing_list: MailingList
    addresses: list[str]
    found_by: str  # "verp" or "dsn"
    message_id: str = ""
    diagnostic: str = ""
    fingerprint: str = ""
    events: list[BounceEvent] = field(default_factory=list)
    not_members: list[str] = field(default_factory=list)
    already_recorded: list[str] = field(default_factory=list)


def read_bounces(
    raw: bytes, envelope_to: str | None = None, list_address: str | None = None
) -> list[Bounce]:
    """The bounces one inbound message reports, one per list; :class:`NotABounce` if none.

    Safe for any bytes: an oversize or absurdly nested message is refused
    before it is parsed.
    """
    if len(raw) > MAX_BOUNCE_BYTES:
        raise NotABounce(f"it is larger than {MAX_BOUNCE_BYTES // (1024 * 1024)} MB")
    depth = mime_depth(raw)
    if depth > MAX_MIME_DEPTH:
        raise NotABounce(f"its MIME parts nest {depth} deep (at most {MAX_MIME_DEPTH} are read)")
    try:
        msg = message_from_bytes(raw)
        bounces = find_bounces(msg, envelope_to, list_address)
    except RecursionError:  # message/rfc822 parts nested hundreds deep
        raise NotABounce("its MIME parts nest too deep to be read") from None
    fingerprint = bounce_fingerprint(msg, raw)
    for bounce in bounces:
        bounce.fingerprint = fingerprint
    return bounces


def find_bounces(
    msg: Message, envelope_to: str | None = None, list_address: str | None = None
) -> list[Bounce]:
    """Which lists and members this message reports as bouncing permanently."""
    candidates = envelope_addresses(msg, envelope_to)
    message_id, diagnostic = _original_message_id(msg), _diagnostic(msg)
    by_verp = _verp_members(candidates)
    if by_verp:
        reason = why_not_a_permanent_failure(msg)
        if reason:
            raise NotABounce(reason)
        return [
            Bounce(mlist, members, "verp", message_id, diagnostic)
            for mlist, members in by_verp.values()
        ]
    mlist = _find_list(candidates, list_address)
    temporary, permanent = _failures(msg)
    if not permanent:
        raise NotABounce(
            "only a delay warning, no permanent failure"
            if temporary
            else "no permanently failed recipient found (not a bounce, or only a delay warning)"
        )
    return [Bounce(mlist, sorted(permanent), "dsn", message_id, diagnostic)]


def why_not_a_permanent_failure(msg: Message) -> str | None:
    """Why a message sent to a VERP'd address is no bounce, or ``None`` if it is one.

    A delivery report counts only if it reports a failed action. Without one,
    a permanent failure found by flufl.bounce counts, a temporary one does
    not, nor does an automatic reply; a message of no known form counts, as
    in Mailman (a VERP'd address receives little else).
    """
    actions = report_actions(msg)
    if actions is not None:
        if any(action.startswith(("fail", "error")) for action in actions):
            return None
        shown = ", ".join(sorted(actions)) or "none"
        return f"a delivery report without a permanent failure (action: {shown})"
    temporary, permanent = _failures(msg)
    if permanent:
        return None
    if temporary:
        return "only a delay warning, no permanent failure"
    marker = auto_reply_marker(msg)
    if marker:
        return f"an automatic reply ({marker}), not a bounce"
    return None


def report_actions(msg: Message) -> set[str] | None:
    """The ``Action`` values of a delivery report (RFC 3464, 6533), or ``None`` if it has none."""
    actions: set[str] | None = None
    for part in msg.walk():
        content_type = part.get_content_type()
        if content_type == "message/delivery-status":
            actions = actions or set()
            for block in part.get_payload() if part.is_multipart() else []:
                for value in block.get_all("Action", []):
                    actions.update(str(value).lower().split()[:1])  # "failed (comment)"
        elif content_type == "message/global-delivery-status":
            actions = actions or set()
            text = part.get_payload(decode=True) or b""
            actions.update(
                value.decode("ascii", "replace").lower()
                for value in re.findall(rb"(?im)^action:[ \t]*([a-z]+)", text)
            )
    return actions


def auto_reply_marker(msg: Message) -> str:
    """What shows that ``msg`` is an automatic reply (RFC 3834 and common practice), or ``""``."""
    auto_submitted = _header(msg, "Auto-Submitted")
    if (auto_submitted.lower().split(";")[0].split() or ["no"])[0] != "no":
        return f"Auto-Submitted: {auto_submitted}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Auto-Response-Suppress"):
        if msg.get(name) is not None:
            return name
    precedence = _header(msg, "Precedence").lower()
    if precedence in ("auto_reply", "bulk", "junk"):
        return f"Precedence: {precedence}"
    subject = _header(msg, "Subject")
    if AUTO_REPLY_SUBJECT.search(subject):
        return f"Subject: {subject[:80]}"
    return ""


def envelope_addresses(msg: Message, envelope_to: str | None = None) -> list[str]:
    """Every address the message may have been delivered to: the MTA's first, then the headers."""
    found = [envelope_to] if envelope_to else []
    for header in ENVELOPE_HEADERS:
        values = [str(value) for value in msg.get_all(header, [])]
        found += [address for _, address in getaddresses(values)]
    return list(dict.fromkeys(address for address in found if "@" in address))


def bounce_fingerprint(msg: Message, raw: bytes) -> str:
    """The same for every copy of one bounce message: its Message-ID, else its bytes, hashed."""
    message_id = _message_id(msg)
    data = message_id.encode("utf-8", "surrogatepass") if message_id else raw
    return hashlib.sha256(data).hexdigest()


def mime_depth(raw: bytes) -> int:
    """How deep multipart parts nest, read from the boundary lines without parsing."""
    declared = {match[1] or match[2] for match in _BOUNDARY.finditer(raw)}
    if not declared:
        return 0
    open_boundaries: list[bytes] = []
    deepest = 0
    for match in _DELIMITER_LINE.finditer(raw):
        boundary, closing = match[1], bool(match[2])
        if boundary not in declared and closing and boundary + b"--" in declared:
            boundary, closing = boundary + b"--", False
        if boundary not in declared:
            continue
        if boundary in open_boundaries:
            if closing:
                del open_boundaries[open_boundaries.index(boundary) :]
        elif not closing:
            open_boundaries.append(boundary)
            deepest = max(deepest, len(open_boundaries))
    return deepest


def record_bounce(bounce: Bounce) -> Bounce:
    """A ``BounceEvent`` (context "bounce") for every bouncing member, then score them.

    A member already recorded for the same bounce message is not recorded again.
    """
    members = _members_by_address(bounce.mailing_list, bounce.addresses)
    recorded = set()
    if bounce.fingerprint:
        recorded = {
            address.casefold()
            for address in BounceEvent.objects.filter(
                mailing_list=bounce.mailing_list, fingerprint=bounce.fingerprint
            ).values_list("address", flat=True)
        }
    now = timezone.now()
    for address in bounce.addresses:
        member = members.get(address.casefold())
        if member is None:
            bounce.not_members.append(address)
            continue
        if member.address.casefold() in recorded:
            bounce.already_recorded.append(member.address)
            continue
        recorded.add(member.address.casefold())
        bounce.events.append(
            BounceEvent(
                mailing_list=bounce.mailing_list,
                address=member.address,
                smtp_message=bounce.diagnostic,
                message_id=bounce.message_id[:MESSAGE_ID_LENGTH],
                context=BounceEvent.Context.BOUNCE,
                fingerprint=bounce.fingerprint,
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
    if member.delivery_status != DeliveryStatus.ENABLED:
        return  # a residual bounce: nothing is being sent to this member
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
    if member.bounce_score >= threshold:
        logger.info(
            "Disabled delivery to %s on %s: bounce score %s reached %s",
            member.address,
            event.mailing_list_id,
            member.bounce_score,
            threshold,
        )
        # As Mailman: the score starts again, so that a member whose delivery
        # is enabled again is not disabled by the very next bounce.
        member.delivery_status = DeliveryStatus.BY_BOUNCES
        member.disabled_at = timezone.now()
        reached, member.bounce_score = member.bounce_score, 0
        fields += ["delivery_status", "disabled_at"]
        signals.send_on_commit(
            signals.member_disabled_by_bounces,
            Member,
            member=member,
            mailing_list=member.mailing_list,
            bounce_score=reached,
        )
    member.save(update_fields=fields)


def _verp_members(candidates: list[str]) -> dict[int, tuple[MailingList, list[str]]]:
    """The members named by VERP'd addresses among ``candidates``, by list."""
    config = conf.get_config()
    found: dict[int, tuple[MailingList, list[str]]] = {}
    for candidate, mlist, suffix in _bounces_addresses(candidates):
        if not suffix:
            continue
        member = verp.decode(candidate, config["VERP_FORMAT"], bounces=f"{mlist.list_name}-bounces")
        if member is None:
            continue
        _, members = found.setdefault(mlist.pk, (mlist, []))
        if member.casefold() not in {known.casefold() for known in members}:
            members.append(member)
    return found


def _bounces_addresses(candidates: list[str]) -> list[tuple[str, MailingList, str]]:
    """``(candidate, list, suffix)`` for every candidate that is one of our lists' bounces addresses.

    The list is found by its bounces address followed by ``VERP_DELIMITER`` (or
    the separator ``VERP_FORMAT`` puts there), so a delimiter that also occurs
    in ``-bounces`` or in the list's name, such as ``-``, works.
    """
    config = conf.get_config()
    separators = config["VERP_DELIMITER"] + verp.separator_after_bounces(config["VERP_FORMAT"])
    options = {
        candidate: verp.bounces_candidates(candidate, separators) for candidate in candidates
    }
    wanted = {address.lower() for found in options.values() for address, _ in found}
    if not wanted:
        return []
    lists = {
        mlist.key: mlist
        for mlist in MailingList.objects.annotate(key=Lower("address")).filter(key__in=wanted)
    }
    result = []
    for candidate, found in options.items():
        for address, suffix in found:  # the longest list name first
            if address.lower() in lists:
                result.append((candidate, lists[address.lower()], suffix))
                break
    return result


def _find_list(candidates: list[str], list_address: str | None) -> MailingList:
    if list_address:
        mlist = MailingList.objects.filter(address__iexact=list_address).first()
        if mlist is None:
            raise NotABounce(f"there is no mailing list {list_address!r}")
        return mlist
    for _, mlist, _ in _bounces_addresses(candidates):
        return mlist
    raise NotABounce("it was not sent to a list's bounces address (give --list)")


def _failures(msg: Message) -> tuple[set[str], set[str]]:
    """Temporarily and permanently failed recipients, as flufl.bounce reads them."""
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except RecursionError:
        raise  # read_bounces says why
    except Exception as error:  # flufl's heuristics can trip over broken MIME
        raise NotABounce(f"the bounce could not be read: {type(error).__name__}") from None
    return _addresses(temporary), _addresses(permanent)


def _addresses(found) -> set[str]:
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


def _header(msg: Message, name: str) -> str:
    return " ".join(str(msg.get(name, "")).split())


def _message_id(msg: Message) -> str:
    """The Message-ID unfolded: it has no spaces of its own."""
    return "".join(str(msg.get("Message-ID", "")).split())


def _original_message_id(msg: Message) -> str:
    """The Message-ID of the post that bounced, from the returned headers or message."""
    for part in msg.walk():
        if part.get_content_type() in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message) and inner.get("Message-ID"):
                return _message_id(inner)
        if part.get_content_type() == "text/rfc822-headers":
            text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
            headers = message_from_string(text)
            if headers.get("Message-ID"):
                return _message_id(headers)
    return ""


def _diagnostic(msg: Message) -> str:
    """The first Diagnostic-Code of a DSN, if any, for the administrator."""
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status" and part.is_multipart():
            for block in part.get_payload():
                if isinstance(block, Message) and block.get("Diagnostic-Code"):
                    return _header(block, "Diagnostic-Code")[:1000]
    return ""
