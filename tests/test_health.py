"""Health at a glance: the facts, the JSON endpoint a load balancer reads, the admin banner."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape
from django_q.models import Schedule

from listdelivery import health
from listdelivery.models import DeliveryStatus, Member, OutgoingMessage, RunnerPass
from listdelivery.tasks import TASK
from listdelivery.testing import SMTPTestServer

from .conftest import queue_post, run

Status = OutgoingMessage.Status
HEALTH_URL = "/lists/health/"
PASSWORD = "s3cret-Pa55word"


def sweep_runs_at(moment) -> None:
    """As if a cluster's scheduler had last moved the sweep to ``moment``."""
    assert Schedule.objects.filter(func=TASK).update(next_run=moment)


def posts(mlist, *rows: dict) -> list[OutgoingMessage]:
    return OutgoingMessage.objects.bulk_create(
        OutgoingMessage(mailing_list=mlist, list_id=mlist.list_id, message=b"", **row)
        for row in rows
    )


def grant(user, *codenames: str):
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return type(user).objects.get(pk=user.pk)


def changelist_rows(client, url: str) -> set[int]:
    response = client.get(url)
    assert response.status_code == 200
    return {row.pk for row in response.context["cl"].result_list}


def test_a_real_pass_makes_delivery_healthy(deliver_to, mlist, first_post, client, admin_client):
    queue_post(mlist, first_post)
    summary = run()
    assert summary.delivered == 1
    sweep_runs_at(timezone.now() + timedelta(seconds=40))

    facts = health.report()

    assert facts.ok and facts.reasons == []
    assert facts.last_pass.posts == 1 and facts.last_pass.age < timedelta(seconds=30)
    assert facts.last_pass.runner == RunnerPass.objects.get().runner != ""
    assert facts.cluster == "running" and facts.sweep_interval == timedelta(minutes=1)
    assert (facts.due, facts.overdue, facts.held, facts.sending) == (0, 0, 0, 0)

    response = client.get(HEALTH_URL)  # anonymous, as a load balancer
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    public = response.json()
    assert public["ok"] is True and public["cluster"] == "running"
    assert public["last_pass"]["posts"] == 1 and "runner" not in public["last_pass"]
    assert "problems" not in public and "links" not in public

    page = admin_client.get(reverse("admin:index")).content.decode()
    assert 'id="listdelivery-health-ok"' in page and "Delivery is healthy." in page
    assert facts.last_pass.runner in page and "UTC" in page  # times carry their zone


def test_bad_credentials_are_held_grouped_with_the_remedy_and_no_password(
    settings, mlist, first_post, client, admin_client
):
    with SMTPTestServer(auth=("list", "right-password")) as server:
        settings.LISTDELIVERY = {
            "SMTP_HOST": server.host,
            "SMTP_PORT": server.port,
            "SMTP_USER": "list",
            "SMTP_PASSWORD": PASSWORD,
        }
        row = queue_post(mlist, first_post)
        run()
    row.refresh_from_db()
    assert row.status == Status.HELD and row.problem == "auth"
    # A server that echoes what it was sent: the password must still never show.
    OutgoingMessage.objects.filter(pk=row.pk).update(
        last_error=f"{row.last_error} (AUTH PLAIN list {PASSWORD})"
    )

    facts = health.report()

    assert not facts.ok and facts.reasons == ["needs_admin"]
    assert facts.held == facts.needs_admin == 1
    [group] = facts.problems
    assert (group.kind, group.posts, group.needs_admin) == ("auth", 1, True)
    assert group.remedy.startswith("The server refused our login. Check SMTP_USER")
    assert "535" in group.example and PASSWORD not in group.example

    response = client.get(HEALTH_URL)
    assert response.status_code == 503
    body = response.content.decode()
    assert response.json()["posts"]["needs_admin"] == 1
    assert PASSWORD not in body and "535 " not in body and "auth" not in body.lower()

    staff_view = admin_client.get(HEALTH_URL)
    assert staff_view.status_code == 503 and PASSWORD not in staff_view.content.decode()
    [detail] = staff_view.json()["problems"]
    assert detail["kind"] == "auth" and "535" in detail["example"]

    page = admin_client.get(reverse("admin:index")).content.decode()
    assert PASSWORD not in page
    assert 'id="listdelivery-health-problem-auth"' in page and "Check SMTP_USER" in page
    link = reverse("admin:listdelivery_outgoingmessage_changelist") + "?problem=auth"
    assert f'<a href="{link}">1</a>' in page
    assert changelist_rows(admin_client, link) == {row.pk}


def test_overdue_stalled_and_sending_posts_are_counted_and_linked(mlist, admin_client):
    now = timezone.now()
    overdue, stalled, live, due, scheduled, held = posts(
        mlist,
        {"status": Status.RETRY, "next_attempt_at": now - timedelta(minutes=10)},
        {
            "status": Status.SENDING,
            "next_attempt_at": now - timedelta(minutes=30),
            "leased_until": now - timedelta(minutes=10),
            "lease_token": "dead",
        },
        {
            "status": Status.SENDING,
            "next_attempt_at": now - timedelta(minutes=30),
            "leased_until": now + timedelta(minutes=4),
            "lease_token": "alive",
        },
        {"status": Status.QUEUED, "next_attempt_at": now - timedelta(seconds=5)},
        {"status": Status.QUEUED, "next_attempt_at": now + timedelta(hours=1)},
        {"status": Status.HELD, "next_attempt_at": None, "problem": "size"},
    )
    RunnerPass.objects.create(pk=1, finished_at=now - timedelta(seconds=20), runner="a:1")
    sweep_runs_at(now + timedelta(seconds=30))

    facts = health.report(now)

    assert facts.reasons == ["overdue", "needs_admin"]  # a pass 20 s ago is not stale
    assert (facts.overdue, facts.stalled, facts.sending, facts.due) == (2, 1, 2, 3)
    assert facts.oldest_overdue == now - timedelta(minutes=30)
    assert [(g.kind, g.awaiting_admin) for g in facts.problems] == [("size", 1)]

    page = admin_client.get(reverse("admin:index")).content.decode()
    changelist = reverse("admin:listdelivery_outgoingmessage_changelist")
    for name, count in (("overdue", 2), ("stalled", 1)):
        assert f'<a href="{facts.links[name]}">{count}</a>' in page
    assert changelist_rows(admin_client, facts.links["overdue"]) == {overdue.pk, stalled.pk}
    assert changelist_rows(admin_client, facts.links["stalled"]) == {stalled.pk}
    assert changelist_rows(admin_client, facts.links["due"]) == {overdue.pk, stalled.pk, due.pk}
    assert changelist_rows(admin_client, facts.links["needs_admin"]) == {held.pk}
    assert changelist_rows(admin_client, facts.links["sending"]) == {stalled.pk, live.pk}
    assert changelist_rows(admin_client, f"{changelist}?problem=size") == {held.pk}
    assert scheduled.pk not in changelist_rows(admin_client, facts.links["due"])


def test_no_pass_for_a_long_while_with_posts_due_is_unhealthy(mlist, client):
    now = timezone.now()
    posts(mlist, {"status": Status.QUEUED, "next_attempt_at": now - timedelta(seconds=30)})

    assert health.report(now).reasons == ["no_pass"]  # never a pass, one post due

    RunnerPass.objects.create(pk=1, finished_at=now - timedelta(seconds=10), runner="a:1")
    assert health.report(now).ok  # due 30 s ago: the next sweep takes it

    RunnerPass.objects.filter(pk=1).update(finished_at=now - timedelta(hours=1))
    assert health.report(now + timedelta(minutes=3)).reasons == ["no_pass", "overdue"]
    response = client.get(HEALTH_URL)
    assert response.status_code == 503 and response.json()["reasons"][0] == "no_pass"


def test_the_cluster_is_read_from_the_sweep_schedule(db):
    now = timezone.now()
    sweep_runs_at(now - timedelta(seconds=50))  # the scheduler looks every 30 s: on time
    assert health.report(now).cluster == "running"

    sweep_runs_at(now - timedelta(minutes=10))
    facts = health.report(now)
    assert facts.cluster == "late" and facts.ok  # nothing waits: no harm done yet

    Schedule.objects.filter(func=TASK).update(schedule_type=Schedule.MINUTES, minutes=5)
    assert health.report(now).sweep_interval == timedelta(minutes=5)

    Schedule.objects.filter(func=TASK).delete()
    assert health.report(now).cluster == "no_schedule"


def test_members_disabled_by_bounces_today_link_to_exactly_them(mlist, admin_client):
    now = timezone.now()
    anne, bart, cris = Member.objects.filter(mailing_list=mlist).order_by("address")
    Member.objects.filter(pk=anne.pk).update(
        delivery_status=DeliveryStatus.BY_BOUNCES, disabled_at=now
    )
    Member.objects.filter(pk=bart.pk).update(
        delivery_status=DeliveryStatus.BY_BOUNCES, disabled_at=now - timedelta(days=2)
    )
    Member.objects.filter(pk=cris.pk).update(
        delivery_status=DeliveryStatus.BY_MODERATOR, disabled_at=now
    )

    facts = health.report(now)

    assert facts.members_disabled_today == 1 and facts.ok
    page = admin_client.get(reverse("admin:index")).content.decode()
    link = facts.links["members_disabled"]
    assert f'<a href="{escape(link)}">1</a>' in page
    assert changelist_rows(admin_client, link) == {anne.pk}


def test_the_banner_links_only_what_the_user_may_open(mlist, django_user_model, client):
    now = timezone.now()
    posts(mlist, {"status": Status.RETRY, "next_attempt_at": now - timedelta(hours=1)})
    Member.objects.filter(mailing_list=mlist).update(
        delivery_status=DeliveryStatus.BY_BOUNCES, disabled_at=now
    )
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)

    page = client.get(reverse("admin:index")).content.decode()
    assert "listdelivery-health" not in page  # no permission on delivery: no banner

    staff = grant(staff, "view_outgoingmessage")
    client.force_login(staff)
    page = client.get(reverse("admin:index")).content.decode()
    assert 'id="listdelivery-health-overdue"' in page and "?health=overdue" in page
    assert 'id="listdelivery-health-disabled"' in page and "disabled=today" not in page
    links = client.get(HEALTH_URL).json()["links"]  # staff who may see delivery: the detail
    assert "overdue" in links and "members_disabled" not in links


def test_the_endpoint_answers_reads_only(db, client):
    assert client.post(HEALTH_URL).status_code == 405
    assert client.head(HEALTH_URL).status_code in (200, 503)


@pytest.mark.parametrize("waiting", [0, 40])
def test_the_report_costs_five_queries_whatever_the_queue(
    mlist, waiting, django_assert_num_queries
):
    now = timezone.now()
    posts(
        mlist,
        *(
            {"status": status, "next_attempt_at": now - timedelta(minutes=i), "problem": kind}
            for i in range(waiting)
            for status, kind in [((Status.HELD, "auth"), (Status.RETRY, "connection"))[i % 2]]
        ),
    )
    with django_assert_num_queries(5):
        facts = health.report(now)
    assert len(facts.problems) == (2 if waiting else 0)
    json.dumps(facts.as_dict(detail=True))  # JSON-safe, detail and all


def test_the_endpoint_stays_open_under_login_required_middleware(db, client, settings):
    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE,
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
    ]
    response = client.get(HEALTH_URL)
    assert response.status_code in (200, 503) and "ok" in response.json()
