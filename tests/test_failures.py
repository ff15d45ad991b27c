"""What an administrator sees when the SMTP server says no: retries, bounces, held posts."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from listdelivery.models import BounceEvent, OutgoingMessage, OutgoingRecipient, Personalization
from listdelivery.pipeline import after_delivery

from .conftest import THREE, make_due, queue_post, run, statuses

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


def test_mixed_550_450_250_bounces_one_retries_one_and_later_delivers_the_original_post(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {
        "bperson@example.com": "550 5.1.1 No such user",
        "cperson@example.com": "450 4.2.0 Mailbox busy",
    }
    row = queue_post(mlist, first_post)

    first = run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["aperson@example.com"]]
    bounce = BounceEvent.objects.get()
    assert (bounce.address, bounce.smtp_code, bounce.message_id) == (
        "bperson@example.com",
        550,
        "<first>",
    )
    assert "No such user" in bounce.smtp_message
    row.refresh_from_db()
    assert row.status == Status.RETRY
    assert statuses(row) == {
        "aperson@example.com": RStatus.SENT,
        "bperson@example.com": RStatus.BOUNCED,
        "cperson@example.com": RStatus.DEFERRED,
    }
    assert row.next_attempt_at > timezone.now()
    assert (first.recipients, first.bounced, first.deferred) == (1, 1, 1)

    smtpd.clear()
    assert run().posts == 0  # not due yet: no busy loop
    make_due(row)
    run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["cperson@example.com"]]
    assert smtpd.messages[0].message["Subject"] == "My first post"
    assert smtpd.messages[0].message.get_payload() == "First post!\n"
    row.refresh_from_db()
    assert row.status == Status.DELIVERED
    assert BounceEvent.objects.count() == 1


def test_552_is_retried_not_bounced(deliver_to, smtpd, mlist, first_post):
    smtpd.fail_rcpt = {"aperson@example.com": "552 5.3.4 Too many recipients"}
    row = queue_post(mlist, first_post)
    run()

    row.refresh_from_db()
    assert row.status == Status.RETRY
    assert statuses(row)["aperson@example.com"] == RStatus.DEFERRED
    assert not BounceEvent.objects.exists()


def test_server_down_then_up_delivers_everything_once(deliver_to, smtpd, mlist, first_post, caplog):
    smtpd.stop()
    row = queue_post(mlist, first_post)
    with caplog.at_level(logging.ERROR, logger="listdelivery"):
        summary = run()

    row.refresh_from_db()
    assert row.status == Status.RETRY
    assert "connect" in row.last_error
    assert set(statuses(row).values()) == {RStatus.DEFERRED}
    assert not BounceEvent.objects.exists()
    assert summary.retrying == 1

    smtpd.start()
    make_due(row)
    run()

    assert smtpd.recipients_count() == {address: 1 for address in THREE}
    row.refresh_from_db()
    assert row.status == Status.DELIVERED


def test_retry_delays_grow_exponentially_and_are_capped(deliver_to, smtpd, mlist, first_post):
    deliver_to(DELIVERY_RETRY_DELAY="10m", DELIVERY_RETRY_MAX_DELAY="30m")
    smtpd.stop()
    row = queue_post(mlist, first_post)
    delays = []
    for _ in range(4):
        make_due(row)
        before = timezone.now()
        run()
        row.refresh_from_db()
        delays.append((row.next_attempt_at - before) / timedelta(minutes=1))

    assert 10 <= delays[0] <= 12.1
    assert 20 <= delays[1] <= 24.1
    assert 30 <= delays[2] <= 36.1  # capped
    assert 30 <= delays[3] <= 36.1
    assert row.attempts == 4


def test_no_progress_past_the_deadline_fails_the_post_and_says_why(
    deliver_to, smtpd, mlist, first_post, caplog
):
    smtpd.fail_rcpt = {"cperson@example.com": "450 4.2.0 Mailbox busy"}
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert row.deliver_until - timezone.now() > timedelta(days=4, hours=23)
    OutgoingMessage.objects.filter(pk=row.pk).update(
        next_attempt_at=timezone.now(), deliver_until=timezone.now() - timedelta(seconds=1)
    )

    with caplog.at_level(logging.ERROR, logger="listdelivery.smtp"):
        run()

    row.refresh_from_db()
    assert row.status == Status.FAILED
    assert "gave up" in row.last_error
    assert statuses(row)["cperson@example.com"] == RStatus.FAILED
    assert "Discarding message with persistent temporary failures" in caplog.text


def test_progress_pushes_the_deadline_forward(deliver_to, smtpd, mlist, first_post):
    smtpd.fail_rcpt = {"bperson@example.com": "450 busy", "cperson@example.com": "450 busy"}
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert row.last_failure_count == 2
    expired = timezone.now() - timedelta(seconds=1)
    OutgoingMessage.objects.filter(pk=row.pk).update(
        next_attempt_at=timezone.now(), deliver_until=expired
    )
    smtpd.fail_rcpt = {"cperson@example.com": "450 busy"}

    run()

    row.refresh_from_db()
    assert row.status == Status.RETRY
    assert row.last_failure_count == 1
    assert row.deliver_until - timezone.now() > timedelta(days=4, hours=23)


def test_a_retry_keeps_the_verp_decision_of_the_first_attempt(deliver_to, smtpd, mlist, first_post):
    deliver_to(VERP_DELIVERY_INTERVAL=3)
    mlist.post_id = 3
    mlist.save()
    smtpd.fail_rcpt = {"cperson@example.com": "450 busy"}
    row = queue_post(mlist, first_post)
    run()
    after_delivery(mlist, first_post, {})  # post_id 4 would not VERP
    smtpd.clear()
    make_due(row)

    run()

    assert [m.mail_from for m in smtpd.messages] == ["test-bounces+cperson=example.com@example.com"]


@pytest.mark.parametrize(
    ("fault", "value", "status"),
    [
        ("fail_mail", "550 5.7.1 Sender rejected", Status.HELD),
        ("fail_mail", "421 4.3.0 Try again", Status.RETRY),
        ("fail_data", "554 5.6.0 Content rejected", Status.HELD),
        ("fail_data", "451 4.3.0 Local error", Status.RETRY),
    ],
)
def test_a_refused_transaction_for_several_recipients_is_never_a_bounce(
    deliver_to, smtpd, mlist, first_post, fault, value, status
):
    setattr(smtpd, fault, value)
    row = queue_post(mlist, first_post)
    run()

    row.refresh_from_db()
    assert row.status == status
    assert value.split()[0] in row.last_error
    assert not BounceEvent.objects.exists()
    assert set(statuses(row).values()) == {RStatus.DEFERRED}


def test_a_mailbox_refusal_at_data_for_a_single_recipient_is_that_recipients_bounce(
    deliver_to, smtpd, mlist, first_post
):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    smtpd.fail_data = "550 5.1.1 No such user here"
    queue_post(mlist, first_post, {"recipients": ["only@example.com"]})
    run()

    assert BounceEvent.objects.get().address == "only@example.com"


def test_bad_credentials_hold_the_post_without_a_single_bounce(settings, mlist, first_post, caplog):
    from listdelivery.testing import SMTPTestServer

    with SMTPTestServer(auth=("list", "right-password")) as server:
        settings.LISTDELIVERY = {
            "SMTP_HOST": server.host,
            "SMTP_PORT": server.port,
            "SMTP_USER": "list",
            "SMTP_PASSWORD": "wrong-password",
        }
        row = queue_post(mlist, first_post)
        with caplog.at_level(logging.DEBUG, logger="listdelivery"):
            run()
        row.refresh_from_db()
        assert row.status == Status.HELD
        assert "auth" in row.last_error and "535" in row.last_error
        assert not BounceEvent.objects.exists()
        assert server.messages == [] and server.connections == 1
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
        assert "wrong-password" not in caplog.text and "wrong-password" not in row.last_error

        settings.LISTDELIVERY = {**settings.LISTDELIVERY, "SMTP_PASSWORD": "right-password"}
        make_due(row)
        run()
        assert [m.rcpt_tos for m in server.messages] == [THREE]


def test_a_dropped_connection_mid_transaction_is_retried(deliver_to, smtpd, mlist, first_post):
    smtpd.drop_data = 1
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert row.status == Status.RETRY
    assert smtpd.messages == []

    make_due(row)
    run()
    assert smtpd.recipients_count() == {address: 1 for address in THREE}


def test_after_a_refused_transaction_the_session_is_reset_and_reused(
    deliver_to, smtpd, mlist, first_post
):
    deliver_to(MAX_RECIPIENTS=1)
    smtpd.fail_rcpt = {"bperson@example.com": "550 unknown"}
    queue_post(mlist, first_post)
    run()

    assert [m.rcpt_tos for m in smtpd.messages] == [
        ["aperson@example.com"],
        ["cperson@example.com"],
    ]
    assert smtpd.connections == 1


def test_a_claimed_post_whose_lease_ran_out_while_waiting_is_not_sent(
    deliver_to, smtpd, mlist, first_post
):
    import time as clock
    from datetime import timedelta as span

    from listdelivery.runner import OutgoingRunner

    deliver_to(LEASE_DURATION=1, CLAIM_BATCH=2)
    first = queue_post(mlist, first_post, {"recipients": ["one@example.com"]})
    second = queue_post(mlist, first_post, {"recipients": ["two@example.com"]})

    def another_runner_takes_the_second(row, summary):
        if row.pk == first.pk:
            clock.sleep(0.6)  # the second post waited past half its lease
            OutgoingMessage.objects.filter(pk=second.pk).update(
                lease_token="another-runner", leased_until=timezone.now() + span(minutes=5)
            )

    OutgoingRunner(on_post=another_runner_takes_the_second).run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["one@example.com"]]
    second.refresh_from_db()
    assert (second.status, second.lease_token) == (Status.SENDING, "another-runner")
