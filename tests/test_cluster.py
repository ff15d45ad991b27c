"""Real django-q2 clusters (``manage.py qcluster`` subprocesses) delivering posts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from email import message_from_string
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import Schedule, Success, Task

from listdelivery.models import OutgoingMessage
from listdelivery.tasks import SWEEP_SCHEDULE

from .conftest import FIRST_POST, queue_post, subprocess_environment
from .test_concurrency import make_list, post

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def start_cluster(environment: dict[str, str]) -> subprocess.Popen:
    """``manage.py qcluster`` in its own process group, so a kill reaches its workers too."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=environment,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_cluster(cluster: subprocess.Popen) -> int:
    """Stop gracefully, by the PID, as an operator would (SIGTERM)."""
    os.kill(cluster.pid, signal.SIGTERM)
    try:
        return cluster.wait(timeout=30)
    finally:
        if cluster.poll() is None:
            os.killpg(cluster.pid, signal.SIGKILL)


def cluster_environment(smtpd, **listdelivery) -> dict[str, str]:
    environment = subprocess_environment(smtpd, **listdelivery)
    environment["Q_CLUSTER_NAME"] = settings.Q_CLUSTER["name"]
    return environment


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(autouse=True)
def empty_queue():
    get_broker().purge_queue()


def test_qcluster_delivers_a_queued_post_within_seconds(smtpd, mlist, first_post):
    cluster = start_cluster(cluster_environment(smtpd))
    try:
        row = queue_post(mlist, first_post)
        assert smtpd.wait_for(1, timeout=30), "the cluster did not deliver the post"
        task_name = f"deliver post {row.pk}"
        assert wait_until(lambda: Success.objects.filter(name=task_name).exists(), 15)
    finally:
        code = stop_cluster(cluster)

    assert smtpd.messages[0].rcpt_tos == [
        "aperson@example.com",
        "bperson@example.com",
        "cperson@example.com",
    ]
    assert smtpd.messages[0].mail_from == "test-bounces@example.com"
    row.refresh_from_db()
    assert row.status == OutgoingMessage.Status.DELIVERED
    assert code == 0, cluster.stderr.read().decode()
    result = Success.objects.get(name=task_name).result  # what django-q2's admin shows
    assert (result["posts"], result["delivered"], result["recipients"]) == (1, 1, 3)


@pytest.mark.long  # django-q2's scheduler looks every 30 seconds
def test_the_sweep_schedule_delivers_a_retry_when_its_time_comes(smtpd, mlist, first_post):
    smtpd.fail_rcpt = {"cperson@example.com": "450 4.2.0 Mailbox busy"}
    cluster = start_cluster(cluster_environment(smtpd, DELIVERY_RETRY_DELAY=1))
    try:
        row = queue_post(mlist, first_post)
        assert wait_until(lambda: OutgoingMessage.objects.get(pk=row.pk).status == "retry", 30)
        assert smtpd.recipients_count() == {"aperson@example.com": 1, "bperson@example.com": 1}
        smtpd.fail_rcpt = {}
        assert Schedule.objects.filter(
            name=SWEEP_SCHEDULE, next_run__lte=timezone.now() + timezone.timedelta(minutes=1)
        ).exists()
        # django-q2's scheduler looks for due schedules every 30 seconds.
        assert smtpd.wait_for(2, timeout=90), "the schedule did not retry the post"
    finally:
        stop_cluster(cluster)

    assert smtpd.recipients_count()["cperson@example.com"] == 1
    row.refresh_from_db()
    assert row.status == OutgoingMessage.Status.DELIVERED


def test_the_sweep_delivers_without_filling_the_task_history(settings, smtpd, mlist, first_post):
    """One stored success a minute would push the site's own tasks out of save_limit."""
    from django_q.scheduler import scheduler

    settings.LISTDELIVERY = {"ENQUEUE_TASKS": False}
    swept = queue_post(mlist, first_post)  # no task: only the sweep can deliver it
    Schedule.objects.filter(name=SWEEP_SCHEDULE).update(
        next_run=timezone.now() - timezone.timedelta(minutes=1)
    )
    scheduler(broker=get_broker())  # what the cluster's scheduler does every 30 seconds
    sweep_task = Schedule.objects.get(name=SWEEP_SCHEDULE).task
    cluster = start_cluster(cluster_environment(smtpd))
    try:
        assert smtpd.wait_for(1, timeout=30), "the sweep did not deliver the post"
        settings.LISTDELIVERY = {}
        queued = queue_post(mlist, message_from_string(FIRST_POST.replace("<first>", "<second>")))
        task_name = f"deliver post {queued.pk}"
        assert wait_until(lambda: Success.objects.filter(name=task_name).exists(), 30)
    finally:
        stop_cluster(cluster)

    swept.refresh_from_db()
    assert swept.status == OutgoingMessage.Status.DELIVERED
    assert sweep_task and not Task.objects.filter(id=sweep_task).exists()
    assert list(Task.objects.values_list("name", flat=True)) == [task_name]


def test_a_cluster_of_our_own_delivers_our_posts(settings, smtpd, mlist, first_post):
    settings.LISTDELIVERY = {"Q_CLUSTER": "deliveries"}
    get_broker("deliveries").purge_queue()
    environment = cluster_environment(smtpd, Q_CLUSTER="deliveries")
    environment["Q_CLUSTER_NAME"] = "deliveries"
    cluster = start_cluster(environment)
    try:
        row = queue_post(mlist, first_post)
        task_name = f"deliver post {row.pk}"
        assert wait_until(lambda: Success.objects.filter(name=task_name).exists(), 30)
    finally:
        stop_cluster(cluster)

    assert Success.objects.get(name=task_name).cluster == "deliveries"
    assert smtpd.recipients_count() == {
        "aperson@example.com": 1,
        "bperson@example.com": 1,
        "cperson@example.com": 1,
    }


def test_a_pass_longer_than_the_sites_task_timeout_runs_to_its_end(smtpd, mlist, first_post):
    """Under ``timeout 2, retry 4`` a 7-second pass is not stopped, and nothing is sent twice.

    At 4 seconds the broker hands the task out again to the second worker: that copy
    finds the post leased and delivers nothing.
    """
    smtpd.delay = 2.5  # per transaction, one recipient each: 7.5 seconds for the post
    environment = cluster_environment(smtpd, MAX_RECIPIENTS=1)
    environment.update(Q_TIMEOUT="2", Q_RETRY="4")
    cluster = start_cluster(environment)
    try:
        row = queue_post(mlist, first_post)
        delivered = lambda: OutgoingMessage.objects.get(pk=row.pk).status == "delivered"  # noqa: E731
        assert wait_until(delivered, 40), "the post was not delivered"
    finally:
        stop_cluster(cluster)

    task = Task.objects.get(name=f"deliver post {row.pk}")
    assert task.success, task.result  # not "Task exceeded maximum timeout value (2 seconds)"
    assert smtpd.recipients_count() == {
        "aperson@example.com": 1,
        "bperson@example.com": 1,
        "cperson@example.com": 1,
    }


@pytest.mark.skipif(
    connection.vendor != "postgresql" or settings.Q_BROKER != "redis",
    reason="needs PostgreSQL (DATABASE_URL) and the Redis broker (Q_BROKER=redis); .ci/run sets both",
)
def test_two_clusters_on_postgresql_and_redis_survive_one_being_killed(smtpd):
    members, posts, workers, checkpoint, per_transaction = 50, 200, 2, 100, 10
    mlist = make_list("scale@example.com", members)
    recipients = set(mlist.members.values_list("address", flat=True))
    smtpd.delay = 0.02
    environment = cluster_environment(
        smtpd,
        LEASE_DURATION=3,
        SMTP_TIMEOUT=2,
        CLAIM_BATCH=2,
        CHECKPOINT_EVERY=checkpoint,
        MAX_RECIPIENTS=per_transaction,
    )
    environment["Q_WORKERS"] = str(workers)
    doomed, survivor = start_cluster(environment), start_cluster(environment)
    try:
        from listdelivery.pipeline import to_outgoing

        for number in range(posts):
            to_outgoing(mlist, post(number), {"recipients": recipients})
        assert smtpd.wait_for(posts * members // per_transaction // 2, timeout=60)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        expected = posts * members
        delivered = lambda: sum(len(m.rcpt_tos) for m in smtpd.messages) >= expected  # noqa: E731
        assert wait_until(
            lambda: (
                delivered() and not OutgoingMessage.objects.exclude(status="delivered").exists()
            ),
            150,
        ), f"{sum(len(m.rcpt_tos) for m in smtpd.messages)} of {expected} deliveries"
    finally:
        stop_cluster(survivor)
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)

    pairs = Counter((m.message["Message-ID"], r) for m in smtpd.messages for r in m.rcpt_tos)
    assert len(pairs) == expected, "some member missed some post"
    duplicates = sum(n - 1 for n in pairs.values())
    # Per killed worker: one batch of a post, or the small posts sent but not yet written
    # (as many recipients as CHECKPOINT_EVERY at most).
    bound = workers * max(min(checkpoint * per_transaction, members), checkpoint)
    assert duplicates <= bound, (
        f"{duplicates} duplicates, more than one batch per killed worker ({bound})"
    )


def test_two_workers_of_one_cluster_deliver_one_big_post_together(settings, smtpd):
    """Q_WORKERS=2: the post's shards go to both workers, as the tasks queued with it ask."""
    from listdelivery.models import DeliveryAttempt, Personalization

    from .test_shards import big_list, queue

    settings.LISTDELIVERY = {"SMTP_HOST": smtpd.host, "SMTP_PORT": smtpd.port, "SHARD_SIZE": 1000}
    environment = cluster_environment(smtpd, SHARD_SIZE=1000)
    environment["Q_WORKERS"] = "2"
    smtpd.delay = 0.001  # at least five seconds for one worker alone: the other has time to join
    cluster = start_cluster(environment)
    try:
        post_row = queue(big_list(5000, Personalization.FULL))
        assert post_row.shard_count == 5
        assert smtpd.wait_for(5000, timeout=90), "the cluster did not deliver the post"
        assert wait_until(
            lambda: OutgoingMessage.objects.filter(
                pk=post_row.pk, status=OutgoingMessage.Status.DELIVERED
            ).exists(),
            30,
        )
    finally:
        code = stop_cluster(cluster)
    assert code == 0, cluster.stderr.read().decode()
    counts = Counter(smtpd.recipients_count())
    assert len(counts) == 5000 and set(counts.values()) == {1}
    runners = DeliveryAttempt.objects.filter(message__parent=post_row).values_list(
        "runner", flat=True
    )
    assert len(set(runners)) == 2, "one worker found nothing to do"
