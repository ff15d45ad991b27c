"""Fixtures: a real SMTP server per test, the seed's list, and helpers that read like the seed."""

from __future__ import annotations

from email import message_from_string
from email.message import Message

import pytest
from django.core.management import call_command

from listdelivery.models import MailingList
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
    import os

    environment = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "LISTDELIVERY_SMTP_HOST": smtpd.host,
        "LISTDELIVERY_SMTP_PORT": str(smtpd.port),
    }
    environment.update({f"LISTDELIVERY_{k}": str(v) for k, v in listdelivery.items()})
    return environment
