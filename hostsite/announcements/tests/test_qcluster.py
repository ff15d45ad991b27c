"""The site's own ``manage.py qcluster`` delivers posts and still runs the site's own tasks."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from django.db import connection
from django.test import TransactionTestCase
from django_q.tasks import async_task, result
from listdelivery.models import OutgoingMessage
from listdelivery.testing import SMTPTestServer

from ..publishing import publish
from . import deliver_to, make_announcement, make_list

MANAGE_PY = Path(__file__).resolve().parents[2] / "manage.py"


def start_cluster(server: SMTPTestServer, log) -> subprocess.Popen:
    """``manage.py qcluster`` on the test database, in its own process group."""
    environment = {
        **os.environ,
        "HOSTSITE_DATABASE": str(connection.settings_dict["NAME"]),
        "HOSTSITE_SMTP_HOST": server.host,
        "HOSTSITE_SMTP_PORT": str(server.port),
    }
    return subprocess.Popen(
        [sys.executable, str(MANAGE_PY), "qcluster"],
        env=environment,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_cluster(cluster: subprocess.Popen) -> int:
    """SIGTERM, as systemd stops it; SIGKILL to the whole group only if it hangs."""
    os.kill(cluster.pid, signal.SIGTERM)
    try:
        return cluster.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait()
        return -signal.SIGKILL


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


class QclusterTests(TransactionTestCase):
    def test_the_sites_cluster_delivers_an_announcement_and_runs_its_own_tasks(self):
        announcement = make_announcement(make_list())
        with (
            SMTPTestServer() as server,
            deliver_to(server),
            tempfile.TemporaryFile("w+") as log,
        ):
            cluster = start_cluster(server, log)
            try:
                post = publish(announcement)  # committed: its task goes to the broker
                own_task = async_task("announcements.tasks.count_words", announcement.pk)
                delivered = server.wait_for(1, timeout=60)
                words = result(own_task, wait=30_000)
                done = wait_until(
                    lambda: (
                        OutgoingMessage.objects.get(pk=post.pk).status
                        == OutgoingMessage.Status.DELIVERED
                    ),
                    timeout=15,
                )
            finally:
                code = stop_cluster(cluster)
            log.seek(0)
            output = log.read()

        self.assertTrue(delivered, f"the cluster delivered nothing; its output:\n{output}")
        self.assertEqual(server.messages[0].rcpt_tos, ["anne@example.com", "bart@example.com"])
        self.assertEqual(len(server.messages), 1)
        self.assertTrue(done, "the post's row does not say delivered")
        self.assertEqual(words, 8, f"the site's own task did not run; cluster output:\n{output}")
        self.assertEqual(code, 0, f"qcluster did not stop cleanly on SIGTERM:\n{output}")
