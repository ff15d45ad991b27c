"""The admin as a list administrator uses it: every page, action and permission rule."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from listdelivery import progress
from listdelivery.dashboard import human_duration
from listdelivery.models import (
    BounceEvent,
    DeliveryAttempt,
    DeliveryHour,
    DeliveryStatus,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status
PASSWORD = "s3cret-pw-123"
DASHBOARD = "admin:listdelivery_dashboard"


def post_bytes(subject: str = "Hello", message_id: str = "<hello@example.com>", body: str = "Hi!"):
    return (
        f"From: aperson@example.com\nTo: test@example.com\nSubject: {subject}\n"
        f"Message-ID: {message_id}\n\n{body}\n"
    ).encode()


def make_post(
    mlist: MailingList | None,
    status: str = Status.QUEUED,
    recipients: dict[str, str] | None = None,
    subject: str = "Hello",
    message_id: str = "<hello@example.com>",
    raw: bytes | None = None,
    **fields,
) -> OutgoingMessage:
    """A queue row as the runner leaves it, with ``{address: recipient status}``."""
    post = OutgoingMessage.objects.create(
        mailing_list=mlist,
        list_id=mlist.list_id if mlist else "gone.example.com",
        message=raw or post_bytes(subject, message_id),
        message_id=message_id,
        subject=subject,
        status=status,
        **fields,
    )
    OutgoingRecipient.objects.bulk_create(
        OutgoingRecipient(message=post, address=address, status=state)
        for address, state in (recipients or {}).items()
    )
    if recipients:
        progress.recount([post.pk])  # the counters, as the runner keeps them
        post.refresh_from_db()
    return post


def grant(user, *codenames: str):
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return type(user).objects.get(pk=user.pk)  # a fresh object: no stale permission cache


@pytest.fixture
def staff(django_user_model):
    """Staff, but without any permission on listdelivery."""
    return django_user_model.objects.create_user("staff", password="pw", is_staff=True)


@pytest.fixture
def viewer(staff):
    """Staff who may look at everything and change nothing."""
    models = ("mailinglist", "member", "outgoingmessage", "bounceevent")
    return grant(staff, *(f"view_{model}" for model in models))


@pytest.fixture
def sample(mlist):
    """One of everything, for the pages that show a single object."""
    post = make_post(
        mlist,
        Status.RETRY,
        {"aperson@example.com": RStatus.SENT, "bperson@example.com": RStatus.DEFERRED},
        last_error="1 recipients to retry; last reply: 450 busy",
    )
    bounce = BounceEvent.objects.create(
        mailing_list=mlist, address="cperson@example.com", smtp_code=550, smtp_message="No such"
    )
    return {"list": mlist, "post": post, "bounce": bounce, "member": mlist.members.first()}


def page_urls(sample) -> dict[str, str]:
    return {
        "index": reverse("admin:index"),
        "app index": reverse("admin:app_list", args=["listdelivery"]),
        "dashboard": reverse(DASHBOARD),
        **{
            f"{model} list": reverse(f"admin:listdelivery_{model}_changelist")
            for model in ("mailinglist", "member", "outgoingmessage", "bounceevent")
        },
        "list page": reverse("admin:listdelivery_mailinglist_change", args=[sample["list"].pk]),
        "new list": reverse("admin:listdelivery_mailinglist_add"),
        "member page": reverse("admin:listdelivery_member_change", args=[sample["member"].pk]),
        "post page": reverse("admin:listdelivery_outgoingmessage_change", args=[sample["post"].pk]),
        "bounce page": reverse("admin:listdelivery_bounceevent_change", args=[sample["bounce"].pk]),
    }


def run_action(client, model: str, action: str, *objects, **extra) -> object:
    return client.post(
        reverse(f"admin:listdelivery_{model}_changelist"),
        {"action": action, "_selected_action": [obj.pk for obj in objects], **extra},
        follow=True,
    )


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# -- permissions ----------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_the_login_page(client, sample):
    for name, url in page_urls(sample).items():
        response = client.get(url)
        assert response.status_code == 302, name
        assert response.url.startswith(reverse("admin:login")), name


def test_staff_without_view_permission_get_403_on_every_listdelivery_page(client, staff, sample):
    client.force_login(staff)
    urls = page_urls(sample)
    for name in ("index", "app index"):
        urls.pop(name)
    for name, url in urls.items():
        assert client.get(url).status_code == 403, name


@pytest.mark.parametrize(
    ("permission", "status"),
    [("view_mailinglist", 200), ("view_outgoingmessage", 200), ("view_member", 403)],
)
def test_the_dashboard_needs_view_permission_on_lists_or_posts(client, staff, permission, status):
    client.force_login(grant(staff, permission))
    assert client.get(reverse(DASHBOARD)).status_code == status


def test_staff_without_permission_see_no_dashboard_link_on_the_index(client, staff):
    client.force_login(staff)
    response = client.get(reverse("admin:index"))
    assert reverse(DASHBOARD) not in response.content.decode()


def test_view_permission_shows_every_page_but_offers_no_action_and_no_editing(
    client, viewer, sample
):
    client.force_login(viewer)
    for name, url in page_urls(sample).items():
        if name != "new list":
            assert client.get(url).status_code == 200, name
    lists = client.get(reverse("admin:listdelivery_mailinglist_changelist")).content.decode()
    assert 'name="form-0-personalize"' not in lists
    posts = client.get(reverse("admin:listdelivery_outgoingmessage_changelist")).content.decode()
    assert 'value="retry_now"' not in posts and 'value="discard"' not in posts
    members = client.get(reverse("admin:listdelivery_member_changelist")).content.decode()
    assert 'value="disable_delivery"' not in members


def test_actions_posted_without_change_permission_change_nothing(client, viewer, mlist):
    failed = make_post(mlist, Status.FAILED, {"aperson@example.com": RStatus.FAILED})
    client.force_login(viewer)

    run_action(client, "outgoingmessage", "retry_now", failed)
    run_action(client, "member", "disable_delivery", *mlist.members.all())

    failed.refresh_from_db()
    assert failed.status == Status.FAILED
    assert set(mlist.members.values_list("delivery_status", flat=True)) == {DeliveryStatus.ENABLED}


def test_change_permission_on_posts_is_enough_for_retry_now(client, staff, mlist):
    failed = make_post(mlist, Status.FAILED, {"aperson@example.com": RStatus.FAILED})
    client.force_login(grant(staff, "change_outgoingmessage"))

    run_action(client, "outgoingmessage", "retry_now", failed)

    failed.refresh_from_db()
    assert failed.status == Status.RETRY


def test_the_smtp_password_never_appears_in_any_page(admin_client, settings, sample):
    settings.LISTDELIVERY = {"SMTP_USER": "lists", "SMTP_PASSWORD": PASSWORD}
    settings.LISTDELIVERY_FROM_ENVIRONMENT = ["SMTP_PASSWORD"]
    responses = [admin_client.get(url) for url in page_urls(sample).values()]
    responses.append(run_action(admin_client, "outgoingmessage", "retry_now", sample["post"]))
    responses.append(run_action(admin_client, "outgoingmessage", "discard", sample["post"]))
    for response in responses:
        assert response.status_code == 200
        assert PASSWORD not in response.content.decode()


# -- mailing lists ----------------------------------------------------------------


def test_list_changelist_shows_post_counter_and_queued_retrying_failed_counts(admin_client, mlist):
    MailingList.objects.filter(pk=mlist.pk).update(post_id=42, last_post_at=timezone.now())
    for status in (Status.QUEUED, Status.QUEUED, Status.RETRY, Status.HELD, Status.FAILED):
        make_post(mlist, status)
    make_post(mlist, Status.DELIVERED)

    response = admin_client.get(reverse("admin:listdelivery_mailinglist_changelist"))

    html = response.content.decode()
    assert '<td class="field-post_id">42</td>' in html
    assert '<td class="field-queued">2</td>' in html
    assert '<td class="field-retrying">2</td>' in html
    assert '<td class="field-failed">1</td>' in html
    assert reverse(DASHBOARD) in html


def test_personalization_is_editable_from_the_list_changelist(admin_client, mlist):
    response = admin_client.post(
        reverse("admin:listdelivery_mailinglist_changelist"),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(mlist.pk),
            "form-0-personalize": Personalization.INDIVIDUAL,
            "_save": "Save",
        },
    )

    assert response.status_code == 302
    mlist.refresh_from_db()
    assert mlist.personalize == Personalization.INDIVIDUAL


def test_personalization_is_editable_on_the_list_page_but_the_post_counter_is_not(
    admin_client, mlist
):
    url = reverse("admin:listdelivery_mailinglist_change", args=[mlist.pk])
    response = admin_client.post(
        url,
        {
            "address": mlist.address,
            "display_name": "Test list",
            "personalize": Personalization.FULL,
            "post_id": "99",
        },
    )

    assert response.status_code == 302
    mlist.refresh_from_db()
    assert (mlist.personalize, mlist.display_name, mlist.post_id) == (
        Personalization.FULL,
        "Test list",
        1,
    )


def test_the_list_page_links_to_its_members_instead_of_listing_them(admin_client, mlist):
    Member.objects.filter(address="cperson@example.com").update(
        delivery_status=DeliveryStatus.BY_BOUNCES
    )

    response = admin_client.get(reverse("admin:listdelivery_mailinglist_change", args=[mlist.pk]))

    html = response.content.decode()
    members = reverse("admin:listdelivery_member_changelist")
    assert f'href="{members}?mailing_list__id__exact={mlist.pk}"' in html
    assert "3 members (2 with delivery enabled)" in html
    assert "aperson@example.com" not in html
    assert "field-post_id" in html and "field-last_post_at" in html


def test_lists_can_be_searched_by_address_and_name_and_filtered_by_personalization(
    admin_client, mlist
):
    other = MailingList.objects.create(
        address="ant@example.org", display_name="Insects", personalize=Personalization.FULL
    )
    url = reverse("admin:listdelivery_mailinglist_changelist")

    def found(**query):
        return list(admin_client.get(url, query).context["cl"].result_list)

    assert found(q="test@") == [mlist]
    assert found(q="insects") == [other]
    assert found(personalize__exact="full") == [other]
    assert found(personalize__exact="none") == [mlist]


def test_a_new_list_can_be_added(admin_client):
    response = admin_client.post(
        reverse("admin:listdelivery_mailinglist_add"),
        {"address": "new@example.com", "display_name": "", "personalize": "none"},
    )

    assert response.status_code == 302
    assert MailingList.objects.get(address="new@example.com").list_id == "new.example.com"


# -- members -----------------------------------------------------------------------


def test_members_can_be_searched_by_address_and_name_and_filtered(admin_client, mlist):
    other = MailingList.objects.create(address="other@example.com")
    dave = Member.objects.create(mailing_list=other, address="dave@example.com")
    Member.objects.filter(address="bperson@example.com").update(
        delivery_status=DeliveryStatus.BY_USER
    )
    url = reverse("admin:listdelivery_member_changelist")

    def found(**query):
        return [m.address for m in admin_client.get(url, query).context["cl"].result_list]

    assert found(q="bart") == ["bperson@example.com"]
    assert found(q="cperson@") == ["cperson@example.com"]
    assert found(mailing_list__id__exact=other.pk) == [dave.address]
    assert found(delivery_status__exact="by_user") == ["bperson@example.com"]


def test_members_delivery_can_be_disabled_and_enabled_with_actions(admin_client, mlist):
    anne, bart, _ = mlist.members.all()

    response = run_action(admin_client, "member", "disable_delivery", anne, bart)

    assert messages_of(response) == ["Delivery is now “Disabled by a moderator” for 2 members."]
    assert dict(mlist.members.values_list("address", "delivery_status")) == {
        "aperson@example.com": DeliveryStatus.BY_MODERATOR,
        "bperson@example.com": DeliveryStatus.BY_MODERATOR,
        "cperson@example.com": DeliveryStatus.ENABLED,
    }

    response = run_action(admin_client, "member", "enable_delivery", *mlist.members.all())

    assert messages_of(response) == ["Delivery is now “Enabled” for 2 members."]
    assert set(mlist.members.values_list("delivery_status", flat=True)) == {DeliveryStatus.ENABLED}


# -- outgoing messages ----------------------------------------------------------------


def test_the_queue_shows_status_subject_message_id_progress_and_errors(admin_client, mlist):
    make_post(
        mlist,
        Status.RETRY,
        {
            "aperson@example.com": RStatus.SENT,
            "bperson@example.com": RStatus.DEFERRED,
            "cperson@example.com": RStatus.PENDING,
        },
        subject="Minutes",
        message_id="<minutes@example.com>",
        attempts=2,
        deliver_until=timezone.now() + timedelta(days=5),
        last_error="2 recipients to retry; last reply: 450 4.2.0 Mailbox busy",
    )

    response = admin_client.get(reverse("admin:listdelivery_outgoingmessage_changelist"))

    html = response.content.decode()
    assert "Waiting to retry" in html
    assert "Minutes" in html and "&lt;minutes@example.com&gt;" in html
    assert "1 / 3 accepted · 1 deferred · 0 bounced · 0 failed" in html
    assert '<progress max="3" value="1"' in html
    assert "2 attempts · gives up after" in html
    assert 'title="2 recipients to retry; last reply: 450 4.2.0 Mailbox busy"' in html
    assert "gives up after" in html


def test_the_queue_can_be_filtered_by_status_and_list_and_searched(admin_client, mlist):
    other = MailingList.objects.create(address="other@example.com")
    minutes = make_post(mlist, Status.FAILED, subject="Minutes", message_id="<m@example.com>")
    agenda = make_post(other, Status.QUEUED, subject="Agenda", message_id="<a@example.com>")
    url = reverse("admin:listdelivery_outgoingmessage_changelist")

    def found(**query):
        return list(admin_client.get(url, query).context["cl"].result_list)

    assert found(status__exact="failed") == [minutes]
    assert found(mailing_list__id__exact=other.pk) == [agenda]
    assert found(q="<a@example.com>") == [agenda]
    assert found(q="minutes") == [minutes]


def test_a_post_page_is_read_only_and_shows_headers_and_a_safe_text_preview(admin_client, mlist):
    raw = (
        b"From: aperson@example.com\nTo: test@example.com\n"
        b"Subject: =?utf-8?q?Caf=C3=A9?=\nMessage-ID: <cafe@example.com>\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=XX\n\n"
        b"--XX\nContent-Type: text/html; charset=utf-8\n\n"
        b"<p>Hi</p><script>alert('pwned')</script>\n--XX--\n"
    )
    post = make_post(
        mlist,
        Status.RETRY,
        {"aperson@example.com": RStatus.SENT, "bperson@example.com": RStatus.DEFERRED},
        raw=raw,
    )
    OutgoingRecipient.objects.filter(address="bperson@example.com").update(
        smtp_code=450, smtp_message="4.2.0 Mailbox busy"
    )
    url = reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])

    response = admin_client.get(url)

    html = response.content.decode()
    assert "Café" in html  # the Subject header, decoded
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    assert "1 / 2 accepted · 1 deferred · 0 bounced · 0 failed" in html
    assert "Deferred by a temporary failure" in html and "4.2.0 Mailbox busy" in html
    assert 'name="_save"' not in html
    assert admin_client.post(url, {"status": Status.DELIVERED}).status_code == 403
    assert admin_client.get(reverse("admin:listdelivery_outgoingmessage_add")).status_code == 403
    post.refresh_from_db()
    assert (post.status, post.raw) == (Status.RETRY, raw)


def test_a_long_post_is_previewed_in_part(admin_client, mlist):
    post = make_post(mlist, raw=post_bytes(body="x" * 25_000))

    response = admin_client.get(
        reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])
    )

    assert "Only the first 20000 of 25001 characters are shown." in response.content.decode()
    assert "x" * 20_001 not in response.content.decode()


def test_retry_now_delivers_a_failed_post_to_the_recipients_that_failed_for_temporary_reasons(
    admin_client, deliver_to, smtpd, mlist, first_post
):
    deliver_to(DELIVERY_RETRY_PERIOD=0)
    smtpd.fail_rcpt = {
        "bperson@example.com": "550 5.1.1 No such user",
        "cperson@example.com": "450 4.2.0 Mailbox busy",
    }
    post = queue_post(
        mlist, first_post, {"recipients": {*mlist.members.values_list("address", flat=True), "x"}}
    )
    run()
    OutgoingMessage.objects.filter(pk=post.pk).update(next_attempt_at=timezone.now())
    run()  # no progress past the (zero) retry period: the post has failed
    post.refresh_from_db()
    assert post.status == Status.FAILED
    smtpd.clear()
    smtpd.fail_rcpt = {}

    response = run_action(admin_client, "outgoingmessage", "retry_now", post)

    assert messages_of(response) == [
        "1 post is due now and will be retried at the next delivery run."
    ]
    post.refresh_from_db()
    assert (post.status, post.deliver_until, post.last_failure_count) == (Status.RETRY, None, 0)
    assert post.next_attempt_at <= timezone.now()
    assert dict(post.recipients.values_list("address", "status")) == {
        "aperson@example.com": RStatus.SENT,
        "bperson@example.com": RStatus.BOUNCED,
        "cperson@example.com": RStatus.PENDING,
        "x": RStatus.FAILED,  # an invalid address stays failed
    }

    run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["cperson@example.com"]]
    post.refresh_from_db()
    assert post.status == Status.DELIVERED


def test_retry_now_leaves_finished_posts_and_live_leases_alone(admin_client, mlist):
    now = timezone.now()
    held = make_post(mlist, Status.HELD, next_attempt_at=now + timedelta(hours=1))
    later = now + timedelta(hours=1)
    busy = make_post(
        mlist,
        Status.RETRY,
        lease_token="abc",
        leased_until=now + timedelta(minutes=5),
        next_attempt_at=later,
    )
    stale = make_post(
        mlist, Status.RETRY, lease_token="old", leased_until=now - timedelta(minutes=1)
    )
    delivered = make_post(mlist, Status.DELIVERED)

    response = run_action(
        admin_client, "outgoingmessage", "retry_now", held, busy, stale, delivered
    )

    assert messages_of(response) == [
        "2 posts are due now and will be retried at the next delivery run. "
        "2 were left alone: delivered, discarded, or being delivered right now."
    ]
    for post in (held, busy, stale, delivered):
        post.refresh_from_db()
    assert (held.status, held.next_attempt_at <= timezone.now()) == (Status.RETRY, True)
    assert (stale.lease_token, stale.leased_until) == ("", None)
    assert (busy.lease_token, busy.next_attempt_at) == ("abc", later)
    assert delivered.status == Status.DELIVERED


def test_discard_stops_waiting_posts_and_says_who_discarded_them(admin_client, mlist):
    queued = make_post(
        mlist,
        Status.QUEUED,
        {"aperson@example.com": RStatus.SENT, "bperson@example.com": RStatus.PENDING},
        lease_token="abc",
        leased_until=timezone.now() + timedelta(minutes=5),
    )
    delivered = make_post(mlist, Status.DELIVERED, {"cperson@example.com": RStatus.SENT})

    response = run_action(
        admin_client, "outgoingmessage", "discard", queued, delivered, confirm="yes"
    )

    assert messages_of(response) == [
        "1 post was discarded. 1 had already finished and was left alone."
    ]
    queued.refresh_from_db()
    assert (queued.status, queued.last_error, queued.lease_token) == (
        Status.DISCARDED,
        "discarded by admin",
        "",
    )
    assert queued.finished_at is not None
    assert dict(queued.recipients.values_list("address", "status")) == {
        "aperson@example.com": RStatus.SENT,
        "bperson@example.com": RStatus.FAILED,
    }
    delivered.refresh_from_db()
    assert delivered.status == Status.DELIVERED


def test_a_discarded_post_is_not_delivered(admin_client, deliver_to, smtpd, mlist, first_post):
    post = queue_post(mlist, first_post)

    run_action(admin_client, "outgoingmessage", "discard", post, confirm="yes")
    run()

    assert smtpd.messages == []


# -- bounce events -----------------------------------------------------------------


def test_bounce_events_are_listed_filtered_and_searched_but_not_edited(admin_client, mlist):
    other = MailingList.objects.create(address="other@example.com")
    refused = BounceEvent.objects.create(
        mailing_list=mlist,
        address="bperson@example.com",
        smtp_code=550,
        smtp_message="No such user",
    )
    probe = BounceEvent.objects.create(
        mailing_list=other,
        address="dave@example.com",
        smtp_code=552,
        smtp_message="Mailbox full",
        context=BounceEvent.Context.PROBE,
    )
    url = reverse("admin:listdelivery_bounceevent_changelist")

    def found(**query):
        return list(admin_client.get(url, query).context["cl"].result_list)

    html = admin_client.get(url).content.decode()
    assert "No such user" in html and "bperson@example.com" in html
    assert found(mailing_list__id__exact=other.pk) == [probe]
    assert found(context__exact="normal") == [refused]
    assert found(smtp_code=550) == [refused]
    assert found(q="full") == [probe]
    assert found(q="bperson") == [refused]
    page = admin_client.get(reverse("admin:listdelivery_bounceevent_change", args=[refused.pk]))
    assert 'name="_save"' not in page.content.decode()
    assert admin_client.get(reverse("admin:listdelivery_bounceevent_add")).status_code == 403


# -- the dashboard -------------------------------------------------------------------


def test_the_admin_index_links_to_the_dashboard(admin_client):
    response = admin_client.get(reverse("admin:index"))

    assert f'href="{reverse(DASHBOARD)}"' in response.content.decode()


def test_the_dashboard_shows_verp_settings_with_where_each_value_came_from(admin_client, settings):
    settings.LISTDELIVERY = {
        "VERP_DELIVERY_INTERVAL": "3",
        "VERP_PERSONALIZED_DELIVERIES": True,
        "DELIVERY_RETRY_PERIOD": "2d",
        "SMTP_HOST": "mail.example.org",
        "SMTP_PASSWORD": PASSWORD,
    }
    settings.LISTDELIVERY_FROM_ENVIRONMENT = ["SMTP_HOST", "SMTP_PASSWORD"]

    response = admin_client.get(reverse(DASHBOARD))

    verp = {row.key: (row.value, row.source) for row in response.context["verp_settings"]}
    assert verp == {
        "VERP_FORMAT": ("${bounces}+${local}=${domain}", "default"),
        "VERP_DELIMITER": ("+", "default"),
        "VERP_PERSONALIZED_DELIVERIES": ("yes", "settings"),
        "VERP_DELIVERY_INTERVAL": ("3", "settings"),
    }
    other = {row.key: (row.value, row.source) for row in response.context["delivery_settings"]}
    assert other["SMTP_HOST"] == ("mail.example.org", "environment")
    assert other["SMTP_PASSWORD"] == ("••••••", "environment")
    assert other["DELIVERY_RETRY_PERIOD"] == ("2 days", "settings")
    assert other["DELIVERY_RETRY_DELAY"] == ("15 minutes", "default")
    assert other["SMTP_USER"] == ("(empty)", "default")
    html = response.content.decode()
    assert "VERP_DELIVERY_INTERVAL" in html and "${bounces}+${local}=${domain}" in html
    assert PASSWORD not in html


def test_an_unset_password_is_shown_as_not_set(admin_client, settings):
    settings.LISTDELIVERY = {}

    response = admin_client.get(reverse(DASHBOARD))

    rows = {row.key: row.value for row in response.context["delivery_settings"]}
    assert rows["SMTP_PASSWORD"] == "(not set)"


def test_a_bad_setting_is_shown_on_the_dashboard_instead_of_breaking_it(admin_client, settings):
    settings.LISTDELIVERY = {"SMTP_PORT": "twenty-five", "SMTP_PASSWORD": 12345}

    response = admin_client.get(reverse(DASHBOARD))

    rows = {row.key: row for row in response.context["delivery_settings"]}
    assert rows["SMTP_PORT"].problem == "'twenty-five' is not a whole number"
    assert (rows["SMTP_PASSWORD"].value, rows["SMTP_PASSWORD"].problem) == ("••••••", "is not text")
    assert "12345" not in response.content.decode()


def test_the_dashboard_shows_the_retry_queue_by_list_and_the_post_counters(admin_client, mlist):
    MailingList.objects.filter(pk=mlist.pk).update(post_id=7)
    other = MailingList.objects.create(address="other@example.com")
    now = timezone.now()
    oldest = make_post(mlist, Status.RETRY, next_attempt_at=now + timedelta(minutes=30))
    OutgoingMessage.objects.filter(pk=oldest.pk).update(created_at=now - timedelta(days=2))
    make_post(mlist, Status.HELD, next_attempt_at=now + timedelta(hours=2))
    make_post(other, Status.QUEUED, next_attempt_at=now + timedelta(minutes=5))
    make_post(other, Status.DELIVERED)

    response = admin_client.get(reverse(DASHBOARD))

    queue = response.context["queue"]
    assert {k: queue["totals"][k] for k in ("total", "queued", "retrying", "held")} == {
        "total": 3,
        "queued": 1,
        "retrying": 1,
        "held": 1,
    }
    assert queue["totals"]["oldest"] == now - timedelta(days=2)
    assert queue["totals"]["next_due"] == now + timedelta(minutes=5)
    by_list = {
        row["list_id"]: (row["queued"], row["retrying"], row["held"]) for row in queue["by_list"]
    }
    assert by_list == {"other.example.com": (1, 0, 0), "test.example.com": (0, 1, 1)}
    assert [(m.address, m.post_id) for m in response.context["counters"]] == [
        ("other@example.com", 1),
        ("test@example.com", 7),
    ]
    assert "3 posts: 1 queued, 1 to retry, 1 held by a server error" in (response.content.decode())


def test_the_dashboard_charts_deliveries_and_failures_by_hour_and_by_day(admin_client, mlist):
    now = timezone.now()
    post = make_post(mlist, Status.DELIVERED)

    def finished(status, ago, count=1):
        """What the runner adds to the hour's totals (nothing for a deferred recipient)."""
        if status != RStatus.DEFERRED:
            hour = progress.hour_of(now - ago)
            row, _ = DeliveryHour.objects.get_or_create(hour=hour, list_id=post.list_id)
            DeliveryHour.objects.filter(pk=row.pk).update(**{status: count})

    finished(RStatus.SENT, timedelta(hours=2), 3)
    finished(RStatus.BOUNCED, timedelta(hours=2))
    finished(RStatus.FAILED, timedelta(minutes=1))
    finished(RStatus.SENT, timedelta(days=10), 2)
    finished(RStatus.SENT, timedelta(days=40), 5)  # too old for either chart
    finished(RStatus.DEFERRED, timedelta(hours=1))  # not finished: deferred is not counted

    response = admin_client.get(reverse(DASHBOARD))

    hours, days = response.context["charts"]
    assert (len(hours.bars), hours.sent, hours.failed) == (24, 3, 2)
    assert (hours.bars[-3].sent, hours.bars[-3].failed, hours.bars[-1].failed) == (3, 1, 1)
    assert (len(days.bars), days.sent, days.failed) == (30, 5, 2)
    assert days.bars[-11].sent == 2
    html = response.content.decode()
    assert html.count('role="img"') == 2
    assert '<title id="chart-hours-title">Last 24 hours, by hour</title>' in html
    assert "accepted (3)" in html and "refused or failed (2)" in html


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (timedelta(days=5), "5 days"),
        (timedelta(minutes=15), "15 minutes"),
        (timedelta(hours=1, minutes=30), "1 hour, 30 minutes"),
        (timedelta(seconds=1), "1 second"),
        (timedelta(seconds=90.5), "1 minute, 30.5 seconds"),
        (timedelta(0), "0 seconds"),
    ],
)
def test_durations_are_shown_the_way_people_say_them(value, shown):
    assert human_duration(value) == shown


# -- at scale ----------------------------------------------------------------------------


def test_pages_and_endpoints_stay_a_few_queries_with_100000_members_and_10000_posts(
    admin_client, mlist, django_assert_max_num_queries
):
    Member.objects.bulk_create(
        (Member(mailing_list=mlist, address=f"member{i:06d}@example.org") for i in range(100_000)),
        batch_size=5000,
    )
    OutgoingMessage.objects.bulk_create(
        (
            OutgoingMessage(
                mailing_list=mlist,
                list_id=mlist.list_id,
                message=post_bytes(message_id=f"<{i}@example.com>"),
                message_id=f"<{i}@example.com>",
                subject=f"Post {i}",
                status=Status.QUEUED if i % 3 else Status.RETRY,
            )
            for i in range(10_000)
        ),
        batch_size=2000,
    )
    some = list(OutgoingMessage.objects.order_by("-pk").values_list("pk", flat=True)[:200])
    OutgoingRecipient.objects.bulk_create(
        (
            OutgoingRecipient(message_id=pk, address=f"r{n}@example.org", status=state)
            for pk in some
            for n, state in enumerate((RStatus.PENDING, RStatus.DEFERRED, RStatus.SENT))
        ),
        batch_size=2000,
    )
    OutgoingMessage.objects.filter(pk__in=some).update(
        recipient_count=3, sent_count=1, deferred_count=1
    )
    admin_client.get(reverse("admin:index"))  # the session is loaded once, outside the counts

    pages = [
        reverse("admin:listdelivery_mailinglist_changelist"),
        reverse("admin:listdelivery_member_changelist"),
        reverse("admin:listdelivery_member_changelist") + f"?mailing_list__id__exact={mlist.pk}",
        reverse("admin:listdelivery_member_changelist") + "?q=member09",
        reverse("admin:listdelivery_outgoingmessage_changelist"),
        reverse("admin:listdelivery_outgoingmessage_changelist") + "?status__exact=retry",
        reverse("admin:listdelivery_bounceevent_changelist"),
        reverse("admin:listdelivery_mailinglist_change", args=[mlist.pk]),
        reverse("admin:listdelivery_outgoingmessage_change", args=[some[0]]),
        reverse(DASHBOARD),
        reverse("listdelivery:health"),
        reverse("listdelivery:metrics"),
    ]
    # The dashboard carries the health banner, whose five queries come on top; the
    # endpoints' own (five for health, eight for metrics) come with the staff session's two.
    most = {reverse(DASHBOARD): 11, reverse("listdelivery:metrics"): 10}
    for url in pages:
        with django_assert_max_num_queries(most.get(url, 8)):
            response = admin_client.get(url)
        assert response.status_code in (200, 503), url

    queue = admin_client.get(reverse("admin:listdelivery_outgoingmessage_changelist"))
    assert "1 / 3 accepted · 1 deferred" in queue.content.decode()


def test_a_post_held_for_an_administrator_says_it_waits_for_one(admin_client, mlist):
    post = make_post(mlist, Status.HELD, next_attempt_at=None, last_error="the server refused")
    html = admin_client.get(reverse("admin:listdelivery_outgoingmessage_changelist")).content
    assert b"when an administrator retries it" in html
    page = admin_client.get(
        reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])
    ).content
    assert b"when an administrator retries it" in page


def test_cancel_asks_first_and_says_what_it_will_do(admin_client, mlist):
    queued = make_post(mlist, Status.QUEUED, {"aperson@example.com": RStatus.PENDING})
    delivered = make_post(mlist, Status.DELIVERED, {"cperson@example.com": RStatus.SENT})

    page = run_action(admin_client, "outgoingmessage", "discard", queued, delivered)

    text = page.content.decode()
    assert "Cancel the delivery of this post?" in text and "cannot be undone" in text
    assert "1 other chosen post has already finished" in text
    assert 'name="confirm" value="yes"' in text
    queued.refresh_from_db()
    assert queued.status == Status.QUEUED, "nothing is cancelled before the confirmation"


# -- the audit trail -------------------------------------------------------------------


def test_every_action_leaves_a_log_entry_saying_who_did_what(admin_client, mlist):
    from django.contrib.admin.models import LogEntry

    post = make_post(mlist, Status.QUEUED, {"aperson@example.com": RStatus.PENDING})
    anne = mlist.members.get(address="aperson@example.com")

    run_action(admin_client, "outgoingmessage", "pause", post)
    run_action(admin_client, "outgoingmessage", "resume", post)
    run_action(admin_client, "outgoingmessage", "retry_now", post)
    run_action(admin_client, "outgoingmessage", "discard", post, confirm="yes")
    run_action(admin_client, "member", "disable_delivery", anne)

    entries = LogEntry.objects.order_by("pk")
    assert [(e.object_id, e.change_message) for e in entries] == [
        (str(post.pk), "Paused delivery."),
        (str(post.pk), "Resumed delivery."),
        (str(post.pk), "Retried now."),
        (str(post.pk), "Cancelled delivery."),
        (str(anne.pk), "Delivery set to “Disabled by a moderator”."),
    ]
    assert {e.user.get_username() for e in entries} == {"admin"}


def test_enable_delivery_leaves_members_who_unsubscribed_themselves_alone(admin_client, mlist):
    anne, bart, cris = mlist.members.all()
    Member.objects.filter(pk=anne.pk).update(delivery_status=DeliveryStatus.BY_USER)
    Member.objects.filter(pk=bart.pk).update(
        delivery_status=DeliveryStatus.BY_BOUNCES, bounce_score=0
    )

    response = run_action(admin_client, "member", "enable_delivery", anne, bart, cris)

    assert messages_of(response) == [
        "Delivery is now “Enabled” for 1 member. "
        "1 member who unsubscribed themselves was left alone."
    ]
    assert dict(mlist.members.values_list("address", "delivery_status")) == {
        "aperson@example.com": DeliveryStatus.BY_USER,
        "bperson@example.com": DeliveryStatus.ENABLED,
        "cperson@example.com": DeliveryStatus.ENABLED,
    }


def test_posts_and_bounce_events_cannot_be_deleted_but_go_with_their_list(admin_client, mlist):
    post = make_post(mlist, Status.DELIVERED, {"aperson@example.com": RStatus.SENT})
    BounceEvent.objects.create(mailing_list=mlist, address="bperson@example.com", smtp_code=550)
    assert (
        'value="delete_selected"'
        not in admin_client.get(
            reverse("admin:listdelivery_outgoingmessage_changelist")
        ).content.decode()
    )
    delete_post = reverse("admin:listdelivery_outgoingmessage_delete", args=[post.pk])
    assert admin_client.get(delete_post).status_code == 403

    page = admin_client.get(reverse("admin:listdelivery_mailinglist_delete", args=[mlist.pk]))
    text = page.content.decode()
    assert "3 members and 1 bounce events are deleted with it; its 1 posts" in text
    assert "bperson@example.com" not in text, "a summary, not every related row"
    admin_client.post(
        reverse("admin:listdelivery_mailinglist_delete", args=[mlist.pk]), {"post": "yes"}
    )
    assert not MailingList.objects.exists() and not BounceEvent.objects.exists()
    post.refresh_from_db()
    assert post.mailing_list is None


# -- how far a post has got, and its story (issue 12) ------------------------------------

QUEUE = "admin:listdelivery_outgoingmessage_changelist"


def post_page(client, post, **query):
    url = reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])
    return client.get(url, query).content.decode()


def button(post, name: str) -> str:
    return reverse(f"admin:listdelivery_outgoingmessage_{name}", args=[post.pk])


def sending_post(mlist, **fields) -> OutgoingMessage:
    now = timezone.now()
    values = {
        "attempts": 1,
        "recipient_count": 20_000,
        "sent_count": 12_345,
        "deferred_count": 12,
        "bounced_count": 3,
        "sending_since": now - timedelta(seconds=15),
        "rate": 850.4,
        "finish_estimate": now,
        "leased_until": now + timedelta(minutes=5),
        **fields,
    }
    return make_post(mlist, Status.SENDING, subject="Today's post", **values)


def test_the_queue_shows_a_sending_post_with_progress_rate_and_finish_estimate(admin_client, mlist):
    post = sending_post(mlist)
    eta = timezone.localtime(post.finish_estimate).strftime("%H:%M UTC")

    html = admin_client.get(reverse(QUEUE)).content.decode()

    assert "Sending" in html and '<progress max="20000" value="12348"' in html
    assert (
        f"12,345 / 20,000 accepted · 12 deferred · 3 bounced · 0 failed · 850/s · done ≈ {eta}"
        in html
    )
    assert "ld-sending" in html and "ld-queued" not in html


def test_the_queue_tells_scheduled_stalled_held_and_paused_posts_apart(admin_client, mlist):
    later = timezone.now() + timedelta(days=2)
    make_post(mlist, Status.QUEUED, subject="Scheduled", next_attempt_at=later)
    sending_post(mlist, leased_until=timezone.now() - timedelta(seconds=1))
    make_post(
        mlist,
        Status.HELD,
        next_attempt_at=None,
        problem="auth",
        last_error="535 5.7.8 Authentication credentials invalid",
    )
    make_post(mlist, Status.PAUSED, {"aperson@example.com": RStatus.PENDING})

    html = admin_client.get(reverse(QUEUE)).content.decode()

    when = timezone.localtime(later).strftime("%-d %b %Y, %H:%M UTC")
    assert f"Scheduled for {when}" in html
    assert "ld-scheduled" in html and "ld-queued" not in html, "scheduled, not queued"
    assert "Sending — stalled, will be taken over" in html
    assert 'title="535 5.7.8 Authentication credentials invalid">Held: auth</div>' in html
    assert "Paused" in html and "0 / 1 accepted" in html


def test_the_queue_costs_the_same_queries_with_300_posts_as_with_one(
    admin_client, mlist, django_assert_num_queries
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    make_post(mlist, Status.RETRY, {"aperson@example.com": RStatus.DEFERRED})
    admin_client.get(reverse("admin:index"))
    with CaptureQueriesContext(connection) as one:
        admin_client.get(reverse(QUEUE))
    OutgoingMessage.objects.bulk_create(
        OutgoingMessage(
            mailing_list=mlist,
            list_id=mlist.list_id,
            message=post_bytes(),
            status=state,
            recipient_count=10,
            sent_count=4,
            problem="connection" if state == Status.HELD else "",
        )
        for state in [Status.SENDING, Status.HELD, Status.PAUSED, Status.DELIVERED] * 75
    )
    with django_assert_num_queries(len(one)):
        html = admin_client.get(reverse(QUEUE)).content.decode()
    assert html.count("4 / 10 accepted") == 100


def test_a_post_page_tells_its_story_after_a_real_delivery(
    admin_client, deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {
        "bperson@example.com": "550 5.1.1 No such user",
        "cperson@example.com": "450 4.2.0 Mailbox busy",
    }
    post = queue_post(mlist, first_post)
    run()
    post.refresh_from_db()
    assert post.status == Status.RETRY

    html = post_page(admin_client, post)

    assert "1 / 3 accepted · 1 deferred · 1 bounced · 0 failed" in html
    attempt = post.attempt_log.get()
    assert f"<td>{attempt.runner}</td>" in html and ">retry</td>" in html
    assert "attempts left no record" not in html and "attempt left no record" not in html
    assert "<td>1</td><td>Refused permanently</td><td>550</td><td>5.1.1 No such user</td>" in html
    assert "4.2.0 Mailbox busy" in html
    assert "No: VERP_DELIVERY_INTERVAL is 0: no post is VERP&#x27;d." in html
    assert '<td id="post-personalization">No personalization</td>' in html
    assert 'id="post-retry"' in html and 'id="post-pause"' in html
    assert 'id="post-resume"' not in html


def test_replies_are_grouped_largest_first_and_pending_recipients_are_never_listed(
    admin_client, mlist
):
    post = make_post(
        mlist, Status.SENDING, attempts=3, leased_until=timezone.now() + timedelta(minutes=1)
    )
    OutgoingRecipient.objects.bulk_create(
        [
            *(
                OutgoingRecipient(
                    message=post,
                    address=f"busy{i}@example.org",
                    status=RStatus.DEFERRED,
                    smtp_code=451,
                    smtp_message="4.7.1 Greylisted",
                )
                for i in range(30)
            ),
            *(
                OutgoingRecipient(
                    message=post,
                    address=f"gone{i}@example.org",
                    status=RStatus.BOUNCED,
                    smtp_code=550,
                    smtp_message="5.1.1 No such user",
                )
                for i in range(5)
            ),
            *(OutgoingRecipient(message=post, address=f"p{i}@example.org") for i in range(500)),
        ]
    )
    DeliveryAttempt.objects.create(
        message=post,
        number=1,
        runner="host:1",
        started_at=timezone.now(),
        finished_at=timezone.now(),
        outcome="retry",
    )

    html = post_page(admin_client, post)

    greylisted = html.index("<td>30</td><td>Deferred by a temporary failure</td><td>451</td>")
    assert greylisted < html.index("<td>5</td><td>Refused permanently</td><td>550</td>")
    assert "p1@example.org" not in html and "Pending" not in html
    # three attempts: one recorded, one running now, one that left nothing behind
    assert "1 attempt left no record (a runner stopped without finishing)." in html


def test_the_decisions_say_why_a_post_was_verped_and_how_it_was_personalized(
    admin_client, settings, mlist
):
    settings.LISTDELIVERY = {"VERP_PERSONALIZED_DELIVERIES": True}
    mlist.personalize = Personalization.FULL
    mlist.save()
    delivered = make_post(
        mlist, Status.DELIVERED, metadata={"verp": True, "personalize": Personalization.FULL}
    )
    forced = make_post(
        mlist, Status.DELIVERED, metadata={"verp": False, "personalize": Personalization.FULL}
    )
    waiting = make_post(mlist, Status.QUEUED)

    assert "Yes: the list is personalized and VERP_PERSONALIZED_DELIVERIES is on." in post_page(
        admin_client, delivered
    )
    assert "One copy per member, addressed to them</td>" in post_page(admin_client, delivered)
    assert "No: set for this post by whoever queued it (its metadata)" in post_page(
        admin_client, forced
    )
    page = post_page(admin_client, waiting)
    assert "Yes, if it were delivered now: the list is personalized" in page
    assert "the list&#x27;s current setting; this post has no record of its own yet." in page


def test_a_held_post_shows_its_problem_with_the_remedy(admin_client, mlist):
    from listdelivery.rules import PROBLEMS

    post = make_post(mlist, Status.HELD, next_attempt_at=None, problem="auth")

    html = post_page(admin_client, post)

    assert "Held: auth" in html and PROBLEMS["auth"] in html
    assert "Held until an administrator retries it." in html


def test_the_progress_fragment_is_polled_only_while_the_post_moves(admin_client, mlist):
    sending = sending_post(mlist)
    delivered = make_post(mlist, Status.DELIVERED, {"aperson@example.com": RStatus.SENT})

    fragment = admin_client.get(button(sending, "progress"))

    assert fragment.status_code == 200
    text = fragment.content.decode()
    assert "data-live" in text and "12,345 / 20,000 accepted" in text
    assert "<html" not in text, "a fragment, not a page"
    assert f'data-url="{button(sending, "progress")}"' in post_page(admin_client, sending)
    assert "data-live" not in admin_client.get(button(delivered, "progress")).content.decode()


def test_the_fragment_needs_view_permission_and_shows_buttons_only_with_change_permission(
    client, django_user_model, viewer, mlist
):
    post = make_post(mlist, Status.RETRY, {"aperson@example.com": RStatus.DEFERRED})
    client.force_login(django_user_model.objects.create_user("nobody", is_staff=True))
    denied = client.get(button(post, "progress"))
    assert denied.status_code == 403
    assert "You do not have permission to see the outgoing messages." in denied.content.decode()

    client.force_login(viewer)
    shown = client.get(button(post, "progress")).content.decode()
    assert "0 / 1 accepted" in shown and "<button" not in shown
    assert 'id="post-pause"' not in post_page(client, post)

    client.force_login(grant(viewer, "change_outgoingmessage"))
    assert 'id="post-pause"' in client.get(button(post, "progress")).content.decode()


def test_pause_resume_and_retry_buttons_act_on_the_post_log_and_come_back(admin_client, mlist):
    from django.contrib.admin.models import LogEntry

    post = make_post(mlist, Status.RETRY, {"aperson@example.com": RStatus.DEFERRED}, attempts=1)
    page = reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])

    paused = admin_client.post(button(post, "pause"))
    assert (paused.status_code, paused.url) == (302, page)
    post.refresh_from_db()
    assert post.status == Status.PAUSED
    html = admin_client.get(page).content.decode()
    assert "1 post was paused." in html and 'id="post-resume"' in html
    assert 'id="post-pause"' not in html

    admin_client.post(button(post, "resume"))
    post.refresh_from_db()
    assert post.status == Status.RETRY
    admin_client.post(button(post, "retry"))

    assert list(LogEntry.objects.order_by("pk").values_list("change_message", flat=True)) == [
        "Paused delivery.",
        "Resumed delivery.",
        "Retried now.",
    ]
    assert admin_client.get(button(post, "pause")).status_code == 405


def test_the_cancel_button_asks_first_and_comes_back_to_the_post(admin_client, mlist):
    post = make_post(mlist, Status.QUEUED, {"aperson@example.com": RStatus.PENDING})
    page = reverse("admin:listdelivery_outgoingmessage_change", args=[post.pk])

    question = admin_client.post(button(post, "cancel"))

    text = question.content.decode()
    assert "Cancel the delivery of this post?" in text
    assert f'href="{page}" class="button cancel-link"' in text
    post.refresh_from_db()
    assert post.status == Status.QUEUED
    answer = admin_client.post(button(post, "cancel"), {"confirm": "yes"})
    assert answer.url == page
    post.refresh_from_db()
    assert post.status == Status.DISCARDED


def test_buttons_without_change_permission_get_a_styled_403_and_change_nothing(
    client, viewer, mlist
):
    post = make_post(mlist, Status.RETRY, {"aperson@example.com": RStatus.DEFERRED})
    client.force_login(viewer)

    for name in ("retry", "pause", "resume", "cancel"):
        response = client.post(button(post, name), {"confirm": "yes"})
        assert response.status_code == 403, name
        text = response.content.decode()
        assert "You do not have permission to change the delivery of posts." in text
        assert 'id="site-name"' in text, "the admin's own page, not a bare 403"
    post.refresh_from_db()
    assert post.status == Status.RETRY


def test_the_dashboard_denies_with_the_admin_look_and_unpermitted_links_are_hidden(client, staff):
    client.force_login(grant(staff, "view_member"))

    denied = client.get(reverse(DASHBOARD))
    members = client.get(reverse("admin:listdelivery_member_changelist")).content.decode()

    assert denied.status_code == 403
    assert "You do not have permission to see the delivery dashboard." in denied.content.decode()
    assert reverse(DASHBOARD) not in members
    assert reverse("admin:listdelivery_bounceevent_changelist") not in members


def test_members_show_their_last_bounce_and_link_to_their_bounce_events(admin_client, mlist):
    other = MailingList.objects.create(address="other@example.com")
    BounceEvent.objects.bulk_create(
        [
            BounceEvent(
                mailing_list=mlist,
                address="bperson@example.com",
                smtp_code=452,
                smtp_message="4.2.2 Mailbox full",
                created_at=timezone.now() - timedelta(days=2),
            ),
            BounceEvent(
                mailing_list=mlist,
                address="BPerson@example.com",
                smtp_code=550,
                smtp_message="5.1.1 No such user",
            ),
            BounceEvent(mailing_list=other, address="bperson@example.com", smtp_code=554),
        ]
    )
    bart = mlist.members.get(address="bperson@example.com")

    html = admin_client.get(reverse("admin:listdelivery_member_changelist")).content.decode()

    assert "550 5.1.1 No such user" in html and "Mailbox full" not in html
    assert html.count(">Show events</a>") == 1, "a link only for members with events"
    link = html.split(">Show events</a>")[0].rsplit('href="', 1)[1].split('"')[0]
    events = admin_client.get(link.replace("&amp;", "&")).context["cl"].result_list
    assert {(e.mailing_list, e.smtp_code) for e in events} == {(mlist, 452), (mlist, 550)}
    page = admin_client.get(reverse("admin:listdelivery_member_change", args=[bart.pk]))
    assert "2 bounce events</a>" in page.content.decode()
    assert "Latest: 550 5.1.1 No such user" in page.content.decode()


def test_the_member_change_list_stays_a_few_queries_with_many_bounces(
    admin_client, mlist, django_assert_max_num_queries
):
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"m{i:04d}@example.org") for i in range(300)
    )
    BounceEvent.objects.bulk_create(
        BounceEvent(mailing_list=mlist, address=f"m{i % 300:04d}@example.org", smtp_code=550)
        for i in range(900)
    )
    admin_client.get(reverse("admin:index"))
    with django_assert_max_num_queries(6):
        html = admin_client.get(reverse("admin:listdelivery_member_changelist")).content
    assert html.count(b">Show events</a>") == 97  # the first page: 100 rows, 3 without events


def test_the_personalization_selects_of_the_lists_change_list_are_labelled(admin_client, mlist):
    html = admin_client.get(reverse("admin:listdelivery_mailinglist_changelist")).content.decode()
    assert 'aria-label="Personalization of test@example.com"' in html


def test_pages_link_to_lists_and_members_only_for_those_who_may_open_them(client, staff, mlist):
    post = make_post(mlist, Status.DELIVERED, {"aperson@example.com": RStatus.SENT})
    list_page = reverse("admin:listdelivery_mailinglist_change", args=[mlist.pk])
    members = reverse("admin:listdelivery_member_changelist")
    client.force_login(grant(staff, "view_outgoingmessage"))
    assert list_page not in post_page(client, post)
    assert "test@example.com" in post_page(client, post)

    client.force_login(grant(staff, "view_mailinglist"))
    assert list_page in post_page(client, post)
    assert members not in client.get(list_page).content.decode()
    assert "3 members (3 with delivery enabled)" in client.get(list_page).content.decode()

    client.force_login(grant(staff, "view_member"))
    assert members in client.get(list_page).content.decode()
