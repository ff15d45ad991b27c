"""The seed document (Mailman's outgoing runner doctest), section by section.

Mailman's test server adds X-MailFrom and X-RcptTo headers; here the envelope
the server saw is compared directly.
"""

from __future__ import annotations

import pytest

from listdelivery.models import OutgoingMessage, Personalization
from listdelivery.pipeline import after_delivery, member_recipients, to_outgoing

from .conftest import envelopes, run

pytestmark = pytest.mark.django_db

VERPD = [
    ("aperson@example.com", "test-bounces+aperson=example.com@example.com"),
    ("bperson@example.com", "test-bounces+bperson=example.com@example.com"),
    ("cperson@example.com", "test-bounces+cperson=example.com@example.com"),
]
PLAIN_PERSONALIZED = [
    ("aperson@example.com", "test-bounces@example.com"),
    ("bperson@example.com", "test-bounces@example.com"),
    ("cperson@example.com", "test-bounces@example.com"),
]
BULK = [
    ("aperson@example.com, bperson@example.com, cperson@example.com", "test-bounces@example.com")
]


@pytest.fixture
def msgdata(mlist, first_post):
    data = {}
    member_recipients(mlist, first_post, data)
    return data


def deliver(smtpd, mlist, msg, msgdata, **extra):
    smtpd.clear()
    to_outgoing(mlist, msg, msgdata, listid=mlist.list_id, **extra)
    run()
    return envelopes(smtpd)


def test_every_recipient_gets_the_same_single_copy(deliver_to, smtpd, mlist, first_post, msgdata):
    to_outgoing(mlist, first_post, msgdata, tolist=True, listid=mlist.list_id)
    run()

    assert len(smtpd.messages) == 1
    received = smtpd.messages[0]
    assert received.mail_from == "test-bounces@example.com"
    assert received.rcpt_tos == [
        "aperson@example.com",
        "bperson@example.com",
        "cperson@example.com",
    ]
    # The post exactly as queued, plus the RFC 2369 headers listdelivery adds to every copy
    # (Mailman adds them in its pipeline, which the seed bypasses).
    assert received.content.replace(b"\r\n", b"\n") == (
        b"From: aperson@example.com\n"
        b"To: test@example.com\n"
        b"Subject: My first post\n"
        b"Message-ID: <first>\n"
        b"List-Id: Test <test.example.com>\n"
        b"List-Post: <mailto:test@example.com>\n"
        b"List-Unsubscribe: <mailto:test-leave@example.com>\n"
        b"\n"
        b"First post!\n"
    )
    row = OutgoingMessage.objects.get()
    assert row.status == OutgoingMessage.Status.DELIVERED
    assert row.metadata["tolist"] is True


def test_personalized_list_sends_one_copy_per_member_with_the_same_sender(
    deliver_to, smtpd, mlist, first_post, msgdata
):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()

    assert deliver(smtpd, mlist, first_post, msgdata) == PLAIN_PERSONALIZED


def test_verp_forced_by_metadata_encodes_each_recipient_in_the_sender(
    deliver_to, smtpd, mlist, first_post, msgdata
):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()

    assert deliver(smtpd, mlist, first_post, msgdata, verp=True) == VERPD


def test_verp_personalized_deliveries_verps_every_personalized_post(
    deliver_to, smtpd, mlist, first_post, msgdata
):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    deliver_to(VERP_PERSONALIZED_DELIVERIES=True)

    assert deliver(smtpd, mlist, first_post, msgdata) == VERPD


def test_verp_every_third_post_with_an_interval_of_three(
    deliver_to, smtpd, mlist, first_post, msgdata
):
    deliver_to(VERP_DELIVERY_INTERVAL=3)
    mlist.post_id = 1
    mlist.save()

    seen = []
    for _ in range(4):
        seen.append(deliver(smtpd, mlist, first_post, msgdata))
        after_delivery(mlist, first_post, msgdata)

    assert seen == [BULK, BULK, VERPD, BULK]


def test_verp_every_time_with_an_interval_of_one(deliver_to, smtpd, mlist, first_post, msgdata):
    deliver_to(VERP_DELIVERY_INTERVAL=1)
    mlist.post_id = 1
    mlist.save()

    seen = []
    for _ in range(3):
        seen.append(deliver(smtpd, mlist, first_post, msgdata))
        after_delivery(mlist, first_post, msgdata)

    assert seen == [VERPD, VERPD, VERPD]


def test_never_verp_with_an_interval_of_zero(deliver_to, smtpd, mlist, first_post, msgdata):
    deliver_to(VERP_DELIVERY_INTERVAL=0)
    mlist.post_id = 1
    mlist.save()

    seen = []
    for _ in range(2):
        seen.append(deliver(smtpd, mlist, first_post, msgdata))
        after_delivery(mlist, first_post, msgdata)

    assert seen == [BULK, BULK]
