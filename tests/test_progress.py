"""A post's progress, its attempt history, the hourly totals and the pass record.

The counters on a post are written by the runner along with the recipients;
each test checks them against a real count of the recipients, after real
deliveries to a real server that answers in every way.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db.models import Sum
from django.utils import timezone

from listdelivery import progress
from listdelivery.admin import discard_posts, retry_posts
from listdelivery.models import (
    DeliveryAttempt,
    DeliveryHour,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
    RunnerPass,
)
from listdelivery.testing import SMTPTestServer

from .conftest import deliver_pending, make_due, queue_post, run, subprocess_environment

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status
COUNTERS = ("recipient_count", "sent_count", "deferred_count", "bounced_count", "failed_count")


def counters(row: OutgoingMessage) -> dict[str, int]:
    row.refresh_from_db()
    return {name: getattr(row, name) for name in COUNTERS}


def counted(row: OutgoingMessage) -> dict[str, int]:
    return progress.count_fields(progress.count(row))


def hour_totals() -> dict[str, int]:
    sums = DeliveryHour.objects.aggregate(
        sent=Sum("sent"), bounced=Sum("bounced"), failed=Sum("failed")
    )
    return {name: value or 0 for name, value in sums.items()}


def answered() -> dict[str, int]:
    """The hourly totals as the recipients say, an administrator's cancels aside."""
    done = OutgoingRecipient.objects.exclude(smtp_message__startswith="discarded by")
    return {
        "sent": done.filter(status=RStatus.SENT).count(),
        "bounced": done.filter(status=RStatus.BOUNCED).count(),
        "failed": done.filter(status=RStatus.FAILED).count(),
    }


@pytest.mark.django_db
def test_counters_and_hourly_totals_follow_every_kind_of_answer(
    deliver_to, smtpd, mlist, first_post
):
    deliver_to(MAX_RECIPIENTS=2)
    smtpd.fail_rcpt = {
        "aperson@example.com": "550 5.1.1 No such user",
        "bperson@example.com": "450 4.2.0 Mailbox busy",
    }
    row = queue_post(
        mlist,
        first_post,
        {"recipients": [*mlist.members.values_list("address", flat=True), "no domain"]},
    )
    assert counters(row) == {**counted(row), "failed_count": 1}  # the invalid address, at enqueue

    run()
    assert (
        counters(row)
        == counted(row)
        == {
            "recipient_count": 4,
            "sent_count": 1,
            "deferred_count": 1,
            "bounced_count": 1,
            "failed_count": 1,
        }
    )
    assert hour_totals() == answered() == {"sent": 1, "bounced": 1, "failed": 1}
    assert row.status == Status.RETRY and row.rate is None and row.finish_estimate is None

    smtpd.fail_rcpt = {}
    make_due(row)
    run()
    assert counters(row)["sent_count"] == 2 and counters(row) == counted(row)
    assert hour_totals() == answered() == {"sent": 2, "bounced": 1, "failed": 1}

    first, second = DeliveryAttempt.objects.filter(message=row).order_by("number")
    assert (first.number, first.accepted, first.deferred, first.bounced, first.outcome) == (
        1,
        1,
        1,
        1,
        Status.RETRY,
    )
    assert "5.1.1 No such user" in first.first_error
    assert (second.number, second.accepted, second.deferred, second.outcome) == (
        2,
        1,
        0,
        "delivered",
    )
    assert second.first_error == "" and second.transactions == 1
    assert first.runner == second.runner and ":" in first.runner


@pytest.mark.django_db
def test_a_cancel_is_not_a_failure_in_the_totals_and_a_retry_of_a_failed_post_recounts(
    deliver_to, smtpd, mlist, first_post
):
    row = queue_post(mlist, first_post)
    assert discard_posts(OutgoingMessage.objects.filter(pk=row.pk), "admin") == 1
    assert counters(row)["failed_count"] == 3
    assert hour_totals() == {"sent": 0, "bounced": 0, "failed": 0}

    failed = queue_post(mlist, first_post)
    smtpd.fail_rcpt = {"cperson@example.com": "450 4.2.0 Mailbox busy"}
    run()
    OutgoingMessage.objects.filter(pk=failed.pk).update(
        next_attempt_at=timezone.now(), deliver_until=timezone.now() - timedelta(seconds=1)
    )
    run()
    failed.refresh_from_db()
    assert failed.status == Status.FAILED
    assert counters(failed) == counted(failed) and failed.failed_count == 1
    assert hour_totals()["failed"] == 1, "giving up is a failure"

    retry_posts(OutgoingMessage.objects.filter(pk=failed.pk))
    assert counters(failed) == counted(failed) and failed.failed_count == 0


@pytest.mark.django_db
def test_giving_up_keeps_the_servers_last_reply_on_the_recipient(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {"cperson@example.com": "450 4.2.0 Mailbox busy"}
    row = queue_post(mlist, first_post)
    run()
    OutgoingMessage.objects.filter(pk=row.pk).update(
        next_attempt_at=timezone.now(), deliver_until=timezone.now() - timedelta(seconds=1)
    )
    run()
    row.refresh_from_db()
    recipient = row.recipients.get(address="cperson@example.com")
    assert (recipient.status, recipient.smtp_code, recipient.smtp_message) == (
        RStatus.FAILED,
        450,
        "4.2.0 Mailbox busy",
    )
    assert "gave up" in row.last_error
    last = row.attempt_log.order_by("number").last()
    assert last.outcome == Status.FAILED and "gave up" in last.reason


@pytest.mark.django_db
def test_a_login_refused_holds_the_post_as_an_auth_problem(settings, mlist, first_post):
    with SMTPTestServer(auth=("list", "right-password")) as server:
        settings.LISTDELIVERY = {
            "SMTP_HOST": server.host,
            "SMTP_PORT": server.port,
            "SMTP_USER": "list",
            "SMTP_PASSWORD": "wrong-password",
        }
        row = queue_post(mlist, first_post)
        run()
    row.refresh_from_db()
    assert (row.status, row.problem) == (Status.HELD, "auth")
    attempt = row.attempt_log.get()
    assert attempt.outcome == Status.HELD and "535" in attempt.first_error
    assert "wrong-password" not in attempt.first_error + attempt.reason


@pytest.mark.django_db
def test_every_pass_records_when_it_finished(deliver_to, smtpd, mlist, first_post):
    before = timezone.now()
    queue_post(mlist, first_post)
    run()
    first = RunnerPass.objects.get()
    assert first.finished_at >= before and first.posts == 1
    run()  # an empty pass is a pass too
    assert RunnerPass.objects.get().posts == 0
    assert RunnerPass.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_post_being_delivered_reads_sending_with_its_progress_rate_and_finish(smtpd, mlist):
    from email import message_from_string

    mlist.personalize = Personalization.FULL
    mlist.save()
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"member{i:04d}@example.org") for i in range(300)
    )
    msg = message_from_string("From: a@example.com\nSubject: s\nMessage-ID: <p@x>\n\nHi\n")
    row = queue_post(mlist, msg)
    smtpd.delay = 0.01
    runner = deliver_pending(subprocess_environment(smtpd, CHECKPOINT_EVERY=20))
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row.refresh_from_db()
        if row.status == Status.SENDING and row.sent_count and row.rate:
            seen = (row.sent_count, row.rate, row.finish_estimate, row.is_stalled)
            break
        time.sleep(0.05)
    runner.communicate(timeout=60)
    assert seen is not None, "the post never read as sending with progress"
    sent, rate, estimate, stalled = seen
    assert 0 < sent < 303 and rate > 0 and not stalled
    assert estimate > timezone.now() - timedelta(seconds=30)
    row.refresh_from_db()
    assert row.status == Status.DELIVERED and row.sent_count == 303
    assert (row.rate, row.finish_estimate, row.progress) == (None, None, 1.0)
    assert counters(row) == counted(row)


@pytest.mark.django_db
def test_the_runner_writes_down_why_a_post_was_verped(
    admin_client, deliver_to, smtpd, mlist, first_post
):
    from django.urls import reverse

    deliver_to(VERP_DELIVERY_INTERVAL=3)
    mlist.post_id = 6
    mlist.save()
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert row.metadata["verp"] is True
    reason = "VERP_DELIVERY_INTERVAL is 3 and this was post number 6 of the list"
    assert row.metadata["verp_reason"] == reason
    page = admin_client.get(reverse("admin:listdelivery_outgoingmessage_change", args=[row.pk]))
    assert f"Yes: {reason}." in page.content.decode()
