"""Traffic shaping made visible: each relay and destination group on the dashboard, in the
metrics and in the health check, and a post set aside by a limit says until when.

Real test servers behind the relays, limits in the real store (the database, or Redis
when the site's broker is Redis); "slow down" replies and rests go through the shaper's
own methods, as the SMTP pool calls them.
"""

from __future__ import annotations

import re
import uuid
from datetime import timezone as dt_timezone
from email import message_from_string

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from listdelivery import conf, health
from listdelivery.models import Member, OutgoingMessage, Personalization
from listdelivery.shaping import Shaper
from listdelivery.testing import SMTPTestServer

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
TOKEN = "visible-metrics-token-0123456789abcdef"
DASHBOARD = "admin:listdelivery_dashboard"
HEALTH_URL = "/lists/health/"


@pytest.fixture(autouse=True)
def fresh_limits(settings):
    """Limits of a test must not leak into the next: each test its own Redis prefix or rows."""
    from listdelivery import limits

    limits._store_at.cache_clear()
    store = limits.store_for()  # one per process: every store_for() of this test gets it
    if hasattr(store, "redis"):
        store.prefix = f"test-visible-{uuid.uuid4().hex}:"
    yield
    if hasattr(store, "redis"):
        for key in store.redis.scan_iter(store.prefix + "*"):
            store.redis.delete(key)
    limits._store_at.cache_clear()


def use(settings, **values) -> None:
    settings.LISTDELIVERY = {"DELIVERY_RETRY_DELAY": 60, "METRICS_TOKEN": TOKEN, **values}


def relay(server: SMTPTestServer, name: str, **extra) -> dict:
    return {"NAME": name, "HOST": server.host, "PORT": server.port, **extra}


def personal_post(mlist, size: int, domain: str = "example.org", number: int = 1):
    """A post to the seed's three and ``size`` more members, one copy each."""
    mlist.personalize = Personalization.FULL
    mlist.save()
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"m{number}-{i:04d}@{domain}") for i in range(size)
    )
    msg = message_from_string(
        f"From: a@example.com\nSubject: post {number}\nMessage-ID: <v{number}@x>\n\nHi\n"
    )
    return queue_post(mlist, msg)


def dashboard_html(admin_client) -> str:
    response = admin_client.get(reverse(DASHBOARD))
    assert response.status_code == 200
    return response.content.decode()


def row(html: str, kind: str, name: str) -> str:
    """The text of one relay's or group's row on the dashboard, tags left out."""
    start = html.index(f'id="limit-{kind}-{name}"')
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html[start : html.index("</tr>", start)]))


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/lists/metrics/", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_each_relay_and_group_shows_its_rate_now_sessions_and_quota(
    settings, mlist, admin_client, client
):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(
            settings,
            RELAYS=[relay(a, "a", RATE="300/s", CONNECTIONS=2, QUOTA=1000), relay(b, "b")],
            DESTINATION_LIMITS={"slow": {"DOMAINS": ["slow.example"], "RATE": "50/s"}},
        )
        post = personal_post(mlist, 9, "slow.example")
        run()
        post.refresh_from_db()
        assert post.status == Status.DELIVERED and len(a.messages) + len(b.messages) == 12

        # The server answers one transaction "454 Throttling failure" while a runner holds a
        # session: the shaper halves the relay's rate and the group's, as the pool has it do.
        shaper = Shaper(conf.get_config())
        ses = shaper.relays[0]
        shaper.slow_down(ses, ["m1-0000@slow.example"], 454, "Throttling failure")
        slot = shaper.open_session(ses, "another runner")
        try:
            html = dashboard_html(admin_client)
            samples = scrape(client)
            facts = admin_client.get(HEALTH_URL).json()
        finally:
            shaper.close_session(slot)

    section = html[html.index('id="sending-limits"') :]
    assert "Relays and destinations" in section
    shown = row(section, "relay", "a")
    assert "150/s of 300/s" in shown and "1 of 2" in shown
    assert f"{len(a.messages)} / 1,000" in shown and f"{a.host}:{a.port}" in shown
    assert row(section, "destination", "slow").count("25/s of 50/s") == 1
    assert "resting" not in row(section, "relay", "b")

    assert value(samples, "listdelivery_relay_learned_rate", relay="a") == 150
    assert value(samples, "listdelivery_relay_rate", relay="a") == 300
    assert value(samples, "listdelivery_relay_sessions", relay="a") == 1
    assert value(samples, "listdelivery_relay_quota_used", relay="a") == len(a.messages)
    assert value(samples, "listdelivery_relay_quota", relay="a") == 1000
    assert value(samples, "listdelivery_relay_resting", relay="b") == 0
    assert value(samples, "listdelivery_destination_learned_rate", group="slow") == 25
    assert value(samples, "listdelivery_limits_store_up") == 1

    assert facts["ok"] and facts["relays"] == {"total": 2, "resting": 0}
    detail = {limit["name"]: limit for limit in facts["limits"]}
    assert detail["a"]["learned_rate_per_second"] == 150 and detail["a"]["sessions"] == 1
    assert detail["slow"]["kind"] == "destination"


def test_a_relay_that_refused_connections_rests_and_says_until_when(
    settings, mlist, admin_client, client
):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(settings, RELAYS=[relay(a, "a"), relay(b, "b", WEIGHT=9)])
        b.stop()
        run_first = personal_post(mlist, 20)
        run()
        # A second runner reads the rest from the shared store, not from its own memory.
        second = queue_post(mlist, message_from_string("Subject: 2\nMessage-ID: <2@x>\n\nHi\n"))
        run()
        run_first.refresh_from_db()
        second.refresh_from_db()
        assert run_first.status == second.status == Status.DELIVERED
        assert len(a.messages) == 23 + 23

        html = dashboard_html(admin_client)
        samples = scrape(client)
        public = client.get(HEALTH_URL)

    assert "resting until" in row(html, "relay", "b") and "UTC" in row(html, "relay", "b")
    assert "resting" not in row(html, "relay", "a")
    assert (
        'id="listdelivery-health-relay-b"' in html and "The other relays take its traffic" in html
    )
    assert value(samples, "listdelivery_relay_resting", relay="b") == 1
    assert value(samples, "listdelivery_relay_resting", relay="a") == 0
    # One relay resting is a warning, not ill health; the public answer names no relay.
    assert public.status_code == 200 and public.json()["relays"] == {"total": 2, "resting": 1}
    assert "limits" not in public.json() and '"b"' not in public.content.decode()

    shaper = Shaper(conf.get_config())
    shaper.rest_relay(shaper.relays[0], "connect: refused")  # now every relay rests
    everything = client.get(HEALTH_URL)
    assert everything.status_code == 503 and everything.json()["reasons"] == ["relays_resting"]
    assert "Every relay rests" in dashboard_html(admin_client)


def test_a_post_set_aside_by_a_daily_quota_waits_for_the_limit_until_midnight(
    settings, mlist, admin_client, client
):
    with SMTPTestServer() as a:
        use(settings, RELAYS=[relay(a, "a", QUOTA=10)])
        post = personal_post(mlist, 12)
        run()
    post.refresh_from_db()
    assert (post.status, post.problem, len(a.messages)) == (Status.QUEUED, "limited", 10)
    # Tomorrow at 00:00 UTC, when every daily quota starts again (another day in the site's zone).
    local = timezone.localtime(post.next_attempt_at)
    until = f"{local.day} {local:%b %Y}, {local:%H:%M %Z}"
    assert post.next_attempt_at.astimezone(dt_timezone.utc).strftime("%H:%M:%S") == "00:00:00"

    page = admin_client.get(reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk]))
    text = page.content.decode()
    assert f"Waits for a sending limit until {until}" in text
    assert "done ≈" not in text
    listed = admin_client.get(reverse("admin:listdelivery_outgoingmessage_changelist"))
    assert "Waits for a sending limit until" in listed.content.decode()

    facts = health.report()
    assert facts.ok and facts.limited == 1 and facts.limited_until == post.next_attempt_at
    assert [group.kind for group in facts.problems] == []
    assert client.get(HEALTH_URL).json()["posts"]["limited"] == 1

    html = dashboard_html(admin_client)
    assert 'id="listdelivery-health-limited"' in html
    assert "1 post waits for a sending limit" in re.sub(r"<[^>]+>", "", html)
    assert "10 / 10" in row(html, "relay", "a")
    link = reverse("admin:listdelivery_outgoingmessage_changelist") + "?problem=limited"
    assert link in html
    assert post.pk in [p.pk for p in admin_client.get(link).context["cl"].result_list]

    samples = scrape(client)
    assert value(samples, "listdelivery_posts_with_problem", problem="limited") == 1
    assert value(samples, "listdelivery_relay_quota_used", relay="a") == 10


def test_the_dashboard_reads_the_limits_in_queries_set_by_the_settings_not_the_data(
    settings, mlist, admin_client
):
    with SMTPTestServer() as a, SMTPTestServer() as b:
        use(
            settings,
            RELAYS=[relay(a, "a", RATE="14/s", CONNECTIONS=2, QUOTA=50), relay(b, "b")],
            DESTINATION_PACK=True,
        )
        dashboard_html(admin_client)  # the session is read once, outside the counts

        def queries() -> int:
            with CaptureQueriesContext(connection) as captured:
                dashboard_html(admin_client)
            return len(captured.captured_queries)

        empty = queries()
        OutgoingMessage.objects.bulk_create(
            OutgoingMessage(
                mailing_list=mlist,
                list_id=mlist.list_id,
                message=b"",
                status=status,
                problem="limited" if status == Status.QUEUED else "",
            )
            for _ in range(50)
            for status in (Status.QUEUED, Status.SENDING, Status.RETRY)
        )
        assert queries() == empty


def test_one_server_without_limits_says_so_and_adds_no_metrics(deliver_to, admin_client, client):
    deliver_to(METRICS_TOKEN=TOKEN)
    html = dashboard_html(admin_client)
    assert "One server, no limits (SMTP_HOST 127.0.0.1:" in html
    samples = scrape(client)
    assert not [name for name, _labels in samples if name.startswith("listdelivery_relay")]


def test_limits_that_cannot_be_read_are_a_warning_not_a_broken_page(
    settings, mlist, admin_client, client
):
    use(
        settings,
        RELAYS=[{"NAME": "a", "HOST": "127.0.0.1", "RATE": "14/s"}],
        RATE_LIMIT_STORAGE="redis://:pa55word@127.0.0.1:1/0",  # nothing listens on port 1
    )
    html = dashboard_html(admin_client)
    assert "The shared sending limits could not be read" in html and "pa55word" not in html
    assert value(scrape(client), "listdelivery_limits_store_up") == 0
    answer = client.get(HEALTH_URL)
    assert answer.status_code == 200 and answer.json()["relays"] == {"total": 0, "resting": 0}
