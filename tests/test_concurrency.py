"""Killed runners and racing runners: every recipient gets every post, duplicates bounded."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from django.utils import timezone

from listdelivery.models import MailingList, Member, OutgoingMessage, Personalization
from listdelivery.pipeline import member_recipients, to_outgoing

from .conftest import deliver_pending, run, subprocess_environment

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def make_list(address: str, size: int, **fields) -> MailingList:
    mlist = MailingList.objects.create(address=address, **fields)
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"member{i:05d}@example.org", display_name=f"Member {i}")
        for i in range(size)
    )
    return mlist


def post(number: int):
    from email import message_from_string

    return message_from_string(
        f"From: a@example.com\nSubject: post {number}\nMessage-ID: <post-{number}@example.com>\n\nHello\n"
    )


def test_a_runner_killed_mid_post_loses_nobody_and_repeats_at_most_one_batch(settings, smtpd):
    checkpoint = 50
    mlist = make_list("crash@example.com", 2000, personalize=Personalization.FULL)
    msgdata = {}
    member_recipients(mlist, post(1), msgdata)
    row = to_outgoing(mlist, post(1), msgdata, verp=True)
    smtpd.delay = 0.002
    environment = subprocess_environment(
        smtpd, CHECKPOINT_EVERY=checkpoint, LEASE_DURATION=3, SMTP_TIMEOUT=2
    )

    runner = deliver_pending(environment)
    assert smtpd.wait_for(300, timeout=60), (
        runner.stderr.read() if runner.poll() is not None else ""
    )
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    received_before_restart = len(smtpd.messages)
    assert received_before_restart < 2000, "the runner finished before it could be killed"

    smtpd.delay = 0
    row.refresh_from_db()
    while row.leased_until and row.leased_until > timezone.now():
        time.sleep(0.2)
    settings.LISTDELIVERY = {
        "SMTP_HOST": smtpd.host,
        "SMTP_PORT": smtpd.port,
        "CHECKPOINT_EVERY": checkpoint,
    }
    run()

    counts = smtpd.recipients_count()
    members = set(Member.objects.values_list("address", flat=True))
    assert set(counts) == members, "some members never received the post"
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= checkpoint, f"{duplicates} duplicates, more than one batch of {checkpoint}"
    row.refresh_from_db()
    assert row.status == OutgoingMessage.Status.DELIVERED


@pytest.mark.parametrize("runners", [3])
def test_racing_runners_deliver_every_post_exactly_once(smtpd, runners):
    mlist = make_list("race@example.com", 5)
    recipients = set(mlist.members.values_list("address", flat=True))
    for number in range(200):
        to_outgoing(mlist, post(number), {"recipients": recipients})
    environment = subprocess_environment(smtpd, CLAIM_BATCH=5)
    smtpd.delay = 0.01  # long enough that every runner starts before the queue is empty

    processes = [deliver_pending(environment) for _ in range(runners)]
    for process in processes:
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr.decode()

    pairs = Counter((m.message["Message-ID"], r) for m in smtpd.messages for r in m.rcpt_tos)
    assert len(pairs) == 200 * 5
    assert set(pairs.values()) == {1}, "a recipient got a post twice"
    assert set(OutgoingMessage.objects.values_list("status", flat=True)) == {
        OutgoingMessage.Status.DELIVERED
    }
    assert len({m.connection for m in smtpd.messages}) >= 2, "the runners did not overlap"
