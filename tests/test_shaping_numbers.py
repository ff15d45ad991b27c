"""The numbers traffic shaping must reach, with real runner processes and a sink that enforces limits.

These take about a minute, so ``make test`` leaves them out (marker ``numbers``);
``.ci/run`` runs them: ``python -m pytest -m numbers``.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from email import message_from_string

import pytest
from django.utils import timezone

from listdelivery.models import (
    BounceEvent,
    LimitQuota,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from listdelivery.pipeline import member_recipients, to_outgoing
from listdelivery.testing import SMTPTestServer

from .conftest import deliver_pending, subprocess_environment

pytestmark = [pytest.mark.numbers, pytest.mark.django_db(transaction=True)]

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


def personal_post(name: str, size: int) -> OutgoingMessage:
    mlist = MailingList.objects.create(
        address=f"{name}@example.com", personalize=Personalization.FULL
    )
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"{name}{i:05d}@example.org") for i in range(size)
    )
    msg = message_from_string(f"From: a@example.com\nSubject: s\nMessage-ID: <{name}@x>\n\nHi\n")
    msgdata: dict = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata)


def runners(sink: SMTPTestServer, count: int = 2, **settings) -> list:
    # One post per claim, so that two processes deliver two posts side by side.
    settings = {"SMTP_CONNECTIONS": 2, "CHECKPOINT_EVERY": 50, "CLAIM_BATCH": 1, **settings}
    environment = subprocess_environment(sink, **settings)
    environment["LISTDELIVERY_ENQUEUE_TASKS"] = "false"
    return [deliver_pending(environment) for _ in range(count)]


def finish(processes, timeout: float = 120) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=timeout)
        assert process.returncode == 0, stderr.decode()[-3000:]


def one_copy_each(*sinks: SMTPTestServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sink in sinks:
        for message in sink.messages:
            for address in message.rcpt_tos:
                counts[address] = counts.get(address, 0) + 1
    assert set(counts.values()) == {1}, "somebody got the post twice"
    return counts


def relays_json(*relays: dict) -> str:
    return json.dumps(list(relays))


def test_a_rate_set_too_high_is_learned_from_the_servers_replies():
    with SMTPTestServer() as sink:
        sink.rate_limit = 200
        post = personal_post("wrong", 3000)
        finish(runners(sink, SMTP_RATE="300/s"))
        post.refresh_from_db()
        assert post.status == Status.DELIVERED and post.attempts == 1
        assert len(one_copy_each(sink)) == 3000
        assert not BounceEvent.objects.exists() and post.deferred_count == 0
        took = sink.messages[-1].received_at - sink.messages[0].received_at
        transactions = len(sink.messages) + sink.throttled
        print(f"\n3,000 at a 200/s sink, RATE 300/s: {took:.1f} s, {sink.throttled} throttled")
        assert took <= 1.3 * 15, f"{took:.1f} s: more than 1.3 × the 15 s the limit allows"
        assert sink.throttled < 0.1 * transactions


def test_a_rate_set_right_is_held_by_two_processes_together():
    with SMTPTestServer() as sink:
        posts = [personal_post("left", 1500), personal_post("right", 1500)]
        finish(runners(sink, SMTP_RATE="200/s"))
        for post in posts:
            post.refresh_from_db()
            assert post.status == Status.DELIVERED
        assert len(one_copy_each(sink)) == 3000
        peak, mean = sink.max_in_window(1.0), sink.mean_rate()
        print(f"\nRATE 200/s, two processes: busiest second {peak}, mean {mean:.0f}/s")
        spans = {}
        for name in ("left", "right"):
            times = [m.received_at for m in sink.messages if m.rcpt_tos[0].startswith(name)]
            spans[name] = (min(times), max(times))
        assert spans["left"][0] < spans["right"][1] and spans["right"][0] < spans["left"][1], (
            "the two processes sent at the same time"
        )
        assert peak <= 210 and mean >= 180


def test_two_relays_weighted_three_to_one_share_4000_messages():
    with SMTPTestServer() as a, SMTPTestServer() as b:
        relays = relays_json(
            {"NAME": "a", "HOST": a.host, "PORT": a.port, "WEIGHT": 3},
            {"NAME": "b", "HOST": b.host, "PORT": b.port, "WEIGHT": 1},
        )
        personal_post("shared", 4000)
        finish(runners(a, count=1, RELAYS=relays))
        assert len(one_copy_each(a, b)) == 4000
        share = len(a.messages) / 4000
        print(f"\nweights 3:1 over 4,000 messages: {share:.1%} / {1 - share:.1%}")
        assert 0.72 <= share <= 0.78


def test_a_relay_stopped_in_the_middle_hands_everything_to_the_other():
    with SMTPTestServer() as a, SMTPTestServer() as b:
        a.delay = b.delay = 0.002  # long enough to stop A half-way
        relays = relays_json(
            {"NAME": "a", "HOST": a.host, "PORT": a.port},
            {"NAME": "b", "HOST": b.host, "PORT": b.port},
        )
        post = personal_post("failover", 3000)
        processes = runners(a, count=1, RELAYS=relays)
        assert a.wait_for(500, timeout=60)
        a.stop()
        stopped = time.monotonic()
        finish(processes)
        post.refresh_from_db()
        assert post.status == Status.DELIVERED
        assert len(one_copy_each(a, b)) == 3000
        to_a_after = [m for m in a.messages if m.received_at > stopped]
        assert to_a_after == []
        print(f"\nrelay A stopped after {len(a.messages)}; B took the other {len(b.messages)}")


def test_a_session_cap_holds_across_two_processes():
    with SMTPTestServer() as sink:
        relays = relays_json(
            {"NAME": "capped", "HOST": sink.host, "PORT": sink.port, "CONNECTIONS": 2}
        )
        personal_post("one", 400)
        personal_post("two", 400)
        finish(runners(sink, RELAYS=relays, SMTP_CONNECTIONS=4))
        assert len(one_copy_each(sink)) == 800
        print(f"\nCONNECTIONS 2, two processes of 4: peak {sink.peak_connections} sessions")
        assert sink.peak_connections <= 2


def test_a_daily_quota_holds_across_a_restart_of_every_process():
    with SMTPTestServer() as sink:
        relays = relays_json({"NAME": "q", "HOST": sink.host, "PORT": sink.port, "QUOTA": 1000})
        settings = {"RELAYS": relays, "RATE_LIMIT_STORAGE": "database"}
        post = personal_post("quota", 1500)
        finish(runners(sink, **settings))
        post.refresh_from_db()
        assert len(sink.messages) == 1000
        assert post.status == Status.QUEUED and post.next_attempt_at > timezone.now()
        OutgoingMessage.objects.filter(pk=post.pk).update(next_attempt_at=timezone.now())
        finish(runners(sink, **settings))  # every process new: the quota is still used up
        assert len(sink.messages) == 1000

        yesterday = timezone.now().date() - timedelta(days=1)
        LimitQuota.objects.update(day=yesterday)  # as if the window had reopened
        OutgoingMessage.objects.filter(pk=post.pk).update(next_attempt_at=timezone.now())
        finish(runners(sink, **settings))
        post.refresh_from_db()
        assert post.status == Status.DELIVERED and len(one_copy_each(sink)) == 1500
        assert not post.recipients.exclude(status=RStatus.SENT).exists()
