"""Bad input gets a clear error and a row that says why; the runner carries on."""

from __future__ import annotations

from email import message_from_string
from email.message import EmailMessage

import pytest

from listdelivery.models import MailingList, OutgoingMessage, OutgoingRecipient, Personalization
from listdelivery.pipeline import to_outgoing

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


def test_a_message_that_is_not_a_post_is_discarded_and_the_next_one_delivered(
    deliver_to, smtpd, mlist, first_post
):
    garbage = to_outgoing(
        mlist, b"\x00\x01\x02 this is not a message", {"recipients": ["a@example.com"]}
    )
    good = queue_post(mlist, first_post)

    summary = run()

    garbage.refresh_from_db()
    good.refresh_from_db()
    assert garbage.status == Status.DISCARDED
    assert "no header fields" in garbage.last_error
    assert good.status == Status.DELIVERED
    assert summary.posts == 2 and len(smtpd.messages) == 1


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("evil@example.com\r\nBcc: everyone@example.com", "line break"),
        ("evil@example.com\nRCPT TO:<x@example.com>", "line break"),
        ("nobody", "no domain"),
        ("two@example.com, three@example.com", "not a single address"),
    ],
)
def test_a_bad_address_fails_alone_with_the_reason(
    deliver_to, smtpd, mlist, first_post, address, reason
):
    row = queue_post(mlist, first_post, {"recipients": ["good@example.com", address]})
    run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["good@example.com"]]
    bad = row.recipients.get(status=RStatus.FAILED)
    assert reason in bad.smtp_message
    row.refresh_from_db()
    assert row.status == Status.DELIVERED


def test_a_non_ascii_address_goes_out_with_smtputf8(deliver_to, smtpd, mlist, first_post):
    mlist.personalize = Personalization.FULL
    mlist.save()
    queue_post(mlist, first_post, {"recipients": ["jürgen@münchen.example"]}, verp=True)
    run()

    (received,) = smtpd.messages
    assert received.rcpt_tos == ["jürgen@münchen.example"]
    assert received.mail_from == "test-bounces+jürgen=münchen.example@example.com"
    assert "SMTPUTF8" in received.mail_options
    assert "jürgen@münchen.example" in received.content.decode("utf-8")


def test_without_smtputf8_only_the_non_ascii_recipient_fails_not_its_chunk(
    settings, mlist, first_post
):
    from listdelivery.testing import SMTPTestServer

    with SMTPTestServer(smtputf8=False) as server:
        settings.LISTDELIVERY = {"SMTP_HOST": server.host, "SMTP_PORT": server.port}
        row = queue_post(
            mlist,
            first_post,
            {"recipients": ["a@example.com", "jürgen@example.com", "b@example.com"]},
        )
        run()

        assert [m.rcpt_tos for m in server.messages] == [["a@example.com", "b@example.com"]]
    failed = row.recipients.get(status=RStatus.FAILED)
    assert failed.address == "jürgen@example.com"
    assert "SMTPUTF8" in failed.smtp_message
    row.refresh_from_db()
    assert row.status == Status.DELIVERED


def test_verp_works_for_a_post_without_message_id(deliver_to, smtpd, mlist):
    msg = message_from_string("From: a@example.com\nSubject: no id\n\nBody\n")
    row = queue_post(mlist, msg, verp=True)
    run()

    assert sorted(m.mail_from for m in smtpd.messages) == [
        "test-bounces+aperson=example.com@example.com",
        "test-bounces+bperson=example.com@example.com",
        "test-bounces+cperson=example.com@example.com",
    ]
    row.refresh_from_db()
    assert row.status == Status.DELIVERED


def test_an_8bit_body_arrives_intact(deliver_to, smtpd, mlist):
    body = "Grüße aus Köln — ünïcödé\n".encode()
    raw = (
        b"From: a@example.com\nSubject: 8bit\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        + body
    )
    to_outgoing(mlist, raw, {"recipients": ["a@example.com"]})
    run()

    assert smtpd.messages[0].content.replace(b"\r\n", b"\n").endswith(body)


def test_a_20_mb_post_is_delivered_whole(deliver_to, smtpd, mlist):
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "big"
    msg["Message-ID"] = "<big@example.com>"
    msg.set_content(("x" * 76 + "\n") * (20 * 1024 * 1024 // 77))
    row = queue_post(mlist, msg)
    run()

    (received,) = smtpd.messages
    assert len(received.content) > 20_000_000
    row.refresh_from_db()
    assert row.status == Status.DELIVERED


def test_posts_of_a_deleted_list_are_discarded_with_the_reason(
    deliver_to, smtpd, mlist, first_post
):
    other = MailingList.objects.create(address="other@example.com")
    row = queue_post(mlist, first_post)
    survivor = queue_post(other, first_post, {"recipients": ["x@example.com"]})
    mlist.delete()

    run()

    row.refresh_from_db()
    survivor.refresh_from_db()
    assert row.status == Status.DISCARDED
    assert "test.example.com was deleted" in row.last_error
    assert survivor.status == Status.DELIVERED
    assert [m.rcpt_tos for m in smtpd.messages] == [["x@example.com"]]


@pytest.mark.parametrize("metadata", [{}, [], "junk"])
def test_a_row_with_missing_metadata_is_still_delivered(
    deliver_to, smtpd, mlist, first_post, metadata
):
    row = queue_post(mlist, first_post)
    OutgoingMessage.objects.filter(pk=row.pk).update(metadata=metadata)
    run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED
    assert smtpd.messages[0].mail_from == "test-bounces@example.com"


def test_a_sender_with_a_line_break_is_refused_with_the_reason(
    deliver_to, smtpd, mlist, first_post
):
    row = queue_post(mlist, first_post, sender="x@example.com\r\nRCPT TO:<victim@example.com>")
    run()

    row.refresh_from_db()
    assert row.status == Status.DISCARDED
    assert "envelope sender" in row.last_error and "line break" in row.last_error
    assert smtpd.messages == []
