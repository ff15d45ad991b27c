"""Small posts are written together: one transaction for the results of many posts of a claim,
with the same guarantee as a big post's checkpoints."""

from __future__ import annotations

import time
from collections import Counter
from email import message_from_string

import pytest

from listdelivery import signals
from listdelivery.admin import discard_posts
from listdelivery.models import (
    BounceEvent,
    DeliveryAttempt,
    DeliveryHour,
    OutgoingMessage,
    OutgoingRecipient,
)
from listdelivery.runner import OutgoingRunner

from .conftest import (
    FIRST_POST,
    THREE,
    deliver_pending,
    kill_when_received,
    make_due,
    queue_post,
    run,
    statuses,
    subprocess_environment,
)
from .test_guarantee import failing_inserts

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


def post(number: int):
    return message_from_string(FIRST_POST.replace("<first>", f"<post-{number}@example.com>"))


def copies_per_post(smtpd) -> Counter:
    return Counter(str(m.message["Message-ID"]) for m in smtpd.messages)


@pytest.mark.django_db
def test_twenty_small_posts_are_each_delivered_once_counted_and_announced(
    deliver_to, smtpd, mlist, django_capture_on_commit_callbacks
):
    rows = [queue_post(mlist, post(n)) for n in range(20)]
    heard = []

    def receiver(sender, signal, post, **arguments):
        heard.append(post.pk)

    signals.post_delivered.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            summary = run()
    finally:
        signals.post_delivered.disconnect(receiver)
    assert (summary.posts, summary.delivered, summary.recipients) == (20, 20, 60)
    assert set(copies_per_post(smtpd).values()) == {1} and len(smtpd.messages) == 20
    assert set(OutgoingMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}
    assert set(OutgoingMessage.objects.values_list("sent_count", flat=True)) == {3}
    assert sorted(heard) == sorted(row.pk for row in rows)
    assert DeliveryAttempt.objects.filter(outcome=Status.DELIVERED).count() == 20
    assert DeliveryHour.objects.get().sent == 60
    assert OutgoingMessage.objects.exclude(finished_at=None).count() == 20


@pytest.mark.django_db
def test_a_post_cancelled_after_it_was_sent_but_before_it_was_written_keeps_its_copies(
    deliver_to, smtpd, mlist
):
    first, second = queue_post(mlist, post(1)), queue_post(mlist, post(2))

    def administrator_cancels_the_first_once_sent(row, summary):
        if row.pk == first.pk:
            discard_posts(OutgoingMessage.objects.filter(pk=first.pk), "admin")

    OutgoingRunner(on_post=administrator_cancels_the_first_once_sent).run()
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == Status.DISCARDED and second.status == Status.DELIVERED
    assert statuses(first) == dict.fromkeys(THREE, RStatus.SENT), "the server took them"
    assert list(first.attempt_log.values_list("outcome", flat=True)) == [Status.DISCARDED]
    make_due(first)
    assert run().posts == 0
    assert len(smtpd.messages) == 2


@pytest.mark.django_db
def test_when_the_books_cannot_be_written_the_accepted_are_still_recorded_and_never_resent(
    deliver_to, smtpd, mlist
):
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.1.1 No such user"}
    rows = [queue_post(mlist, post(n)) for n in range(5)]
    with failing_inserts(BounceEvent._meta.db_table):
        run()
    for row in rows:
        row.refresh_from_db()
        assert row.status == Status.RETRY and "no space left on device" in row.last_error
        assert statuses(row)["aperson@example.com"] == RStatus.SENT
        assert statuses(row)["bperson@example.com"] == RStatus.PENDING
        make_due(row)
    smtpd.fail_rcpt = {}
    run()
    assert set(OutgoingMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}
    counts = smtpd.recipients_count()
    assert counts["aperson@example.com"] == 5 and counts["bperson@example.com"] == 5


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_runner_killed_between_two_writes_repeats_at_most_checkpoint_every_transactions(
    smtpd, mlist
):
    checkpoint, posts = 10, 150
    for n in range(posts):
        queue_post(mlist, post(n))
    smtpd.delay = 0.01
    environment = subprocess_environment(
        smtpd, CHECKPOINT_EVERY=checkpoint, CLAIM_BATCH=100, LEASE_DURATION=2
    )
    kill_when_received(deliver_pending(environment), smtpd, 45)
    time.sleep(2.2)  # its leases run out
    smtpd.delay = 0
    survivor = deliver_pending(environment)
    _, stderr = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, stderr.decode()
    per_post = copies_per_post(smtpd)
    assert len(per_post) == posts
    assert sum(n - 1 for n in per_post.values()) <= checkpoint, "more than one batch repeated"
    assert set(OutgoingMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}


@pytest.mark.django_db(transaction=True)
def test_posts_sent_but_not_yet_written_keep_their_leases_however_long_the_next_one_takes(
    deliver_to, smtpd, mlist
):
    """A lease of one second; the next post takes two. Another runner claiming meanwhile
    finds nothing: the post sent but not yet written is not sent again."""
    import threading
    from datetime import timedelta

    from django.db import connection
    from django.db.models import Q

    from listdelivery import lease

    deliver_to(LEASE_DURATION=1, CHECKPOINT_EVERY=100)
    queue_post(mlist, post(1))
    slow = queue_post(mlist, post(2), {"recipients": [f"m{i}@example.com" for i in range(5)]})
    slow.metadata["verp"] = True  # one copy per recipient: five slow transactions
    OutgoingMessage.objects.filter(pk=slow.pk).update(metadata=slow.metadata)
    smtpd.delay = 0.4
    taken = []

    def another_runner() -> None:
        time.sleep(1.6)  # past the first post's lease, while the second is being sent
        due = Q(status__in=OutgoingMessage.WAITING)
        taken.extend(lease.claim(due, 10, timedelta(seconds=1)).rows)
        connection.close()

    other = threading.Thread(target=another_runner)
    other.start()
    run()
    other.join()
    assert taken == []
    assert set(OutgoingMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}
    assert copies_per_post(smtpd)["<post-1@example.com>"] == 1
