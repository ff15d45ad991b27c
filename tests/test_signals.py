"""Signals a host site connects to: sent once the change is committed, never disturbing delivery."""

from __future__ import annotations

import pytest
from django.urls import reverse

from listdelivery import signals
from listdelivery.admin import discard_posts
from listdelivery.models import DeliveryStatus, Member, OutgoingMessage, Personalization
from listdelivery.tokens import make_token

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db
Status = OutgoingMessage.Status


@pytest.fixture
def heard():
    """Connect a receiver to every signal; yields the list of (signal name, arguments)."""
    calls: list[tuple[str, dict]] = []
    receivers = {}
    names = [
        "member_unsubscribed",
        "member_disabled_by_bounces",
        "post_delivered",
        "post_failed",
        "post_discarded",
        "post_held",
    ]
    for name in names:

        def receiver(sender, signal, name=name, **arguments):
            calls.append((name, {"sender": sender, **arguments}))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield calls
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def test_a_delivered_post_is_announced_after_its_status_is_committed(
    deliver_to, smtpd, mlist, first_post, heard, django_capture_on_commit_callbacks
):
    row = queue_post(mlist, first_post)
    with django_capture_on_commit_callbacks(execute=True):
        run()
    assert [name for name, _ in heard] == ["post_delivered"]
    arguments = heard[0][1]
    assert arguments["sender"] is OutgoingMessage
    assert arguments["post"].pk == row.pk and arguments["mailing_list"] == mlist
    assert OutgoingMessage.objects.get(pk=row.pk).status == Status.DELIVERED


def test_a_post_nobody_accepted_is_announced_as_failed_with_its_reason(
    deliver_to, smtpd, mlist, first_post, heard, django_capture_on_commit_callbacks
):
    smtpd.fail_rcpt = {
        a: "550 5.1.1 No such user"
        for a in ("aperson@example.com", "bperson@example.com", "cperson@example.com")
    }
    queue_post(mlist, first_post)
    with django_capture_on_commit_callbacks(execute=True):
        run()
    names = [name for name, _ in heard]
    assert "post_failed" in names
    assert "no recipient accepted" in dict(heard)["post_failed"]["reason"]


@pytest.mark.parametrize(
    ("reply", "needs_admin"),
    [("554 5.7.1 Message content rejected", True), ("451 4.3.0 later", None)],
)
def test_a_held_post_is_announced_with_its_reason_and_whether_it_waits_for_an_administrator(
    deliver_to,
    smtpd,
    mlist,
    first_post,
    heard,
    django_capture_on_commit_callbacks,
    reply,
    needs_admin,
):
    smtpd.fail_data = reply
    queue_post(mlist, first_post)
    with django_capture_on_commit_callbacks(execute=True):
        run()
    held = [arguments for name, arguments in heard if name == "post_held"]
    if needs_admin is None:  # a 4xx is a retry, not a hold: no news
        assert held == []
    else:
        assert held[0]["needs_admin"] is needs_admin
        assert "Message content rejected" in held[0]["reason"]


def test_a_server_error_hold_is_announced_as_retried_by_itself(
    deliver_to, smtpd, mlist, first_post, heard, django_capture_on_commit_callbacks
):
    smtpd.fail_mail = "550 5.7.1 Sender rejected"
    queue_post(mlist, first_post)
    with django_capture_on_commit_callbacks(execute=True):
        run()
    held = [arguments for name, arguments in heard if name == "post_held"]
    assert held[0]["needs_admin"] is False and "Sender rejected" in held[0]["reason"]


def test_a_post_discarded_in_the_admin_is_announced_with_who_did_it(
    deliver_to, mlist, first_post, heard, django_capture_on_commit_callbacks
):
    row = queue_post(mlist, first_post)
    with django_capture_on_commit_callbacks(execute=True):
        assert discard_posts(OutgoingMessage.objects.filter(pk=row.pk), "admin") == 1
    assert [(name, arguments["reason"]) for name, arguments in heard] == [
        ("post_discarded", "discarded by admin")
    ]
    assert heard[0][1]["post"].status == Status.DISCARDED


def test_a_one_click_unsubscribe_is_announced_once(
    client, mlist, heard, django_capture_on_commit_callbacks
):
    member = mlist.members.get(address="aperson@example.com")
    url = reverse("listdelivery:unsubscribe", args=[make_token(mlist.pk, member.pk)])
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(url).status_code == 200
        assert client.post(url).status_code == 200  # a replay changes nothing
    assert [(name, a["member"].pk, a["how"]) for name, a in heard] == [
        ("member_unsubscribed", member.pk, "one-click")
    ]


def test_a_member_disabled_by_bounces_is_announced_with_the_score(
    deliver_to, smtpd, mlist, first_post, heard, django_capture_on_commit_callbacks
):
    deliver_to(BOUNCE_SCORE_THRESHOLD=1)
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.1.1 No such user"}
    queue_post(mlist, first_post)
    with django_capture_on_commit_callbacks(execute=True):
        run()
    disabled = [arguments for name, arguments in heard if name == "member_disabled_by_bounces"]
    assert [(a["member"].address, a["bounce_score"]) for a in disabled] == [
        ("bperson@example.com", 1)
    ]
    assert Member.objects.get(address="bperson@example.com").delivery_status == (
        DeliveryStatus.BY_BOUNCES
    )


def test_a_receiver_that_raises_never_disturbs_delivery(
    deliver_to, smtpd, mlist, first_post, django_capture_on_commit_callbacks, caplog
):
    def broken(sender, **arguments):
        raise RuntimeError("the host's table is gone")

    signals.post_delivered.connect(broken)
    try:
        row = queue_post(mlist, first_post)
        with django_capture_on_commit_callbacks(execute=True):
            summary = run()
    finally:
        signals.post_delivered.disconnect(broken)
    assert summary.delivered == 1
    assert OutgoingMessage.objects.get(pk=row.pk).status == Status.DELIVERED
    assert "the host's table is gone" in caplog.text
