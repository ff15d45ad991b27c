"""The lease under real processes: slow servers, a second runner, a discard, SIGKILL and chaos.

Every runner here is a real ``manage.py deliver_pending`` process on the test
database, talking to a real SMTP server whose faults the test changes while
the runners work.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from django.utils import timezone

from listdelivery.admin import discard_posts
from listdelivery.models import MailingList, Member, OutgoingMessage, Personalization
from listdelivery.pipeline import member_recipients, to_outgoing

from .conftest import deliver_pending, subprocess_environment

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
Status = OutgoingMessage.Status


def finish(process: subprocess.Popen, timeout: float = 120) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr.decode()


def personalized_post(size: int) -> OutgoingMessage:
    from email import message_from_string

    mlist = MailingList.objects.create(
        address="lease@example.com", personalize=Personalization.FULL
    )
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"member{i:05d}@example.org", display_name=f"Member {i}")
        for i in range(size)
    )
    msg = message_from_string(
        "From: a@example.com\nSubject: leased\nMessage-ID: <leased@example.com>\n\nHello\n"
    )
    msgdata: dict = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata, verp=True)


def test_a_slow_server_never_lets_a_second_runner_take_over_a_post_being_delivered(smtpd):
    """Issue 10, point 1: each DATA answered in 0.25 s, a 2 s lease, checkpoints every 20."""
    row = personalized_post(24)
    smtpd.delay = 0.25
    environment = subprocess_environment(
        smtpd, LEASE_DURATION=2, CHECKPOINT_EVERY=20, SMTP_TIMEOUT=1
    )

    first = deliver_pending(environment)
    time.sleep(2.5)  # past the lease: only the heartbeat keeps the post the first runner's
    second = deliver_pending(environment)
    finish(first)
    finish(second)

    counts = smtpd.recipients_count()
    assert len(counts) == 24
    assert set(counts.values()) == {1}, "a member got the post twice"
    row.refresh_from_db()
    assert row.status == Status.DELIVERED


def test_a_post_discarded_mid_delivery_stops_before_the_next_transaction(smtpd):
    row = personalized_post(60)
    smtpd.delay = 0.1
    environment = subprocess_environment(smtpd, LEASE_DURATION=1.5, CHECKPOINT_EVERY=100)

    runner = deliver_pending(environment)
    assert smtpd.wait_for(5, timeout=30)
    discard_posts(OutgoingMessage.objects.filter(pk=row.pk), "admin")
    at_discard = len(smtpd.messages)
    finish(runner)

    # The heartbeat (every 0.5 s) finds the lease gone; one transaction may be in flight.
    sent_after = len(smtpd.messages) - at_discard
    assert sent_after <= 0.5 / 0.1 + 2, f"{sent_after} copies went out after the discard"
    row.refresh_from_db()
    assert (row.status, row.last_error) == (Status.DISCARDED, "discarded by admin")


class Chaos:
    """Changes the server's faults at random, every few hundredths of a second, from a seed."""

    def __init__(self, smtpd, seed: int) -> None:
        self.smtpd = smtpd
        self.random = random.Random(seed)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Chaos:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        self.thread.join()
        self.smtpd.delay, self.smtpd.fail_data, self.smtpd.drop_data = 0.0, None, 0

    def _run(self) -> None:
        smtpd, pick = self.smtpd, self.random
        while not self.stopping.wait(pick.uniform(0.02, 0.1)):
            smtpd.delay = pick.choice([0.0] * 30 + [0.05, 0.3])  # stalls
            smtpd.fail_data = pick.choice([None] * 8 + ["451 4.3.0 Try again later"])
            if pick.random() < 0.05:
                smtpd.drop_data = 1  # hang up at DATA, before the message is taken


def test_chaos_every_member_receives_the_post_with_duplicates_only_from_the_kill(smtpd):
    """A 2,000-member personalized post through a server that stalls, hangs up and answers 4xx,
    with a second runner started mid-way and the first killed with SIGKILL."""
    checkpoint = 50
    row = personalized_post(2000)
    environment = subprocess_environment(
        smtpd,
        CHECKPOINT_EVERY=checkpoint,
        LEASE_DURATION=2,
        SMTP_TIMEOUT=1,
        DELIVERY_RETRY_DELAY=0,
        DELIVERY_RETRY_MAX_DELAY=0,
        SMTP_CONNECTIONS=2,
    )
    with Chaos(smtpd, seed=10):
        first = deliver_pending(environment)
        assert smtpd.wait_for(300, timeout=60)
        second = deliver_pending(environment)
        assert smtpd.wait_for(600, timeout=60)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        finish(second)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            row.refresh_from_db()
            if row.status == Status.DELIVERED:
                break
            if row.next_attempt_at and row.next_attempt_at > timezone.now():
                time.sleep(0.2)
            finish(deliver_pending(environment))

    row.refresh_from_db()
    assert row.status == Status.DELIVERED, row.last_error
    counts = smtpd.recipients_count()
    assert len(counts) == 2000, "some members never received the post"
    duplicates = Counter({a: n - 1 for a, n in counts.items() if n > 1})
    assert sum(duplicates.values()) <= checkpoint, (
        f"{sum(duplicates.values())} duplicates: more than the one batch the kill may repeat"
    )
