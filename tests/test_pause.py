"""Pause, resume and cancel, exactly: a paused post sends nothing more, a resumed one goes on
where it stopped, and nobody gets a copy twice."""

from __future__ import annotations

import os
import random
import signal
import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from listdelivery import progress
from listdelivery.admin import discard_posts, pause_posts, resume_posts
from listdelivery.models import (
    DeliveryAttempt,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from listdelivery.pipeline import member_recipients, to_outgoing

from .conftest import THREE, deliver_pending, queue_post, run, subprocess_environment

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


def only(row: OutgoingMessage):
    return OutgoingMessage.objects.filter(pk=row.pk)


@pytest.mark.django_db
def test_a_paused_post_is_never_claimed_and_a_resumed_one_is_delivered(
    deliver_to, smtpd, mlist, first_post
):
    row = queue_post(mlist, first_post)
    assert pause_posts(only(row)) == 1
    assert run().posts == 0
    row.refresh_from_db()
    assert row.status == Status.PAUSED and smtpd.messages == []

    assert resume_posts(only(row)) == 1
    row.refresh_from_db()
    assert row.status == Status.QUEUED and row.next_attempt_at <= timezone.now()
    run()
    assert smtpd.recipients_count() == dict.fromkeys(THREE, 1)


@pytest.mark.django_db
def test_a_paused_post_is_never_given_up_and_resumes_with_a_fresh_retry_period(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {"bperson@example.com": "450 4.2.0 Mailbox busy"}
    row = queue_post(mlist, first_post)
    run()
    pause_posts(only(row))
    # Long past the retry deadline, the paused post is still paused, not failed.
    only(row).update(deliver_until=timezone.now() - timedelta(days=30))
    assert run().posts == 0
    row.refresh_from_db()
    assert row.status == Status.PAUSED

    smtpd.fail_rcpt = {}
    resume_posts(only(row))
    row.refresh_from_db()
    assert (row.status, row.deliver_until) == (Status.RETRY, None)
    run()
    assert smtpd.recipients_count() == dict.fromkeys(THREE, 1)


@pytest.mark.django_db
def test_the_admin_actions_pause_and_resume_posts_and_whole_lists(
    admin_client, deliver_to, smtpd, mlist, first_post
):
    row = queue_post(mlist, first_post)
    changelist = reverse("admin:listdelivery_outgoingmessage_changelist")
    response = admin_client.post(
        changelist, {"action": "pause", "_selected_action": [row.pk]}, follow=True
    )
    assert "1 post was paused." in response.content.decode()
    row.refresh_from_db()
    assert row.status == Status.PAUSED

    lists = reverse("admin:listdelivery_mailinglist_changelist")
    response = admin_client.post(
        lists, {"action": "resume", "_selected_action": [mlist.pk]}, follow=True
    )
    assert "1 post was resumed." in response.content.decode()
    admin_client.post(lists, {"action": "pause", "_selected_action": [mlist.pk]})
    row.refresh_from_db()
    assert row.status == Status.PAUSED

    assert discard_posts(only(row), "admin") == 1, "a paused post can be cancelled"
    row.refresh_from_db()
    assert row.status == Status.DISCARDED
    assert resume_posts(only(row)) == 0


def personalized_list(size: int) -> MailingList:
    mlist = MailingList.objects.create(
        address="paused@example.com", personalize=Personalization.FULL
    )
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"member{i:05d}@example.org") for i in range(size)
    )
    return mlist


def big_post(size: int) -> OutgoingMessage:
    from email import message_from_string

    mlist = personalized_list(size)
    msg = message_from_string("From: a@example.com\nSubject: big\nMessage-ID: <big@x>\n\nHello\n")
    msgdata: dict = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata)


def wait_for_exit(process, timeout: float = 60) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode in (0, -signal.SIGKILL), stderr.decode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_pause_mid_post_stops_the_sending_within_two_seconds_and_resume_finishes_it(smtpd):
    row = big_post(3000)
    smtpd.delay = 0.005
    # The default 5-minute lease, and batches so large that no checkpoint comes in time:
    # only the heartbeat's read of the row can see the pause.
    environment = subprocess_environment(smtpd, CHECKPOINT_EVERY=2500)
    runner = deliver_pending(environment)
    assert smtpd.wait_for(200, timeout=60)

    pause_posts(only(row))
    paused_at = time.monotonic()
    time.sleep(2)
    received = len(smtpd.messages)
    wait_for_exit(runner)
    assert len(smtpd.messages) == received, "copies went out more than 2 s after the pause"
    assert time.monotonic() - paused_at < 10
    row.refresh_from_db()
    assert row.status == Status.PAUSED and received < 3000

    resume_posts(only(row))
    smtpd.delay = 0
    wait_for_exit(deliver_pending(environment))
    row.refresh_from_db()
    assert row.status == Status.DELIVERED
    counts = smtpd.recipients_count()
    assert len(counts) == 3000 and set(counts.values()) == {1}


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_twenty_pause_and_resume_cycles_and_a_kill_give_every_member_one_copy(smtpd):
    """After the cycles every member has exactly one copy; the kill -9 may repeat only the one
    batch it had in flight (the guarantee's bound), never anything because of a pause."""
    checkpoint = 50
    size = 20_000
    row = big_post(size)
    environment = subprocess_environment(smtpd, CHECKPOINT_EVERY=checkpoint, LEASE_DURATION=2)
    pick = random.Random(12)
    killed_with = None
    for cycle in range(20):
        sent = len(smtpd.messages)
        runner = deliver_pending(environment)
        assert smtpd.wait_for(sent + 1, timeout=30), "the runner sent nothing"
        time.sleep(pick.uniform(0.0, 0.5))  # so that every pause meets a runner at work
        if cycle == 10:
            killed_with = len(smtpd.messages)
            os.kill(runner.pid, signal.SIGKILL)
            wait_for_exit(runner)
            time.sleep(2.2)  # the dead runner's lease runs out
            continue
        pause_posts(only(row))
        wait_for_exit(runner)
        resume_posts(only(row))
    wait_for_exit(deliver_pending(environment), timeout=120)

    row.refresh_from_db()
    assert row.status == Status.DELIVERED, row.last_error
    counts = smtpd.recipients_count()
    assert len(counts) == size, "some members never received the post"
    duplicates = sum(n - 1 for n in counts.values())
    assert killed_with is not None and killed_with < size, "the kill came after the end"
    assert duplicates <= checkpoint, f"{duplicates} duplicates: more than the killed batch"
    # The counters the page shows match the recipients, and the history tells the story:
    # the pauses, and one attempt that left no record (the killed runner's).
    assert (row.recipient_count, row.sent_count, row.open_count) == (size, size, 0)
    assert progress.count(row) == {RStatus.SENT: size}
    # The post went out in shards (SHARD_SIZE): the history is the shards'.
    assert row.shard_count == 8
    attempts = DeliveryAttempt.objects.filter(message__parent=row).order_by("finished_at", "id")
    outcomes = list(attempts.values_list("outcome", flat=True))
    assert outcomes.count(Status.PAUSED) >= 17 and outcomes[-1] == Status.DELIVERED
    tried = sum(row.shards.values_list("attempts", flat=True))
    assert tried - len(outcomes) >= 1, "the killed runner's attempt has no record"
