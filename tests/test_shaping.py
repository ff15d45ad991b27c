"""Traffic shaping against real servers that enforce limits: relays, rates, caps, quotas, pacing.

The servers are the shipped test server with its provider faults (a sliding
1-second rate with SES's 454, a session cap, a quota); limits are kept in the
real database (or Redis on CI's PostgreSQL run, as the site's broker says).
The numbers the issue sets, with several processes, are in ``test_shaping_numbers.py``.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from email import message_from_string

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from listdelivery import conf
from listdelivery.models import (
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from listdelivery.testing import SMTPTestServer

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


@pytest.fixture(autouse=True)
def fresh_limits(settings):
    """Limits of a test must not leak into the next: each test its own Redis prefix or rows."""
    from listdelivery import limits

    limits._store_at.cache_clear()
    if getattr(settings, "Q_CLUSTER", {}).get("redis"):
        store = limits.store_for()
        for key in store.redis.scan_iter(store.prefix + "*"):
            store.redis.delete(key)
    yield
    limits._store_at.cache_clear()


def personal_list(mlist, size: int, domain: str = "example.org"):
    mlist.personalize = Personalization.FULL
    mlist.save()
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"m{i:05d}@{domain}") for i in range(size)
    )
    return mlist


def a_post(mlist) -> OutgoingMessage:
    msg = message_from_string("From: a@example.com\nSubject: s\nMessage-ID: <s@x>\n\nHi\n")
    return queue_post(mlist, msg)


def use(settings, **values) -> None:
    settings.LISTDELIVERY = {"DELIVERY_RETRY_DELAY": 60, **values}


def relay(server: SMTPTestServer, name: str, **extra) -> dict:
    return {"NAME": name, "HOST": server.host, "PORT": server.port, **extra}


def test_a_rate_paces_the_post_and_nobody_waits_for_a_retry(settings, smtpd, mlist):
    use(settings, SMTP_HOST=smtpd.host, SMTP_PORT=smtpd.port, SMTP_RATE="100/s")
    smtpd.rate_limit = 110  # GCRA's burst may put a few more than 100 in one second
    row = a_post(personal_list(mlist, 150))
    began = time.monotonic()
    run()
    took = time.monotonic() - began
    row.refresh_from_db()
    assert row.status == Status.DELIVERED and row.sent_count == 153
    assert smtpd.throttled == 0 and smtpd.max_in_window(1.0) <= 105
    assert took >= 1.0, "153 messages at 100/s take more than a second"


def test_slow_down_replies_lower_the_rate_and_are_not_failures(settings, smtpd, mlist):
    # The rate is set too high: the server's 454 replies teach the runner the real one.
    use(settings, SMTP_HOST=smtpd.host, SMTP_PORT=smtpd.port, SMTP_RATE="120/s")
    smtpd.rate_limit = 60
    row = a_post(personal_list(mlist, 140))
    run()
    row.refresh_from_db()
    assert (row.status, row.attempts, row.deferred_count) == (Status.DELIVERED, 1, 0)
    assert len(smtpd.messages) == 143 and len(set(smtpd.recipients_count())) == 143
    assert 0 < smtpd.throttled < 0.25 * (143 + smtpd.throttled)
    assert not row.recipients.exclude(status=RStatus.SENT).exists()


def test_relays_share_the_posts_by_weight(settings, mlist):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(settings, RELAYS=[relay(a, "a", WEIGHT=3), relay(b, "b", WEIGHT=1)])
        row = a_post(personal_list(mlist, 397))
        run()
        row.refresh_from_db()
        assert row.status == Status.DELIVERED
        assert len(a.messages) + len(b.messages) == 400
        assert 0.67 <= len(a.messages) / 400 <= 0.83


def test_a_relay_that_refuses_connections_rests_and_the_other_takes_its_traffic(settings, mlist):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(settings, RELAYS=[relay(a, "a", WEIGHT=9), relay(b, "b")])
        a.stop()
        row = a_post(personal_list(mlist, 47))
        run()
        row.refresh_from_db()
        assert row.status == Status.DELIVERED and row.attempts == 1
        assert len(b.messages) == 50 and a.messages == []


def test_when_every_relay_fails_the_post_is_held_as_before(settings, mlist, first_post):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(settings, RELAYS=[relay(a, "a"), relay(b, "b")])
        a.stop()
        b.stop()
        row = queue_post(mlist, first_post)
        run()
        row.refresh_from_db()
        assert row.status in (Status.RETRY, Status.HELD) and row.problem == "connection"
        assert row.deferred_count == 3


@pytest.mark.django_db(transaction=True)  # the pool's threads write the limits themselves
def test_a_session_cap_holds_whatever_the_connections_of_a_runner(settings, mlist):
    with SMTPTestServer() as a:
        use(settings, SMTP_CONNECTIONS=4, RELAYS=[relay(a, "a", CONNECTIONS=1)])
        row = a_post(personal_list(mlist, 60))
        run()
        row.refresh_from_db()
        assert row.status == Status.DELIVERED and len(a.messages) == 63
        assert a.peak_connections == 1


def test_a_daily_quota_sets_the_post_aside_without_counting_an_attempt(settings, mlist):
    with SMTPTestServer() as a:
        use(settings, RELAYS=[relay(a, "a", QUOTA=10)])
        row = a_post(personal_list(mlist, 12))
        run()
        row.refresh_from_db()
        assert len(a.messages) == 10
        assert (row.status, row.attempts, row.problem) == (Status.QUEUED, 0, "limited")
        assert row.deferred_count == 0 and row.pending_count == 5
        assert row.next_attempt_at.hour == 0 or row.next_attempt_at.date() > row.created_at.date()
        run()  # nothing more today, whoever runs
        assert len(a.messages) == 10


def test_each_list_goes_through_its_own_relays(settings, mlist, first_post):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(
            settings,
            RELAYS=[relay(a, "a"), relay(b, "b")],
            LIST_RELAYS={"TEST@example.com": ["b"]},
        )
        queue_post(mlist, first_post)
        run()
        assert a.messages == [] and len(b.messages) == 1


def test_a_destination_group_is_paced_while_the_rest_goes_on(settings, smtpd, mlist):
    use(
        settings,
        SMTP_HOST=smtpd.host,
        SMTP_PORT=smtpd.port,
        DESTINATION_LIMITS={"slow": {"DOMAINS": ["slow.example"], "RATE": "20/s"}},
    )
    personal_list(mlist, 30, "slow.example")
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"f{i:04d}@fast.example") for i in range(200)
    )
    row = a_post(mlist)
    run()
    row.refresh_from_db()
    assert row.status == Status.DELIVERED
    received = [m.rcpt_tos[0] for m in smtpd.messages]
    fast_done = max(i for i, r in enumerate(received) if r.endswith("@fast.example"))
    slow_done = max(i for i, r in enumerate(received) if r.endswith("@slow.example"))
    assert fast_done < slow_done, "the fast domain finished first, not held up by the slow one"
    slow_times = [m.received_at for m in smtpd.messages if m.rcpt_tos[0].endswith("slow.example")]
    assert slow_times[-1] - slow_times[0] >= 1.2, "30 at 20/s take about a second and a half"


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ca")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, str(cert)


def test_a_private_ca_is_trusted_with_verification_on(settings, mlist, first_post, private_ca):
    context, ca_file = private_ca
    with SMTPTestServer(tls_context=context) as server:
        use(
            settings,
            SMTP_HOST=server.host,
            SMTP_PORT=server.port,
            SMTP_SECURE_MODE="starttls",
            SMTP_CA_FILE=ca_file,
        )
        row = queue_post(mlist, first_post)
        run()
        row.refresh_from_db()
        assert row.status == Status.DELIVERED and len(server.messages) == 1


@pytest.mark.parametrize(
    "relays, says",
    [
        ("not a list", "is not JSON"),
        ([{"HOST": "h"}], "needs a NAME"),
        ([{"NAME": "a", "HOST": "h", "RATE": "fast", "PASSWORD": "s3cret"}], "RATE 'fast'"),
        ([{"NAME": "a", "HOST": "h", "WEIGHT": 0, "PASSWORD": "s3cret"}], "WEIGHT"),
        ([{"NAME": "a", "HOST": "h", "PORTT": 25}], "unknown keys: PORTT"),
    ],
)
def test_a_bad_relay_setting_says_what_is_wrong_and_never_the_password(settings, relays, says):
    settings.LISTDELIVERY = {"RELAYS": relays}
    with pytest.raises(ImproperlyConfigured) as raised:
        conf.get_config()
    assert says in str(raised.value) and "s3cret" not in str(raised.value)
    problems = dict(conf.problems())
    assert says in problems["RELAYS"] and "s3cret" not in problems["RELAYS"]


def test_the_dashboard_shows_relays_without_their_passwords(admin_client, settings):
    settings.LISTDELIVERY = {
        "RELAYS": [{"NAME": "ses", "HOST": "smtp.example", "PASSWORD": "s3cret", "RATE": "14/s"}]
    }
    page = admin_client.get("/admin/listdelivery/mailinglist/dashboard/").content.decode()
    assert "ses (smtp.example" in page and "14/s" in page and "s3cret" not in page


def test_the_system_checks_name_a_bad_rate(settings):
    settings.LISTDELIVERY = {"SMTP_RATE": "lots"}
    with pytest.raises(Exception) as raised:
        call_command("check", "--fail-level", "ERROR")
    assert "SMTP_RATE" in str(raised.value)


def test_the_checks_name_an_unreadable_ca_file_and_a_list_sent_through_no_relay(settings):
    from django.core import checks

    settings.LISTDELIVERY = {
        "RELAYS": [{"NAME": "a", "HOST": "h", "CA_FILE": "/nowhere/ca.pem"}],
        "LIST_RELAYS": {"news@example.com": ["b"]},
    }
    ids = {message.id: message.msg for message in checks.run_checks()}
    assert "/nowhere/ca.pem" in ids["listdelivery.E015"]
    assert "news@example.com" in ids["listdelivery.W011"]
