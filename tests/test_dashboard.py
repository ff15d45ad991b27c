"""The delivery dashboard as a list administrator reads it: charts, posts being sent, the queue."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from listdelivery import conf, dashboard
from listdelivery.admin import discard_posts
from listdelivery.models import DeliveryHour, MailingList, OutgoingMessage
from listdelivery.progress import hour_of

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
DASHBOARD = "admin:listdelivery_dashboard"
POSTS = "admin:listdelivery_outgoingmessage_changelist"


def page(client, query: str = "") -> tuple[object, str]:
    response = client.get(reverse(DASHBOARD) + query)
    assert response.status_code == 200
    return response, response.content.decode()


def hour_totals(list_id: str, ago: timedelta, sent: int = 0, bounced: int = 0, failed: int = 0):
    return DeliveryHour(
        hour=hour_of(timezone.now() - ago),
        list_id=list_id,
        sent=sent,
        bounced=bounced,
        failed=failed,
    )


def section(html: str, element_id: str) -> str:
    """The HTML of the element with this id, up to the next section of the page."""
    start = html.index(f'id="{element_id}"')
    end = html.find('<div class="module"', start)
    return html[start : end if end > 0 else None]


def make_post(mlist: MailingList, status: str, **fields) -> OutgoingMessage:
    return OutgoingMessage.objects.create(
        mailing_list=mlist,
        list_id=mlist.list_id,
        message=b"Subject: x\n\nx\n",
        status=status,
        **fields,
    )


# -- charts from real deliveries -------------------------------------------------------


def test_the_charts_count_what_the_server_accepted_and_refused(
    admin_client, deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {"cperson@example.com": "550 5.1.1 No such user"}
    queue_post(mlist, first_post)
    run()

    response, html = page(admin_client)

    hours, days = response.context["charts"]
    assert (hours.sent, hours.failed, hours.bars[-1].sent, hours.bars[-1].failed) == (2, 1, 2, 1)
    assert (days.sent, days.failed, days.bars[-1].sent, days.bars[-1].failed) == (2, 1, 2, 1)
    assert "accepted (2)" in html and "refused or failed (1)" in html
    assert html.count('role="img"') == 2


def test_an_administrators_cancel_is_not_counted_as_a_failure(
    admin_client, deliver_to, smtpd, mlist, first_post
):
    post = queue_post(mlist, first_post)
    discard_posts(OutgoingMessage.objects.filter(pk=post.pk), by="admin")

    response, html = page(admin_client)

    assert [(chart.sent, chart.failed) for chart in response.context["charts"]] == [(0, 0), (0, 0)]
    assert "No deliveries in the last 24 hours." in html
    assert "No deliveries in the last 30 days." in html
    assert 'role="img"' not in html


def test_a_chart_for_one_list(admin_client, mlist):
    other = MailingList.objects.create(address="other@example.com")
    DeliveryHour.objects.bulk_create(
        [
            hour_totals(mlist.list_id, timedelta(hours=1), sent=5, bounced=1),
            hour_totals(other.list_id, timedelta(hours=1), sent=7, failed=2),
            hour_totals(other.list_id, timedelta(days=3), sent=11),
        ]
    )

    everything, _html = page(admin_client)
    one, html = page(admin_client, f"?list={other.pk}")

    assert [(c.sent, c.failed) for c in everything.context["charts"]] == [(12, 3), (23, 3)]
    assert [(c.sent, c.failed) for c in one.context["charts"]] == [(7, 2), (18, 2)]
    assert f'<option value="{other.pk}" selected>other@example.com</option>' in html
    assert "Deliveries and failures — other@example.com" in html
    unknown, _html = page(admin_client, "?list=nonsense")
    assert unknown.context["chosen_list"] is None


def test_a_20000_recipient_day_reads_in_thousands_and_its_failures_stay_visible(
    admin_client, mlist
):
    DeliveryHour.objects.bulk_create(
        [
            hour_totals(mlist.list_id, timedelta(days=2), sent=20_000, failed=3),
            hour_totals(mlist.list_id, timedelta(days=3), sent=1_200),
        ]
    )

    response, html = page(admin_client)

    days = response.context["charts"][1]
    assert [label for _y, label in days.accepted.gridlines] == ["0", "5k", "10k", "15k", "20k"]
    assert [label for _y, label in days.refused.gridlines] == ["0", "2", "4"]
    busy = next(bar for bar in days.bars if bar.sent == 20_000)
    assert float(busy.failed_height) >= 30  # 3 of 4 on the failures' own axis
    assert "accepted (21,200)" in html
    assert re.search(r"<td class=\"number\">20,000</td><td class=\"number\">3</td>", html)


@pytest.mark.parametrize(
    ("peak", "lines", "gridlines"),
    [
        (0, 4, [0]),
        (1, 4, [0, 1]),
        (3, 4, [0, 1, 2, 3]),
        (5, 4, [0, 2, 4, 6]),
        (37, 2, [0, 20, 40]),
        (20_000, 4, [0, 5000, 10000, 15000, 20000]),
        (1_400_000, 4, [0, 500_000, 1_000_000, 1_500_000]),
    ],
)
def test_gridlines_fall_on_whole_round_numbers(peak, lines, gridlines):
    assert dashboard.nice_axis(peak, lines) == gridlines


@pytest.mark.parametrize(
    ("value", "label"),
    [(0, "0"), (950, "950"), (1000, "1k"), (1500, "1.5k"), (10_000, "10k"), (1_500_000, "1.5M")],
)
def test_axis_labels_are_abbreviated(value, label):
    assert dashboard.short_number(value) == label


def test_days_are_local_days_and_times_carry_their_zone(admin_client, settings, mlist):
    settings.TIME_ZONE = "Asia/Kolkata"  # +05:30: an hour's totals land on the day it starts in
    now = timezone.now()
    DeliveryHour.objects.bulk_create(
        [hour_totals(mlist.list_id, timedelta(hours=h), sent=1) for h in range(24 * 3)]
    )
    make_post(mlist, Status.RETRY, next_attempt_at=now + timedelta(hours=1))

    response, html = page(admin_client)

    days = response.context["charts"][1]
    today = timezone.localdate()
    assert sum(bar.sent for bar in days.bars) == 72
    assert days.bars[-1].label == f"{today:%b} {today.day}"
    local_now = timezone.localtime(now)
    # Today holds every UTC hour that started since local midnight (local xx:30).
    assert days.bars[-1].sent == local_now.hour + (1 if local_now.minute >= 30 else 0)
    assert "Hours and days in the time zone Asia/Kolkata." in html
    assert " IST</time>" in html
    assert re.search(r"\d\d:30</text>", section(html, "chart-hours"))


# -- posts being sent, the queue, links -------------------------------------------------


def test_a_post_being_sent_shows_its_progress_rate_and_finish(admin_client, mlist):
    now = timezone.now()
    post = make_post(
        mlist,
        Status.SENDING,
        subject="Big news",
        recipient_count=20_000,
        sent_count=12_345,
        deferred_count=10,
        bounced_count=4,
        failed_count=1,
        rate=123.45,
        sending_since=now - timedelta(minutes=2),
        finish_estimate=datetime(2031, 5, 6, 7, 8, tzinfo=dt_timezone.utc),
        leased_until=now + timedelta(minutes=5),
    )
    make_post(mlist, Status.PAUSED)

    _response, html = page(admin_client)

    sending = section(html, "sending-now")
    change_url = reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])
    assert f'<a href="{change_url}">Big news</a>' in sending
    assert "12,345 / 20,000" in sending
    cells = re.findall(r'<td class="number">([^<]*)</td>', sending)
    assert cells == ["10", "4", "1", "123.5/s"]
    assert "May 6, 2031, 7:08 a.m. UTC" in sending
    assert "runner stopped" not in sending
    assert "2 posts: 0 queued, 0 to retry, 0 held by a server error, 1 paused, 1 being sent" in html


def test_a_post_whose_runner_died_says_another_will_take_it_over(admin_client, mlist):
    make_post(mlist, Status.SENDING, leased_until=timezone.now() - timedelta(seconds=1))

    _response, html = page(admin_client)

    assert "Its runner stopped; another runner will take it over." in section(html, "sending-now")


def test_at_most_twenty_posts_are_listed_as_sending_and_the_rest_counted(admin_client, mlist):
    OutgoingMessage.objects.bulk_create(
        OutgoingMessage(
            mailing_list=mlist, list_id=mlist.list_id, message=b"", status=Status.SENDING
        )
        for _ in range(23)
    )

    response, html = page(admin_client)

    assert len(response.context["sending"]) == 20
    assert "and 3 more posts being sent" in html
    assert f'href="{reverse(POSTS)}?status__exact=sending"' in html


def test_every_count_of_the_queue_links_to_the_posts_it_counts(admin_client, mlist):
    held = make_post(mlist, Status.HELD, subject="Held one", next_attempt_at=None)
    make_post(mlist, Status.QUEUED, subject="Queued one")

    _response, html = page(admin_client)

    link = f"{reverse(POSTS)}?status__exact=held&amp;mailing_list__id__exact={mlist.pk}"
    assert f'<a href="{link}">1</a>' in section(html, "retry-queue")
    listed = admin_client.get(link.replace("&amp;", "&"))
    assert listed.status_code == 200
    assert list(listed.context["cl"].result_list) == [held]


def test_the_posts_of_a_deleted_list_link_by_their_list_id(admin_client, mlist):
    orphan = OutgoingMessage.objects.create(
        mailing_list=None, list_id="gone.example.com", message=b"", status=Status.HELD
    )
    make_post(mlist, Status.HELD)

    _response, html = page(admin_client)

    link = f"{reverse(POSTS)}?status__exact=held&amp;list_id__exact=gone.example.com"
    assert f'<a href="{link}">1</a>' in html
    listed = admin_client.get(link.replace("&amp;", "&"))
    assert list(listed.context["cl"].result_list) == [orphan]


def test_nothing_waiting_and_nothing_sending_say_so(admin_client, mlist):
    _response, html = page(admin_client)

    assert "No post is being sent right now." in html
    assert "Nothing is waiting" in html


def test_a_staff_user_who_may_view_lists_only_gets_no_link_to_posts(
    client, django_user_model, mlist
):
    user = django_user_model.objects.create_user("lists", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_mailinglist"))
    client.force_login(user)
    make_post(mlist, Status.HELD)
    make_post(mlist, Status.SENDING, subject="Going out")

    _response, html = page(client)

    assert "/outgoingmessage/" not in html
    assert "Going out" in html
    list_page = reverse("admin:listdelivery_mailinglist_change", args=[mlist.pk])
    assert f'href="{list_page}"' in html
    assert client.get(list_page).status_code == 200


def test_a_staff_user_who_may_view_posts_only_gets_no_link_to_lists(
    client, django_user_model, mlist
):
    user = django_user_model.objects.create_user("posts", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_outgoingmessage"))
    client.force_login(user)
    make_post(mlist, Status.HELD)

    _response, html = page(client)

    assert "/mailinglist/" not in html
    assert f"{reverse(POSTS)}?status__exact=held" in html


# -- settings ------------------------------------------------------------------------


def test_every_setting_is_explained_in_words_next_to_its_key(admin_client):
    assert set(conf.DESCRIPTIONS) >= set(conf.DEFAULTS)
    assert all(text.strip().endswith(".") for text in conf.DESCRIPTIONS.values())

    _response, html = page(admin_client)

    row = section(html, "delivery-settings")
    assert '<th scope="row"><code>CLAIM_BATCH</code></th>\n        <td>Posts a runner' in row


# -- cost ------------------------------------------------------------------------------


def test_the_dashboard_costs_the_same_few_queries_whatever_the_data(
    admin_client, mlist, django_assert_max_num_queries
):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            page(admin_client)
        return len(captured.captured_queries)

    page(admin_client)  # the session is read once, outside the counts
    empty = queries()
    lists = MailingList.objects.bulk_create(
        MailingList(address=f"list{i}@example.org", list_id=f"list{i}.example.org")
        for i in range(5)
    )
    DeliveryHour.objects.bulk_create(
        hour_totals(each.list_id, timedelta(hours=h), sent=h, failed=h % 3)
        for each in lists
        for h in range(24 * 31)
    )
    OutgoingMessage.objects.bulk_create(
        OutgoingMessage(
            mailing_list=lists[i % 5], list_id=lists[i % 5].list_id, message=b"", status=status
        )
        for i in range(100)
        for status in (Status.QUEUED, Status.SENDING, Status.HELD, Status.PAUSED)
    )

    # The session and the user, the health banner's five, and one per section: lists, the
    # queue, the posts being sent, both charts.
    with django_assert_max_num_queries(11):
        page(admin_client)
    assert queries() == empty
