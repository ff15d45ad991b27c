"""Inbound bounces through ``manage.py process_bounce``, and the bounce score."""

from __future__ import annotations

import mailbox
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from listdelivery.bounces import score_bounces
from listdelivery.models import BounceEvent, DeliveryStatus, Member

pytestmark = pytest.mark.django_db

BOUNCES = Path(__file__).parent / "bounces"


def process(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("process_bounce", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("name", "member"),
    [
        ("postfix", "bperson@example.com"),
        ("exim", "cperson@example.com"),
        ("gmail", "aperson@example.com"),
    ],
)
def test_a_dsn_records_a_bounce_for_the_member(mlist, name, member):
    out, err = process(str(BOUNCES / f"{name}.eml"))

    event = BounceEvent.objects.get()
    assert (event.address, event.context, event.mailing_list) == (
        member,
        BounceEvent.Context.BOUNCE,
        mlist,
    )
    assert f"{member} bounced on test@example.com (found by DSN)" in out
    assert err == ""


def test_the_bounce_keeps_the_posts_message_id_and_diagnostic(mlist):
    process(str(BOUNCES / "postfix.eml"))
    event = BounceEvent.objects.get()
    assert event.message_id == "<first>"
    assert "User unknown" in event.smtp_message


def test_a_verpd_envelope_address_names_the_member_even_without_a_dsn(mlist):
    Member.objects.create(mailing_list=mlist, address="Odd+Tag=x@example.org")
    path = BOUNCES.parent / "bounces" / "delay.eml"  # not a permanent failure by its content
    out, _ = process(str(path), "--recipient", "test-bounces+Odd+Tag=x=example.org@example.com")

    assert BounceEvent.objects.get().address == "Odd+Tag=x@example.org"
    assert "found by VERP" in out


def test_a_delay_warning_is_not_a_bounce(mlist):
    _, err = process(str(BOUNCES / "delay.eml"))
    assert "skipped: no permanently failed recipient" in err
    assert not BounceEvent.objects.exists()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            b"From: someone@example.org\nTo: test-bounces@example.com\nSubject: hello\n\nJust saying hi\n",
            "no permanently failed",
        ),
        (b"\x00\x01\x02garbage", "not sent to a list's bounces address"),
        (b"From: x\nTo: nobody-bounces@example.com\n\n", "not sent to a list's bounces address"),
    ],
)
def test_what_is_not_a_usable_bounce_is_reported_and_skipped(mlist, tmp_path, raw, reason):
    path = tmp_path / "message.eml"
    path.write_bytes(raw)
    _, err = process(str(path))
    assert reason in err
    assert not BounceEvent.objects.exists()


def test_a_bounce_for_an_address_that_is_no_member_is_reported(mlist):
    Member.objects.filter(address="bperson@example.com").delete()
    _, err = process(str(BOUNCES / "postfix.eml"))
    assert "skipped bperson@example.com: not a member of test@example.com" in err
    assert not BounceEvent.objects.exists()


def test_a_huge_message_is_skipped(mlist, tmp_path):
    path = tmp_path / "huge.eml"
    path.write_bytes((BOUNCES / "postfix.eml").read_bytes() + b"x" * (11 * 1024 * 1024))
    _, err = process(str(path))
    assert "larger than 10 MB" in err


def test_an_mbox_and_a_maildir_are_read_message_by_message(mlist, tmp_path):
    box = mailbox.mbox(tmp_path / "bounces.mbox")
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    for name in ("postfix", "exim", "delay"):
        raw = (BOUNCES / f"{name}.eml").read_bytes()
        box.add(raw)
        maildir.add(raw)
    box.flush()

    out, err = process(str(tmp_path / "bounces.mbox"), str(tmp_path / "Maildir"))

    assert BounceEvent.objects.count() == 4
    assert "4 bounces recorded, 2 messages skipped" in out


def test_a_missing_path_is_a_clear_error(mlist):
    with pytest.raises(CommandError, match="does not exist"):
        process("/nonexistent/bounce.eml")


def test_the_list_can_be_named_when_the_addresses_do_not_say(mlist, tmp_path):
    raw = (
        (BOUNCES / "postfix.eml")
        .read_bytes()
        .replace(b"test-bounces@example.com", b"postmaster@example.com")
    )
    path = tmp_path / "forwarded.eml"
    path.write_bytes(raw)
    process(str(path), "--list", "test@example.com")
    assert BounceEvent.objects.get().address == "bperson@example.com"


def bounce_on(mlist, address: str, days_ago: int) -> None:
    BounceEvent.objects.create(
        mailing_list=mlist, address=address, created_at=timezone.now() - timedelta(days=days_ago)
    )


def test_five_bouncing_days_disable_delivery_by_bounces(mlist):
    for days_ago in (4, 3, 2, 1):
        bounce_on(mlist, "aperson@example.com", days_ago)
    score_bounces()
    anne = Member.objects.get(address="aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (4, DeliveryStatus.ENABLED)

    bounce_on(mlist, "aperson@example.com", 0)
    score_bounces()

    anne.refresh_from_db()
    assert (anne.bounce_score, anne.delivery_status) == (5, DeliveryStatus.BY_BOUNCES)


def test_several_bounces_on_one_day_count_once(mlist):
    for _ in range(6):
        bounce_on(mlist, "aperson@example.com", 0)
    score_bounces()
    anne = Member.objects.get(address="aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (1, DeliveryStatus.ENABLED)


def test_a_stale_score_starts_again(settings, mlist):
    for days_ago in (30, 29, 28, 27):
        bounce_on(mlist, "aperson@example.com", days_ago)
    bounce_on(mlist, "aperson@example.com", 1)
    score_bounces()
    anne = Member.objects.get(address="aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (1, DeliveryStatus.ENABLED)


def test_refusals_at_delivery_count_toward_the_score_too(deliver_to, smtpd, mlist, first_post):
    from .conftest import queue_post, run

    settings_threshold = {"BOUNCE_SCORE_THRESHOLD": 1}
    deliver_to(**settings_threshold)
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.1.1 No such user"}
    queue_post(mlist, first_post)
    run()

    bart = Member.objects.get(address="bperson@example.com")
    assert (bart.bounce_score, bart.delivery_status) == (1, DeliveryStatus.BY_BOUNCES)
    assert BounceEvent.objects.get().processed
