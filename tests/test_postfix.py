"""Delivery to a real Postfix with its own limits, as a list operator would run it (issue 10, 23–26).

Debian's Postfix 3.7 runs as a private instance on a free loopback port
(``tests/postfix.py``), delivering to Maildirs and refusing unknown users at
RCPT. Each test sets the limits a real upstream MTA has, delivers a post
through the runner, and checks what a list administrator would notice: every
valid member has exactly one copy in their Maildir, unknown users became
bounce events, and nothing else happened. A failing test shows the Postfix log
lines that explain it.
"""

from __future__ import annotations

import time
from collections import Counter
from email import message_from_bytes, message_from_string
from email.message import Message
from pathlib import Path

import pytest

from listdelivery import verp
from listdelivery.models import (
    BounceEvent,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)

from .conftest import deliver_pending, make_due, queue_post, run, subprocess_environment
from .postfix import DOMAIN, PostfixInstance, start_or_skip

ROOT = Path(__file__).resolve().parent.parent
Status = OutgoingMessage.Status
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postfix_instance():
    instance = start_or_skip(PostfixInstance)
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def postfix(postfix_instance, settings):
    """Give the module's Postfix these mailboxes and limits, and point listdelivery at it."""

    def configure(mailboxes: list[str], *, listdelivery: dict | None = None, **limits):
        postfix_instance.reconfigure(mailboxes, **limits)
        settings.LISTDELIVERY = {
            "SMTP_HOST": postfix_instance.host,
            "SMTP_PORT": postfix_instance.port,
            "SMTP_TIMEOUT": 10,
            "DELIVERY_RETRY_DELAY": 60,
            "ENQUEUE_TASKS": False,
            **(listdelivery or {}),
        }
        return postfix_instance

    return configure


def addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:02d}@{DOMAIN}" for i in range(count)]


def make_list(address: str, members: list[str], **fields) -> MailingList:
    mlist = MailingList.objects.create(address=address, **fields)
    Member.objects.bulk_create(Member(mailing_list=mlist, address=a) for a in members)
    return mlist


def post(subject: str, body: str = "Hello from the list.\n") -> Message:
    return message_from_string(
        f"From: owner@example.com\nSubject: {subject}\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.com>\n\n{body}"
    )


def deliver_in_passes(row: OutgoingMessage, passes: int, pause: float = 0) -> int:
    """Run the runner until the post is no longer waiting, at most ``passes`` times, making it
    due between passes (as the retry schedule would, later); return the passes it took."""
    for number in range(1, passes + 1):
        run()
        row.refresh_from_db()
        if row.status not in OutgoingMessage.WAITING or number == passes:
            return number
        time.sleep(pause)
        make_due(row)
    return passes


def bounced() -> Counter[str]:
    return Counter(BounceEvent.objects.values_list("address", flat=True))


def explain(postfix: PostfixInstance, row: OutgoingMessage | None = None) -> str:
    """What a failing test prints: the post's state and Postfix's own account of the sessions."""
    lines = postfix.log_lines(
        "reject", "warning", "too many", "disconnect", "lost connection", "timeout", "error"
    )
    state = ""
    if row is not None:
        row.refresh_from_db()
        state = f"post {row.status} after {row.attempts} attempts: {row.last_error!r}\n"
    return state + "Postfix log:\n" + "\n".join(lines[-40:])


def assert_one_copy_each(postfix: PostfixInstance, members: list[str], row=None, copies=None):
    copies = postfix.wait_for_copies(len(members)) if copies is None else copies
    missing = sorted(set(members) - set(copies))
    twice = sorted(a for a, n in copies.items() if n > 1)
    strangers = sorted(set(copies) - set(members))
    assert not (missing or twice or strangers), (
        f"{len(missing)} members got no copy {missing[:5]}, {len(twice)} got several "
        f"{twice[:5]}, {len(strangers)} non-members got mail {strangers[:5]}\n"
        + explain(postfix, row)
    )


def test_a_bulk_chunk_with_30_unknown_users_delivers_to_the_20_members_and_bounces_the_rest(
    db, postfix
):
    """Postfix hangs up after smtpd_hard_error_limit (20) refusals; the replies it gave before
    are facts, and the rest goes in new transactions (issue 10, point 23)."""
    members = addresses("member", 50)
    valid = [a for i, a in enumerate(members) if i % 5 in (0, 2)]  # 20, spread over the chunk
    unknown = sorted(set(members) - set(valid))
    server = postfix(
        valid,
        listdelivery={"MAX_RECIPIENTS": 50},
        smtpd_hard_error_limit=20,
        smtpd_error_sleep_time="0s",  # the tarpit has its own test
    )
    row = queue_post(make_list("bulk@example.com", members), post("many unknown users"))

    passes = deliver_in_passes(row, passes=3)

    assert_one_copy_each(server, valid, row)
    assert bounced() == Counter(unknown), (
        f"bounced {sorted(bounced())} instead of the 30 unknown users\n" + explain(server, row)
    )
    assert row.status == Status.DELIVERED, f"{passes} passes\n" + explain(server, row)
    assert passes == 1, "the rest was not sent again at once\n" + explain(server, row)


def test_a_recipient_limit_below_max_recipients_still_delivers_everything_in_one_pass(db, postfix):
    """``452 4.5.3 Too many recipients`` is answered by a new transaction at once, not by a
    retry delay (issue 10, point 24; Mailman does the same)."""
    members = addresses("reader", 20)
    server = postfix(members, listdelivery={"MAX_RECIPIENTS": 20}, smtpd_recipient_limit=5)
    row = queue_post(make_list("limited@example.com", members), post("recipient limit"))

    run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED, "the post waits for a retry\n" + explain(server, row)
    assert_one_copy_each(server, members, row)
    assert not BounceEvent.objects.exists()


def test_more_connections_than_postfix_allows_per_client_still_deliver_in_one_pass(db, postfix):
    """anvil refuses the 2nd–4th session with ``421 too many connections``; that is those
    sessions' problem while the one that got in delivers (issue 10, point 25)."""
    members = addresses("personal", 40)
    server = postfix(
        members,
        listdelivery={"SMTP_CONNECTIONS": 4},
        smtpd_client_connection_count_limit=1,
    )
    mlist = make_list("connections@example.com", members, personalize=Personalization.FULL)
    row = queue_post(mlist, post("connection limit"))

    run()

    row.refresh_from_db()
    assert_one_copy_each(server, members, row)
    assert not BounceEvent.objects.exists(), explain(server, row)
    assert row.status == Status.DELIVERED, explain(server, row)


def test_a_message_rate_limit_defers_the_excess_and_delivers_it_after_the_window(db, postfix):
    """anvil's ``450 4.7.1 too much mail``: deferred, never bounced, delivered once later."""
    members = addresses("rated", 7)
    window = 2
    server = postfix(
        members,
        smtpd_client_message_rate_limit=4,
        anvil_rate_time_unit=f"{window}s",
    )
    mlist = make_list("rated@example.com", members, personalize=Personalization.FULL)
    row = queue_post(mlist, post("rate limit"))
    started = time.monotonic()

    run()

    row.refresh_from_db()
    first = server.wait_for_copies()
    assert row.status == Status.RETRY, explain(server, row)
    assert 0 < sum(first.values()) <= 4, f"{first} went through a limit of 4\n" + explain(server)
    deferred = row.recipients.filter(status=OutgoingRecipient.Status.DEFERRED).count()
    assert deferred == len(members) - sum(first.values()), explain(server, row)
    assert not BounceEvent.objects.exists(), explain(server, row)

    time.sleep(max(0.0, window + 0.5 - (time.monotonic() - started)))
    make_due(row)
    deliver_in_passes(row, passes=3, pause=window + 0.5)

    assert_one_copy_each(server, members, row)
    assert not BounceEvent.objects.exists(), explain(server, row)
    assert row.status == Status.DELIVERED, explain(server, row)


@pytest.mark.long
@pytest.mark.django_db(transaction=True)
def test_two_runners_against_a_tarpit_give_every_member_one_copy(postfix):
    """After 2 errors in a session Postfix waits a second before every reply; two runners
    work side by side, each post slower than its lease: nobody gets a post twice or never."""
    valid = addresses("patient", 12)
    members = valid + addresses("gone", 6)
    server = postfix(valid, smtpd_soft_error_limit=2, smtpd_error_sleep_time="1s")
    mlist = make_list("tarpit@example.com", members)
    rows = [queue_post(mlist, post(f"tarpit {n}")) for n in range(2)]
    environment = subprocess_environment(
        server,
        MAX_RECIPIENTS=3,
        CHECKPOINT_EVERY=2,
        CLAIM_BATCH=1,
        LEASE_DURATION=3,
        SMTP_TIMEOUT=8,
        DELIVERY_RETRY_DELAY=60,
        ENQUEUE_TASKS="no",
    )

    runners = [deliver_pending(environment) for _ in range(2)]
    for runner in runners:
        _, stderr = runner.communicate(timeout=40)
        assert runner.returncode == 0, stderr.decode()

    copies = server.wait_for_copies(len(valid) * len(rows))
    per_post: Counter[tuple[str, str]] = Counter()
    for address in valid:
        for message in server.messages(address):
            subject = message_from_string(message.decode("utf-8", "replace"))["Subject"]
            per_post[(subject, address)] += 1
    expected = {(f"tarpit {n}", a): 1 for n in range(len(rows)) for a in valid}
    wrong = {k: v for k, v in {**dict.fromkeys(expected, 0), **per_post}.items() if v != 1}
    assert not wrong, (
        f"{len(wrong)} (post, member) pairs without exactly one copy: {sorted(wrong.items())[:6]}"
        f"\ncopies per member: {dict(copies)}\n" + explain(server, rows[0])
    )
    assert bounced() == Counter({a: len(rows) for a in members if a not in valid}), explain(server)
    statuses = sorted(OutgoingMessage.objects.values_list("status", flat=True))
    assert statuses == [Status.DELIVERED] * len(rows), explain(server, rows[0])


def test_a_post_over_the_size_limit_is_held_with_the_reason_and_never_uploaded_again(db, postfix):
    """``SIZE 20000`` in Postfix's EHLO, a 40 kB post: held, nobody bounced, nothing delivered,
    and not re-uploaded for each copy and each retry (issue 10, point 26)."""
    members = addresses("sized", 3)
    server = postfix(members, message_size_limit=20000)
    mlist = make_list("sized@example.com", members, personalize=Personalization.FULL)
    row = queue_post(mlist, post("big post", "a line of the big post, long enough\n" * 1200))
    assert len(row.message) > 40000

    run()
    run()  # a later sweep: a held post waits for an administrator

    row.refresh_from_db()
    assert row.status == Status.HELD, explain(server, row)
    reason = row.last_error.lower()
    assert any(word in reason for word in ("20000", "size", "large", "big")), (
        f"the reason does not say the post is too big: {row.last_error!r}"
    )
    assert not BounceEvent.objects.exists(), explain(server, row)
    assert server.wait_for_copies() == Counter()
    uploads = server.log_lines("queue file size limit exceeded")
    assert len([line for line in uploads if "smtpd" in line]) == 0, (
        "the post was uploaded although Postfix announced SIZE 20000\n" + explain(server, row)
    )
    sessions = [line for line in server.log_lines("connect from") if ": connect from" in line]
    assert len(sessions) <= 1, "a held post was tried again\n" + explain(server, row)


def test_a_verpd_post_without_personalization_goes_through_xverp_and_each_copy_names_its_member(
    db, postfix
):
    """Postfix offers XVERP to its networks: 20 members go in two transactions of ten, and
    every copy's Return-Path is that member's VERP'd bounces address (issue 14)."""
    members = addresses("verpd", 20)
    server = postfix(
        members, listdelivery={"XVERP": True}, smtpd_authorized_verp_clients="127.0.0.0/8"
    )
    row = queue_post(make_list("xverp@example.com", members), post("xverp"), verp=True)

    run()

    assert_one_copy_each(server, members, row)
    verp_format = "${bounces}+${local}=${domain}"
    for member in members:
        (copy,) = server.messages(member)
        return_path = message_from_bytes(copy)["Return-Path"].strip("<>")
        found = verp.decode(return_path, verp_format, bounces="xverp-bounces")
        assert found == member, f"{member}'s copy returns to {return_path}\n" + explain(server)
    queued = [line for line in server.log_lines("nrcpt=") if "qmgr" in line]
    assert len(queued) == 2 and all("nrcpt=10 " in line for line in queued), (
        "Postfix did not get two chunks of ten\n" + "\n".join(queued)
    )
    row.refresh_from_db()
    assert row.status == Status.DELIVERED, explain(server, row)


def test_a_postfix_that_does_not_offer_xverp_to_us_gets_one_verpd_copy_per_member(db, postfix):
    """Postfix 3.7 offers XVERP to nobody unless told: the setting on changes nothing then."""
    members = addresses("plainverp", 5)
    server = postfix(members, listdelivery={"XVERP": True})
    row = queue_post(make_list("noxverp@example.com", members), post("no xverp"), verp=True)

    run()

    assert_one_copy_each(server, members, row)
    for member in members:
        (copy,) = server.messages(member)
        local, _, domain = member.partition("@")
        assert message_from_bytes(copy)["Return-Path"] == (
            f"<noxverp-bounces+{local}={domain}@example.com>"
        )
    queued = [line for line in server.log_lines("nrcpt=") if "qmgr" in line]
    assert len(queued) == len(members), "\n".join(queued)
