"""XVERP (issue 14): a VERP'd post of a list without personalization goes in bulk chunks with
``MAIL FROM:<…> XVERP=+=`` when the server offers it, and the server writes each copy's
VERP'd sender; anything else is sent one copy per member, as before."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from django.core.management import call_command

from listdelivery import conf, verp
from listdelivery.delivery import Post
from listdelivery.delivery.individual import IndividualDelivery, written_by_xverp
from listdelivery.models import BounceEvent, MailingList, OutgoingMessage, OutgoingRecipient
from listdelivery.smtp import SMTPPool, Transaction
from listdelivery.testing import SMTPTestServer

from .conftest import THREE, queue_post, run

pytestmark = pytest.mark.django_db

DEFAULT_FORMAT = "${bounces}+${local}=${domain}"
BOUNCES = Path(__file__).parent / "bounces"


@pytest.fixture
def xverp_server():
    with SMTPTestServer(xverp=True) as server:
        yield server


def point_at(settings, server: SMTPTestServer, **values) -> None:
    settings.LISTDELIVERY = {
        "SMTP_HOST": server.host,
        "SMTP_PORT": server.port,
        "DELIVERY_RETRY_DELAY": 60,
        "ENQUEUE_TASKS": False,
        "XVERP": True,
        **values,
    }


def verpd_post(mlist: MailingList, first_post) -> OutgoingMessage:
    return queue_post(mlist, first_post, verp=True)


def copies(server: SMTPTestServer) -> dict[str, str]:
    """Each recipient's envelope sender, as the server would write it."""
    return {r: m.sender_for(r) for m in server.messages for r in m.rcpt_tos}


def expected_senders(recipients: list[str]) -> dict[str, str]:
    return {r: verp.encode("test-bounces@example.com", r, DEFAULT_FORMAT) for r in recipients}


def test_a_verpd_post_without_personalization_goes_as_one_chunk_with_xverp(
    settings, xverp_server, mlist, first_post
):
    point_at(settings, xverp_server)
    row = verpd_post(mlist, first_post)

    run()

    (message,) = xverp_server.messages
    assert message.mail_from == "test-bounces@example.com"
    assert sorted(message.rcpt_tos) == THREE
    assert "XVERP=+=" in message.mail_options
    assert copies(xverp_server) == expected_senders(THREE)
    for recipient, sender in copies(xverp_server).items():
        assert verp.decode(sender, DEFAULT_FORMAT, bounces="test-bounces") == recipient
    row.refresh_from_db()
    assert row.status == OutgoingMessage.Status.DELIVERED
    assert row.metadata["verp"] is True
    assert set(row.recipients.values_list("status", flat=True)) == {OutgoingRecipient.Status.SENT}


def test_a_server_without_xverp_gets_one_verpd_copy_per_member(settings, smtpd, mlist, first_post):
    point_at(settings, smtpd)
    verpd_post(mlist, first_post)

    run()

    assert sorted(len(m.rcpt_tos) for m in smtpd.messages) == [1, 1, 1]
    assert all(m.mail_options == [] or "XVERP=+=" not in m.mail_options for m in smtpd.messages)
    assert copies(smtpd) == expected_senders(THREE)


@pytest.mark.parametrize(
    ("list_fields", "values"),
    [
        ({}, {"XVERP": False}),
        ({"personalize": "full"}, {}),
        ({"footer": "You get this as $user_address.\n"}, {}),
        ({}, {"UNSUBSCRIBE_BASE_URL": "https://lists.example.com"}),
        ({}, {"VERP_FORMAT": "${bounces}-${local}-at-${domain}"}),
    ],
    ids=["setting off", "personalized", "member footer", "one-click link", "another format"],
)
def test_otherwise_every_member_gets_a_copy_of_their_own(
    settings, xverp_server, mlist, first_post, list_fields, values
):
    MailingList.objects.filter(pk=mlist.pk).update(**list_fields)
    point_at(settings, xverp_server, **values)
    verpd_post(MailingList.objects.get(pk=mlist.pk), first_post)

    run()

    assert sorted(len(m.rcpt_tos) for m in xverp_server.messages) == [1, 1, 1]
    assert not any("XVERP=+=" in m.mail_options for m in xverp_server.messages)
    senders = copies(xverp_server)
    assert all(senders[r] != "test-bounces@example.com" for r in THREE), senders


def test_a_post_not_verpd_is_sent_in_bulk_without_xverp(settings, xverp_server, mlist, first_post):
    point_at(settings, xverp_server)
    queue_post(mlist, first_post)

    run()

    (message,) = xverp_server.messages
    assert message.mail_from == "test-bounces@example.com"
    assert "XVERP=+=" not in message.mail_options


def test_a_footer_without_member_data_is_on_the_one_copy(settings, xverp_server, mlist, first_post):
    MailingList.objects.filter(pk=mlist.pk).update(footer="-- \nThe $display_name list\n")
    point_at(settings, xverp_server)
    verpd_post(MailingList.objects.get(pk=mlist.pk), first_post)

    run()

    (message,) = xverp_server.messages
    assert "XVERP=+=" in message.mail_options
    assert b"The Test list" in message.content


def test_chunks_follow_max_recipients_and_a_server_limit_keeps_xverp(
    settings, xverp_server, mlist, first_post
):
    """MAX_RECIPIENTS 2: two chunks; the server takes one recipient a transaction, and the
    recipients it refused with 452 go again at once, still with XVERP."""
    point_at(settings, xverp_server, MAX_RECIPIENTS=2)
    xverp_server.max_recipients = 1
    row = verpd_post(mlist, first_post)

    run()

    assert sorted(len(m.rcpt_tos) for m in xverp_server.messages) == [1, 1, 1]
    assert all("XVERP=+=" in m.mail_options for m in xverp_server.messages)
    assert copies(xverp_server) == expected_senders(THREE)
    row.refresh_from_db()
    assert row.status == OutgoingMessage.Status.DELIVERED


def test_with_traffic_shaping_the_chunks_go_with_xverp_too(
    settings, xverp_server, mlist, first_post
):
    point_at(settings, xverp_server, SMTP_RATE="1000/s", RATE_LIMIT_STORAGE="database")
    verpd_post(mlist, first_post)

    run()

    (message,) = xverp_server.messages
    assert "XVERP=+=" in message.mail_options
    assert copies(xverp_server) == expected_senders(THREE)


def test_with_a_relay_that_does_not_offer_xverp_every_member_gets_a_copy_of_their_own(
    settings, xverp_server, smtpd, mlist, first_post
):
    relays = [
        {"NAME": name, "HOST": server.host, "PORT": server.port}
        for name, server in (("postfix", xverp_server), ("other", smtpd))
    ]
    point_at(settings, xverp_server, RELAYS=relays, RATE_LIMIT_STORAGE="database")
    verpd_post(mlist, first_post)

    run()

    messages = xverp_server.messages + smtpd.messages
    assert sorted(len(m.rcpt_tos) for m in messages) == [1, 1, 1]
    assert {r: m.sender_for(r) for m in messages for r in m.rcpt_tos} == expected_senders(THREE)


def test_a_chunk_on_a_session_without_xverp_is_sent_as_one_verpd_copy_each(settings, smtpd):
    """Should a server stop offering XVERP between the question and the chunk, the chunk
    fails before MAIL FROM and comes back as one VERP'd copy per recipient."""
    point_at(settings, smtpd)
    config = conf.get_config()
    post = Post(message=b"Subject: s\r\n\r\nx\r\n", sender="list-bounces@example.com", verp=True)
    chunk = Transaction(post.sender, ["a@example.org", "b@example.net"], post.message, xverp=True)
    with SMTPPool(config) as pool:
        (outcome,) = pool.send_all([chunk])
        again = IndividualDelivery(pool, config).follow_ups(post, outcome)

    assert outcome.failure.stage == "xverp" and outcome.failure.code == 555
    assert smtpd.messages == []
    assert [(t.sender, t.recipients, t.xverp) for t in again] == [
        ("list-bounces+a=example.org@example.com", ["a@example.org"], False),
        ("list-bounces+b=example.net@example.com", ["b@example.net"], False),
    ]


def test_a_post_going_with_xverp_checkpoints_every_checkpoint_every_chunks(
    settings, xverp_server, smtpd
):
    """CHECKPOINT_EVERY counts transactions: with XVERP they are chunks of MAX_RECIPIENTS."""
    post = Post(message=b"Subject: s\r\n\r\nx\r\n", sender="list-bounces@example.com", verp=True)
    for server, expected in ((xverp_server, 100 * 10), (smtpd, 100)):
        point_at(settings, server, CHECKPOINT_EVERY=100, MAX_RECIPIENTS=10)
        config = conf.get_config()
        with SMTPPool(config) as pool:
            assert IndividualDelivery(pool, config).batch_size_for(post) == expected


def test_a_bounce_to_the_sender_the_server_wrote_finds_the_member(
    settings, xverp_server, mlist, first_post, tmp_path
):
    point_at(settings, xverp_server)
    verpd_post(mlist, first_post)
    run()
    sender = copies(xverp_server)["bperson@example.com"]
    raw = (BOUNCES / "postfix-failed-verp.eml").read_bytes()
    bounce = tmp_path / "bounce.eml"
    bounce.write_bytes(
        raw.replace(b"test-bounces+bperson=example.com@example.com", sender.encode())
    )

    call_command("process_bounce", str(bounce), "--recipient", sender, verbosity=0)

    assert list(BounceEvent.objects.values_list("address", flat=True)) == ["bperson@example.com"]


def test_the_test_server_refuses_xverp_it_does_not_offer(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        client.ehlo()
        assert not client.has_extn("xverp")
        code, _ = client.docmd("MAIL FROM:<list-bounces@example.com> XVERP=+=")
    assert code == 555


@pytest.mark.parametrize(
    ("verp_format", "expected"),
    [
        (DEFAULT_FORMAT, True),
        ("$bounces+$local=$domain", True),
        ("${bounces}-${local}=${domain}", False),
        ("${bounces}+${domain}=${local}", False),
    ],
)
def test_only_the_format_xverp_writes_may_use_it(verp_format, expected):
    assert written_by_xverp(verp_format) is expected
