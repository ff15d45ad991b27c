"""Sharded posts: a big post is split into shards that several runners deliver at once, and it
ends, once, when its last shard ends — delivered, retried, held, failed, paused or cancelled."""

from __future__ import annotations

import time
from datetime import timedelta
from email import message_from_string

import pytest
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from listdelivery import lease, signals
from listdelivery.admin import discard_posts, pause_posts, resume_posts, retry_posts
from listdelivery.models import (
    BounceEvent,
    DeliveryAttempt,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from listdelivery.pipeline import member_recipients, to_outgoing
from listdelivery.runner import OutgoingRunner
from listdelivery.shards import NOBODY_ACCEPTED

from .conftest import deliver_pending, kill_when_received, run, subprocess_environment

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


def big_list(size: int, personalize: str = Personalization.NONE) -> MailingList:
    mlist = MailingList.objects.create(address="big@example.com", personalize=personalize)
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"member{i:05d}@example.org", display_name=f"M {i}")
        for i in range(size)
    )
    return mlist


def queue(mlist: MailingList, **extra) -> OutgoingMessage:
    msg = message_from_string(
        "From: a@example.com\nSubject: big news\nMessage-ID: <big@example.com>\n\nHello\n"
    )
    msgdata: dict = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata, **extra)


def shards_of(post: OutgoingMessage) -> list[OutgoingMessage]:
    return list(OutgoingMessage.objects.filter(parent=post).order_by("id"))


def only(post: OutgoingMessage):
    return OutgoingMessage.objects.filter(pk=post.pk)


@pytest.fixture
def heard():
    calls: list[tuple[str, int]] = []
    names = ("post_delivered", "post_failed", "post_held", "post_discarded")
    receivers = {}
    for name in names:

        def receiver(sender, signal, name=name, post=None, **arguments):
            calls.append((name, post.pk))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield calls
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


@pytest.mark.django_db
def test_a_post_to_more_than_shard_size_recipients_is_split_into_ranges_of_its_recipients(
    deliver_to,
):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(25))
    pieces = shards_of(post)
    assert post.shard_count == 3 and [p.recipient_count for p in pieces] == [10, 10, 5]
    ids = list(post.recipients.order_by("id").values_list("id", flat=True))
    assert [(p.first_recipient, p.last_recipient) for p in pieces] == [
        (ids[0], ids[9]),
        (ids[10], ids[19]),
        (ids[20], ids[24]),
    ]
    assert all(p.message == b"" and p.raw == post.raw for p in pieces), "bytes stored once"
    assert all(p.metadata["verp"] is False and "verp_reason" in p.metadata for p in pieces)
    assert sum(p.recipient_rows().count() for p in pieces) == 25
    assert list(OutgoingMessage.objects.posts()) == [post]


@pytest.mark.django_db
def test_a_post_of_shard_size_recipients_or_fewer_is_not_split(deliver_to):
    deliver_to(SHARD_SIZE=10)
    assert queue(big_list(10)).shard_count == 0
    OutgoingMessage.objects.all().delete()
    MailingList.objects.all().delete()
    deliver_to(SHARD_SIZE=0)
    assert queue(big_list(30)).shard_count == 0


@pytest.mark.django_db
def test_a_sharded_post_is_delivered_once_to_everyone_and_announced_once(
    deliver_to, smtpd, heard, django_capture_on_commit_callbacks
):
    deliver_to(SHARD_SIZE=10, MAX_RECIPIENTS=4)
    post = queue(big_list(25))
    with django_capture_on_commit_callbacks(execute=True):
        summary = run()
    assert summary.posts == 0 and summary.shards == 3 and summary.delivered == 1
    counts = smtpd.recipients_count()
    assert len(counts) == 25 and set(counts.values()) == {1}
    post.refresh_from_db()
    assert post.status == Status.DELIVERED and post.finished_at is not None
    assert (post.recipient_count, post.sent_count, post.open_count) == (25, 25, 0)
    assert post.leased_until is None and post.rate is None
    assert {s.status for s in shards_of(post)} == {Status.DELIVERED}
    assert heard == [("post_delivered", post.pk)]
    assert DeliveryAttempt.objects.filter(message__parent=post).count() == 3


@pytest.mark.django_db
def test_a_claim_takes_one_shard_and_leaves_the_others_to_other_runners(deliver_to):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(35))
    first = lease.claim(Q(status__in=OutgoingMessage.WAITING), 20, timedelta(minutes=5))
    second = lease.claim(Q(status__in=OutgoingMessage.WAITING), 20, timedelta(minutes=5))
    assert [r.parent_id for r in first.rows] == [post.pk]
    assert [r.parent_id for r in second.rows] == [post.pk]
    assert first.rows[0].pk != second.rows[0].pk
    post.refresh_from_db()
    assert post.status == Status.SENDING and post.leased_until is not None
    assert post.sending_since is not None, "the post's page says since when it is sent"
    assert post.lease_token == "", "the post itself is never claimed"


@pytest.mark.django_db
def test_a_shard_is_the_unit_of_retry_for_its_recipients(deliver_to, smtpd):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(25))
    smtpd.fail_rcpt = {"member00012@example.org": "450 4.2.0 Mailbox busy"}
    run()
    pieces = shards_of(post)
    assert [p.status for p in pieces] == [Status.DELIVERED, Status.RETRY, Status.DELIVERED]
    post.refresh_from_db()
    assert post.status == Status.RETRY and post.deferred_count == 1 and post.sent_count == 24
    assert post.next_attempt_at == pieces[1].next_attempt_at

    smtpd.clear()
    OutgoingMessage.objects.filter(pk=pieces[1].pk).update(next_attempt_at=timezone.now())
    run()
    assert [m.rcpt_tos for m in smtpd.messages] == [["member00012@example.org"]]
    post.refresh_from_db()
    assert post.status == Status.DELIVERED and post.sent_count == 25


@pytest.mark.django_db
def test_a_shard_checkpoint_that_cannot_be_saved_records_the_accepted_and_resends_nobody(
    deliver_to, smtpd
):
    """A full disk when a shard writes its refusals: the accepted are recorded anyway, the
    shard retries, and the post ends delivered with one copy each."""
    from .test_guarantee import failing_inserts

    deliver_to(SHARD_SIZE=10, MAX_RECIPIENTS=3)
    post = queue(big_list(25))
    smtpd.fail_rcpt = {"member00012@example.org": "550 5.1.1 No such user"}
    with failing_inserts(BounceEvent._meta.db_table):
        run()
    second = shards_of(post)[1]
    assert second.status == Status.RETRY and "no space left on device" in second.last_error
    sent = second.recipient_rows().filter(status=RStatus.SENT).count()
    assert sent == 9, "everyone the server accepted is recorded"
    OutgoingMessage.objects.filter(pk=second.pk).update(next_attempt_at=timezone.now())
    run()
    post.refresh_from_db()
    assert post.status == Status.DELIVERED
    assert (post.sent_count, post.bounced_count) == (24, 1)
    counts = smtpd.recipients_count()  # what the server accepted: the refused one is not in it
    assert len(counts) == 24 and set(counts.values()) == {1}


@pytest.mark.django_db
def test_a_shard_nobody_accepted_does_not_fail_a_post_others_delivered(
    deliver_to, smtpd, heard, django_capture_on_commit_callbacks
):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(25))
    smtpd.fail_rcpt = {
        f"member{i:05d}@example.org": "550 5.1.1 No such user" for i in range(20, 25)
    }
    with django_capture_on_commit_callbacks(execute=True):
        run()
    pieces = shards_of(post)
    assert pieces[2].status == Status.FAILED and pieces[2].last_error == NOBODY_ACCEPTED
    post.refresh_from_db()
    assert post.status == Status.DELIVERED and post.bounced_count == 5
    assert heard == [("post_delivered", post.pk)]


@pytest.mark.django_db
def test_a_post_fails_when_a_shard_gives_up_and_is_announced_once(
    deliver_to, smtpd, heard, django_capture_on_commit_callbacks
):
    deliver_to(SHARD_SIZE=10, DELIVERY_RETRY_PERIOD=1)
    post = queue(big_list(25))
    smtpd.fail_rcpt = {"member00003@example.org": "450 4.2.0 Mailbox busy"}
    run()
    first = shards_of(post)[0]
    earlier = timezone.now() - timedelta(seconds=5)
    OutgoingMessage.objects.filter(pk=first.pk).update(
        next_attempt_at=earlier, deliver_until=earlier
    )
    with django_capture_on_commit_callbacks(execute=True):
        run()
    post.refresh_from_db()
    assert post.status == Status.FAILED and "gave up" in post.last_error
    assert (post.sent_count, post.failed_count) == (24, 1)
    assert heard == [("post_failed", post.pk)]


@pytest.mark.django_db
def test_a_held_sharded_post_is_announced_once_and_an_administrators_retry_delivers_it(
    deliver_to, smtpd, heard, django_capture_on_commit_callbacks
):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(25))
    smtpd.fail_data = "554 5.7.1 Message content rejected"
    with django_capture_on_commit_callbacks(execute=True):
        run()
    post.refresh_from_db()
    assert post.status == Status.HELD and post.next_attempt_at is None
    assert post.problem == "content" and "content rejected" in post.last_error
    assert heard == [("post_held", post.pk)]
    assert {s.status for s in shards_of(post)} == {Status.HELD}

    smtpd.fail_data = None
    assert retry_posts(only(post)) == 1
    assert {s.status for s in shards_of(post)} == {Status.RETRY}
    run()
    post.refresh_from_db()
    assert post.status == Status.DELIVERED
    assert set(smtpd.recipients_count().values()) == {1} and len(smtpd.recipients_count()) == 25


@pytest.mark.django_db
def test_pause_resume_and_cancel_cover_every_shard(deliver_to, smtpd, heard):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(25))
    assert pause_posts(only(post)) == 1
    assert {s.status for s in shards_of(post)} == {Status.PAUSED}
    assert run().shards == 0 and smtpd.messages == []
    post.refresh_from_db()
    assert post.status == Status.PAUSED

    assert resume_posts(only(post)) == 1
    post.refresh_from_db()
    assert post.status == Status.QUEUED
    assert {s.status for s in shards_of(post)} == {Status.QUEUED}

    second = queue(MailingList.objects.get(address="big@example.com"))
    assert discard_posts(only(second), "admin") == 1
    second.refresh_from_db()
    assert second.status == Status.DISCARDED and second.failed_count == 25
    assert {s.status for s in shards_of(second)} == {Status.DISCARDED}
    assert {s.failed_count for s in shards_of(second)} == {10, 5}
    run()
    post.refresh_from_db()
    assert post.status == Status.DELIVERED
    assert len(smtpd.recipients_count()) == 25, "nothing of the cancelled post went out"


@pytest.mark.django_db
def test_checkpoints_of_a_shard_roll_its_progress_up_into_the_post(deliver_to, smtpd):
    """What the post's page shows while shards are on their way."""
    deliver_to(SHARD_SIZE=10, CHECKPOINT_EVERY=1)
    post = queue(big_list(25))
    OutgoingRunner(limit=1).run()
    post.refresh_from_db()
    assert post.status == Status.QUEUED and post.sent_count == 10
    assert post.pending_count == 15


@pytest.mark.django_db
def test_the_admin_lists_posts_not_shards_and_shows_a_posts_shards(admin_client, deliver_to):
    deliver_to(SHARD_SIZE=10)
    post = queue(big_list(25))
    page = admin_client.get(reverse("admin:listdelivery_outgoingmessage_changelist"))
    assert page.status_code == 200
    assert page.context["cl"].result_count == 1
    page = admin_client.get(reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk]))
    assert page.status_code == 200
    assert b"Shards" in page.content and b"Split into 3 shards" in page.content


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_two_processes_deliver_one_big_post_together(smtpd):
    size = 5000
    post = queue(big_list(size, Personalization.FULL))
    environment = subprocess_environment(smtpd, SHARD_SIZE=1000)
    smtpd.delay = 0.001  # five seconds for one process alone, whatever the machine's load
    runners = [deliver_pending(environment), deliver_pending(environment)]
    for runner in runners:
        _, stderr = runner.communicate(timeout=120)
        assert runner.returncode == 0, stderr.decode()
    post.refresh_from_db()
    assert post.status == Status.DELIVERED and post.sent_count == size
    counts = smtpd.recipients_count()
    assert len(counts) == size and set(counts.values()) == {1}
    names = DeliveryAttempt.objects.filter(message__parent=post).values_list("runner", flat=True)
    assert len(set(names)) == 2, "one process found nothing to do"


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_runner_killed_in_a_shard_repeats_at_most_one_batch(smtpd):
    checkpoint, size = 20, 3000
    post = queue(big_list(size, Personalization.FULL))
    environment = subprocess_environment(
        smtpd, CHECKPOINT_EVERY=checkpoint, LEASE_DURATION=2, SHARD_SIZE=1000
    )
    kill_when_received(deliver_pending(environment), smtpd, 500)
    # Its checkpoints moved the post's counters with the shard's, in the same transactions.
    post.refresh_from_db()
    assert post.sent_count == sum(post.shards.values_list("sent_count", flat=True)) > 0
    assert post.sent_count == post.recipients.filter(status=RStatus.SENT).count()
    assert post.status == Status.SENDING and post.rate > 0
    time.sleep(2.2)  # its lease runs out
    post.refresh_from_db()
    assert post.is_stalled, "the post's page and health say its runner stopped"
    survivor = deliver_pending(environment)
    _, stderr = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, stderr.decode()
    post.refresh_from_db()
    assert post.status == Status.DELIVERED and post.sent_count == size
    counts = smtpd.recipients_count()
    assert len(counts) == size
    assert sum(n - 1 for n in counts.values()) <= checkpoint, "more than one batch repeated"


@pytest.mark.django_db
def test_a_claim_of_posts_stops_before_their_recipients_pass_the_shard_size(deliver_to):
    """Small posts go many to a claim; bigger ones are left for other runners to take."""
    deliver_to(SHARD_SIZE=10)
    posts = [queue(list_of(f"claim{i}", size)) for i, size in enumerate([3, 3, 3, 4, 2, 1])]
    waiting = Q(status__in=OutgoingMessage.WAITING)

    first = lease.claim(waiting, 50, timedelta(minutes=5), recipients=10)
    second = lease.claim(waiting, 50, timedelta(minutes=5), recipients=10)
    unbounded = lease.claim(waiting, 50, timedelta(minutes=5))

    assert [r.pk for r in first.rows] == [p.pk for p in posts[:3]]  # 9 recipients; 13 would pass
    assert [r.pk for r in second.rows] == [p.pk for p in posts[3:6]]  # 4 + 2 + 1
    assert unbounded.rows == []


@pytest.mark.django_db
def test_a_post_bigger_than_the_bound_is_still_claimed_alone(deliver_to):
    deliver_to(SHARD_SIZE=0)  # never split: the post is one row of 12 recipients
    big = queue(list_of("big", 12))
    small = queue(list_of("small", 2))

    first = lease.claim(Q(status__in=OutgoingMessage.WAITING), 50, timedelta(minutes=5), 10)
    second = lease.claim(Q(status__in=OutgoingMessage.WAITING), 50, timedelta(minutes=5), 10)

    assert [r.pk for r in first.rows] == [big.pk]
    assert [r.pk for r in second.rows] == [small.pk]


def list_of(name: str, size: int) -> MailingList:
    mlist = MailingList.objects.create(address=f"{name}@example.com")
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"m{i}@example.org") for i in range(size)
    )
    return mlist
