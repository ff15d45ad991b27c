"""Real django-q2 clusters (``manage.py qcluster`` subprocesses) delivering posts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import Schedule, Success

from listdelivery.models import OutgoingMessage
from listdelivery.tasks import SWEEP_SCHEDULE

from .conftest import queue_post, subprocess_environment
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
    bound = workers * min(checkpoint * per_transaction, members)
    assert duplicates <= bound, (
        f"{duplicates} duplicates, more than one batch per killed worker ({bound})"
    )
