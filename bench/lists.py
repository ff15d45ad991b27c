"""The lists, members and posts the scenarios send, made the same way in every scenario."""

from __future__ import annotations

import os
from typing import Any

PERSONALIZED_LIST = "personalized@bench.example.org"
BULK_LIST = "bulk@bench.example.org"
SMALL_LIST = "three@bench.example.org"
DOMAINS = ("example.com", "example.org", "example.net", "example.de")
CREATE_CHUNK = 5_000

BODY_LINE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n"

#: A personalized list carries a footer with member data and a one-click unsubscribe link,
#: as a real one would: each copy gets its own footer and List-Unsubscribe.
PERSONAL_FOOTER = (
    "_______________________________________________\n"
    "$display_name mailing list -- $listname\n"
    "You receive this as $user_name_or_address <$user_address>.\n"
    "Unsubscribe: $unsubscribe_url\n"
)
UNSUBSCRIBE_BASE_URL = "https://lists.example.com"
#: The settings under which a personalized list's posts go as described above.
PERSONALIZED_SETTINGS = {
    "VERP_PERSONALIZED_DELIVERIES": True,
    "UNSUBSCRIBE_BASE_URL": UNSUBSCRIBE_BASE_URL,
}


def post_bytes(number: int, list_address: str, size: int = 2048) -> bytes:
    """A plain-text post of about ``size`` bytes, LF line endings as the pipeline stores them."""
    headers = (
        "From: Anne Person <anne@example.org>\n"
        f"To: {list_address}\n"
        f"Subject: Benchmark post number {number}\n"
        f"Message-ID: <bench-{number}-{os.getpid()}@example.org>\n"
        "Date: Mon, 24 Nov 2025 08:00:00 +0000\n"
        "MIME-Version: 1.0\n"
        'Content-Type: text/plain; charset="us-ascii"\n'
        "Content-Transfer-Encoding: 7bit\n"
        f"List-Id: <{list_address.replace('@', '.')}>\n"
        "\n"
    )
    lines = max(1, (size - len(headers)) // len(BODY_LINE))
    return (headers + BODY_LINE * lines).encode()


def member_address(index: int) -> str:
    return f"member{index:06d}@{DOMAINS[index % len(DOMAINS)]}"


def member_name(index: int) -> str:
    # One in twenty names is not ASCII, so some To: lines are RFC 2047-encoded.
    return f"Zoë Müller {index}" if index % 20 == 0 else f"Member Number {index}"


def create_list(address: str, personalize: str, members: int) -> Any:
    """A list of ``members`` members; a personalized one carries :data:`PERSONAL_FOOTER`."""
    from listdelivery.models import MailingList, Member, Personalization

    footer = PERSONAL_FOOTER if personalize != Personalization.NONE else ""
    mlist = MailingList.objects.create(address=address, personalize=personalize, footer=footer)
    for start in range(0, members, CREATE_CHUNK):
        Member.objects.bulk_create(
            Member(mailing_list=mlist, address=member_address(i), display_name=member_name(i))
            for i in range(start, min(members, start + CREATE_CHUNK))
        )
    return mlist


def create_small_list() -> Any:
    """The three-member list of the seed (Anne, Bart, Cris), without personalization."""
    from listdelivery.models import MailingList, Member

    mlist = MailingList.objects.create(address=SMALL_LIST)
    Member.objects.bulk_create(
        Member(
            mailing_list=mlist, address=f"{name.lower()}@example.com", display_name=f"{name} Person"
        )
        for name in ("Anne", "Bart", "Cris")
    )
    return mlist


def enqueue(mlist: Any, number: int) -> Any:
    """What Mailman's pipeline does: parse, fill in the recipients, queue."""
    from email import message_from_bytes

    from listdelivery.pipeline import member_recipients, to_outgoing

    msg = message_from_bytes(post_bytes(number, mlist.address))
    msgdata: dict[str, Any] = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata, tolist=True)
