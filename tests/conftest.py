"""Fixtures: a real SMTP server per test, the seed's list, and helpers that read like the seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from email import message_from_string
from email.message import Message
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone
from hypothesis import settings as hypothesis_settings

from listdelivery.models import MailingList, OutgoingMessage
from listdelivery.pipeline import member_recipients, to_outgoing
from listdelivery.runner import OutgoingRunner, RunSummary
from listdelivery.testing import SMTPTestServer

FIRST_POST = """\
From: aperson@example.com
To: test@example.com
Subject: My first post
Message-ID: <first>

First post!
"""


@pytest.fixture
def smtpd():
    with SMTPTestServer() as server:
        yield server


@pytest.fixture
def deliver_to(settings, smtpd):
    """Point listdelivery at the test server; call it with more settings to override them."""

    def configure(**values) -> None:
        settings.LISTDELIVERY = {
            "SMTP_HOST": smtpd.host,
            "SMTP_PORT": smtpd.port,
            "DELIVERY_RETRY_DELAY": 60,
            **values,
        }

    configure()
    return configure


@pytest.fixture
def mlist(db) -> MailingList:
    """The seed's list test@example.com with Anne, Bart and Cris Person."""
    call_command("loaddata", "seed", verbosity=0)
    return MailingList.objects.get(address="test@example.com")


@pytest.fixture
def first_post() -> Message:
    return message_from_string(FIRST_POST)


def queue_post(mlist: MailingList, msg: Message, msgdata: dict | None = None, **extra):
    msgdata = {} if msgdata is None else msgdata
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata, **extra)


def run() -> RunSummary:
    return OutgoingRunner().run()


def envelopes(smtpd) -> list[tuple[str, str]]:
    """What the seed's ``show_headers`` prints: recipients and envelope sender, sorted."""
    return sorted((", ".join(m.rcpt_tos), m.mail_from) for m in smtpd.messages)


# CI replays the same examples every run, so a landing never depends on luck;
# a developer's runs keep exploring new ones (and Hypothesis keeps what failed).
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

THREE = ["aperson@example.com", "bperson@example.com", "cperson@example.com"]
ROOT = Path(__file__).resolve().parent.parent


def make_due(row: OutgoingMessage) -> None:
    """As if the post's retry time had come."""
    OutgoingMessage.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())


def statuses(row: OutgoingMessage) -> dict[str, str]:
    """Each recipient's status: ``{address: status}``."""
    return dict(row.recipients.values_list("address", "status"))


def deliver_pending(environment: dict[str, str]) -> subprocess.Popen:
    """``manage.py deliver_pending`` as a process of its own."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "deliver_pending", "--verbosity", "0"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_when_received(process: subprocess.Popen, smtpd, count: int, timeout: float = 60) -> None:
    """``kill -9`` the process once the server has received ``count`` messages."""
    deadline = time.monotonic() + timeout
    while len(smtpd.messages) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)


def database_url() -> str:
    """The test database as a ``DATABASE_URL``, for delivery subprocesses."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db["USER"] or "postgres"
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    return (
        f"postgres://{user}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    )


def subprocess_environment(smtpd, **listdelivery) -> dict[str, str]:
    environment = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "LISTDELIVERY_SMTP_HOST": smtpd.host,
        "LISTDELIVERY_SMTP_PORT": str(smtpd.port),
    }
    environment.update({f"LISTDELIVERY_{k}": str(v) for k, v in listdelivery.items()})
    return environment
