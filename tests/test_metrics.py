"""The Prometheus endpoint: what a scrape says equals what the database holds, at a fixed cost."""

from __future__ import annotations

import time
from datetime import timedelta
from email import message_from_string

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from listdelivery import metrics
from listdelivery.admin import pause_posts
from listdelivery.models import (
    BounceEvent,
    DeliveryHour,
    DeliveryStatus,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
    RunnerPass,
)
from listdelivery.pipeline import member_recipients, to_outgoing

from .conftest import deliver_pending, queue_post, run, subprocess_environment

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status
TOKEN = "s3cret-metrics-token-0123456789abcdef"
URL = "/lists/metrics/"


def scrape(client, token: str = TOKEN) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape: ``{(name, sorted labels): value}``."""
    response = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    text = response.content.decode()
    assert TOKEN not in text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def post(mlist: MailingList, number: int) -> OutgoingMessage:
    msg = message_from_string(
        f"From: a@example.com\nSubject: post {number}\nMessage-ID: <m{number}@x>\n\nHi\n"
    )
    return queue_post(mlist, msg)


@pytest.fixture
def token(deliver_to):
    deliver_to(METRICS_TOKEN=TOKEN)


def test_the_url_is_metrics_under_the_apps_prefix():
    assert reverse("listdelivery:metrics") == URL


@pytest.mark.django_db
def test_a_scrape_reports_the_queue_the_answers_and_the_last_pass(client, smtpd, mlist, token):
    smtpd.fail_rcpt = {"cperson@example.com": "550 5.1.1 No such user"}
    delivered = [post(mlist, 1), post(mlist, 2)]
    run()
    waiting = post(mlist, 3)  # queued after the pass: 3 recipients pending
    paused = post(mlist, 4)
    pause_posts(OutgoingMessage.objects.filter(pk=paused.pk))
    Member.objects.filter(address="bperson@example.com").update(
        delivery_status=DeliveryStatus.BY_BOUNCES
    )

    samples = scrape(client)

    for status in Status.values:
        expected = OutgoingMessage.objects.filter(status=status).count()
        assert value(samples, "listdelivery_posts", status=status) == expected, status
    assert value(samples, "listdelivery_posts", status="delivered") == 2
    # Two posts: two members accepted, one refused, each time.
    assert value(samples, "listdelivery_recipients_total", status="sent") == 4
    assert value(samples, "listdelivery_recipients_total", status="bounced") == 2
    assert value(samples, "listdelivery_recipients_total", status="failed") == 0
    assert OutgoingRecipient.objects.filter(status=RStatus.SENT).count() == 4
    # The open ones: the waiting post's three and the paused post's three.
    assert value(samples, "listdelivery_recipients_open", status="pending") == 6
    assert value(samples, "listdelivery_recipients_open", status="deferred") == 0
    # The paused post is older than nothing: the waiting one is the oldest that is due.
    age = value(samples, "listdelivery_oldest_waiting_post_age_seconds")
    waiting.refresh_from_db()
    assert 0 <= age <= (timezone.now() - waiting.created_at).total_seconds()
    assert age < 30

    last = RunnerPass.objects.get(pk=1)
    assert value(samples, "listdelivery_last_run_finished_timestamp_seconds") == pytest.approx(
        last.finished_at.timestamp()
    )
    assert value(samples, "listdelivery_last_run_posts") == last.posts == 2

    count = value(samples, "listdelivery_post_delivery_seconds_count", status="delivered")
    assert count == 2
    took = sum(((p.finished_at - p.created_at).total_seconds() for p in refreshed(delivered)), 0.0)
    assert value(
        samples, "listdelivery_post_delivery_seconds_sum", status="delivered"
    ) == pytest.approx(took, abs=0.01)
    assert (
        value(samples, "listdelivery_post_delivery_seconds_bucket", status="delivered", le="+Inf")
        == 2
    )
    assert value(samples, "listdelivery_post_delivery_seconds_count", status="failed") == 0

    assert value(samples, "listdelivery_bounce_events_total", context="normal") == 2
    assert BounceEvent.objects.count() == 2
    assert value(samples, "listdelivery_members_disabled", reason="by_bounces") == 1
    assert value(samples, "listdelivery_members_disabled", reason="by_user") == 0
    assert value(samples, "listdelivery_stalled_posts") == 0
    assert not [key for key in samples if key[0] == "listdelivery_sending_post_progress_ratio"]


def refreshed(posts: list[OutgoingMessage]) -> list[OutgoingMessage]:
    return list(OutgoingMessage.objects.filter(pk__in=[p.pk for p in posts]))


@pytest.mark.django_db
def test_the_recipient_totals_are_the_hourly_totals_summed(client, token):
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    DeliveryHour.objects.bulk_create(
        DeliveryHour(
            hour=now - timedelta(hours=h), list_id=f"l{h % 3}", sent=h, bounced=1, failed=2
        )
        for h in range(40)
    )
    samples = scrape(client)
    totals = DeliveryHour.objects.aggregate(Sum("sent"), Sum("bounced"), Sum("failed"))
    assert value(samples, "listdelivery_recipients_total", status="sent") == totals["sent__sum"]
    assert value(samples, "listdelivery_recipients_total", status="bounced") == 40
    assert value(samples, "listdelivery_recipients_total", status="failed") == 80


@pytest.mark.django_db
def test_the_delivery_time_histogram_counts_each_finished_post_in_its_buckets(client, token, mlist):
    now = timezone.now()
    took = {Status.DELIVERED: [0.5, 3, 100, 7200, 2 * 86400], Status.FAILED: [40]}
    for status, durations in took.items():
        for seconds in durations:
            row = post(mlist, int(seconds * 10))
            OutgoingMessage.objects.filter(pk=row.pk).update(
                status=status,
                created_at=now - timedelta(seconds=seconds),
                finished_at=now,
            )
    scheduled = post(mlist, 99)  # a deliver_after post: its wait is the schedule's
    OutgoingMessage.objects.filter(pk=scheduled.pk).update(
        status=Status.DELIVERED,
        metadata={"deliver_after": now.isoformat()},
        created_at=now - timedelta(days=3),
        finished_at=now,
    )
    discarded = post(mlist, 98)  # an administrator's cancel is not a delivery time
    OutgoingMessage.objects.filter(pk=discarded.pk).update(status=Status.DISCARDED, finished_at=now)

    samples = scrape(client)

    def bucket(status: str, le: str) -> float:
        return value(samples, "listdelivery_post_delivery_seconds_bucket", status=status, le=le)

    assert bucket("delivered", "1.0") == 1
    assert bucket("delivered", "5.0") == 2
    assert bucket("delivered", "300.0") == 3
    assert bucket("delivered", "3600.0") == 3
    assert bucket("delivered", "10800.0") == 4
    assert bucket("delivered", "86400.0") == 4
    assert bucket("delivered", "+Inf") == 5
    assert value(samples, "listdelivery_post_delivery_seconds_sum", status="delivered") == (
        pytest.approx(sum(took[Status.DELIVERED]), abs=0.01)
    )
    assert bucket("failed", "30.0") == 0 and bucket("failed", "60.0") == 1
    assert value(samples, "listdelivery_post_delivery_seconds_count", status="failed") == 1


@pytest.mark.django_db
def test_sending_posts_show_progress_rate_and_finish_estimate_for_the_oldest_fifty(
    client, token, mlist
):
    now = timezone.now()
    rows = OutgoingMessage.objects.bulk_create(
        OutgoingMessage(
            mailing_list=mlist,
            list_id=mlist.list_id,
            message=b"Subject: big\n\nHi\n",
            status=Status.SENDING,
            recipient_count=1000,
            sent_count=250 + i,
            bounced_count=10,
            deferred_count=40,
            sending_since=now - timedelta(minutes=60 - i),
            leased_until=now + timedelta(minutes=5) if i else now - timedelta(minutes=1),
            rate=20.0 + i,
            finish_estimate=now + timedelta(minutes=10),
        )
        for i in range(60)
    )

    samples = scrape(client)

    ratios = {
        dict(labels)["post"]: v
        for (name, labels), v in samples.items()
        if name == "listdelivery_sending_post_progress_ratio"
    }
    assert len(ratios) == metrics.SENDING_POSTS_SHOWN == 50
    oldest = rows[0]
    assert set(ratios) == {str(row.pk) for row in rows[:50]}
    labels = {"post": str(oldest.pk), "list": "test.example.com"}
    assert value(samples, "listdelivery_sending_post_progress_ratio", **labels) == 0.26
    assert value(samples, "listdelivery_sending_post_rate", **labels) == 20.0
    assert value(
        samples, "listdelivery_sending_post_finish_estimate_timestamp_seconds", **labels
    ) == pytest.approx((now + timedelta(minutes=10)).timestamp())
    assert value(samples, "listdelivery_posts", status="sending") == 60
    assert value(samples, "listdelivery_stalled_posts") == 1  # the first one's lease ran out
    # 60 posts × (1000 - 250 - i - 10 - 40) pending
    assert value(samples, "listdelivery_recipients_open", status="pending") == sum(
        700 - i for i in range(60)
    )
    assert value(samples, "listdelivery_recipients_open", status="deferred") == 60 * 40
    age = value(samples, "listdelivery_oldest_waiting_post_age_seconds")
    assert age == pytest.approx((timezone.now() - oldest.created_at).total_seconds(), abs=5)


@pytest.mark.django_db
def test_held_posts_are_counted_by_their_problem_and_paused_or_scheduled_ones_are_not_waiting(
    client, token, mlist
):
    held = post(mlist, 1)
    OutgoingMessage.objects.filter(pk=held.pk).update(
        status=Status.HELD, problem="auth", next_attempt_at=None
    )
    paused = post(mlist, 2)
    scheduled = post(mlist, 3)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    OutgoingMessage.objects.filter(pk=paused.pk).update(
        status=Status.PAUSED, created_at=an_hour_ago
    )
    OutgoingMessage.objects.filter(pk=scheduled.pk).update(
        created_at=an_hour_ago, next_attempt_at=timezone.now() + timedelta(hours=1)
    )

    samples = scrape(client)

    assert value(samples, "listdelivery_posts_with_problem", problem="auth") == 1
    assert value(samples, "listdelivery_posts_with_problem", problem="tls") == 0
    assert value(samples, "listdelivery_oldest_waiting_post_age_seconds") < 60


@pytest.mark.django_db
def test_without_credentials_the_answer_is_401_with_a_bearer_challenge(client, token):
    response = client.get(URL)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", "Bearer ä"])
def test_a_wrong_token_is_refused(client, token, header):
    response = client.get(URL, HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert TOKEN not in response.content.decode()


@pytest.mark.django_db
def test_the_token_is_enough_even_where_every_page_requires_a_login(client, token, settings):
    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE,
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
    ]
    assert value(scrape(client), "listdelivery_posts", status="queued") == 0
    assert client.get(URL).status_code == 401  # a challenge, not a redirect to a login page


@pytest.mark.django_db
def test_an_empty_token_setting_lets_no_token_in(client, deliver_to):
    deliver_to(METRICS_TOKEN="")
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer x").status_code == 401


@pytest.mark.django_db
def test_staff_who_may_view_the_queue_may_read_the_metrics_others_get_403(client, token):
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(URL).status_code == 403

    user.user_permissions.add(Permission.objects.get(codename="view_outgoingmessage"))
    user = User.objects.get(pk=user.pk)  # fresh permission cache
    client.force_login(user)
    response = client.get(URL)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "no-cache" in response["Cache-Control"]

    User.objects.filter(pk=user.pk).update(is_staff=False)
    assert client.get(URL).status_code == 403


@pytest.mark.django_db
def test_a_scraper_that_asks_for_openmetrics_gets_it(client, token):
    response = client.get(
        URL,
        HTTP_AUTHORIZATION=f"Bearer {TOKEN}",
        HTTP_ACCEPT="application/openmetrics-text; version=1.0.0",
    )
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.decode().endswith("# EOF\n")


@pytest.mark.django_db
def test_a_scrape_costs_the_same_handful_of_queries_whatever_the_queue_holds(
    client, token, mlist, django_assert_max_num_queries
):
    with CaptureQueriesContext(connection) as empty:
        scrape(client)
    rows = [post(mlist, n) for n in range(30)]
    OutgoingMessage.objects.filter(pk__in=[r.pk for r in rows[:10]]).update(
        status=Status.SENDING, sending_since=timezone.now()
    )
    OutgoingMessage.objects.filter(pk__in=[r.pk for r in rows[10:20]]).update(
        status=Status.DELIVERED, finished_at=timezone.now()
    )
    with django_assert_max_num_queries(8):
        samples = scrape(client)
    assert len(empty) <= 8
    assert value(samples, "listdelivery_posts", status="sending") == 10


@pytest.mark.django_db
def test_the_host_sites_default_registry_is_left_alone(client, token):
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    scrape(client)
    scrape(client)
    assert set(REGISTRY._names_to_collectors) == before
    assert not any(name.startswith("listdelivery") for name in before)


def personalized_post(size: int) -> OutgoingMessage:
    mlist = MailingList.objects.create(
        address="metrics@example.com", personalize=Personalization.FULL
    )
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"m{i:04d}@example.org") for i in range(size)
    )
    msg = message_from_string("From: a@example.com\nSubject: big\nMessage-ID: <big@x>\n\nHi\n")
    msgdata: dict = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_post_a_runner_is_sending_shows_its_progress_while_it_goes(client, smtpd, settings):
    settings.LISTDELIVERY = {"METRICS_TOKEN": TOKEN}
    row = personalized_post(200)
    smtpd.delay = 0.01
    runner = deliver_pending(subprocess_environment(smtpd, CHECKPOINT_EVERY=10))
    labels = {"post": str(row.pk), "list": "metrics.example.com"}
    seen: list[float] = []
    deadline = time.monotonic() + 30
    while runner.poll() is None and time.monotonic() < deadline:
        samples = scrape(client)
        ratio = samples.get(
            ("listdelivery_sending_post_progress_ratio", tuple(sorted(labels.items())))
        )
        if ratio is not None:
            seen.append(ratio)
        time.sleep(0.1)
    runner.communicate(timeout=30)
    assert any(0 < ratio < 1 for ratio in seen), seen
    assert seen == sorted(seen)
    samples = scrape(client)
    assert value(samples, "listdelivery_posts", status="delivered") == 1
    assert value(samples, "listdelivery_recipients_total", status="sent") == 200
    assert (
        "listdelivery_sending_post_progress_ratio",
        tuple(sorted(labels.items())),
    ) not in samples


def test_a_short_metrics_token_is_warned_about_without_showing_it(settings):
    from listdelivery.checks import check_settings

    settings.LISTDELIVERY = {"METRICS_TOKEN": "hunter2"}
    warnings = [m for m in check_settings() if m.id == "listdelivery.W010"]
    assert len(warnings) == 1
    assert "hunter2" not in warnings[0].msg + (warnings[0].hint or "")

    settings.LISTDELIVERY = {"METRICS_TOKEN": TOKEN}
    assert not [m for m in check_settings() if m.id == "listdelivery.W010"]
    settings.LISTDELIVERY = {}
    assert not [m for m in check_settings() if m.id == "listdelivery.W010"]
