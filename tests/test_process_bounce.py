"""Inbound bounces through ``manage.py process_bounce``, and the bounce score."""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
import sys
from datetime import timedelta
from email import message_from_bytes
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from listdelivery.bounces import MAX_BOUNCE_BYTES, score_bounces
from listdelivery.models import BounceEvent, DeliveryStatus, MailingList, Member

from .conftest import database_url, queue_post, run

pytestmark = pytest.mark.django_db

BOUNCES = Path(__file__).parent / "bounces"
ROOT = Path(__file__).parent.parent


def process(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("process_bounce", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def fixture(name: str) -> str:
    return str(BOUNCES / name)


def write(tmp_path: Path, raw: bytes, name: str = "message.eml") -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def member(address: str) -> Member:
    return Member.objects.get(address=address)


# -- what a bounce is -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "member"),
    [
        ("postfix", "bperson@example.com"),
        ("exim", "cperson@example.com"),
        ("gmail", "aperson@example.com"),
    ],
)
def test_a_dsn_records_a_bounce_for_the_member(mlist, name, member):
    out, err = process(fixture(f"{name}.eml"))

    event = BounceEvent.objects.get()
    assert (event.address, event.context, event.mailing_list) == (
        member,
        BounceEvent.Context.BOUNCE,
        mlist,
    )
    assert f"{member} bounced on test@example.com (found by DSN)" in out
    assert err == ""


def test_the_bounce_keeps_the_posts_message_id_and_diagnostic(mlist):
    process(fixture("postfix.eml"))
    event = BounceEvent.objects.get()
    assert event.message_id == "<first>"
    assert "User unknown" in event.smtp_message


def test_a_permanent_failure_reported_to_a_verpd_address_counts_for_that_member(mlist):
    """The report names the address Bart forwards to; the VERP'd address names Bart."""
    out, err = process(fixture("postfix-failed-verp.eml"))

    assert BounceEvent.objects.get().address == "bperson@example.com"
    assert "bperson@example.com bounced on test@example.com (found by VERP)" in out
    assert err == ""


def test_a_verpd_bounce_of_no_known_form_names_the_member(mlist, tmp_path):
    """As Mailman: what comes back to a VERP'd address, not a report nor an auto-reply, bounced."""
    Member.objects.create(mailing_list=mlist, address="Odd+Tag=x@example.org")
    raw = (BOUNCES / "unknown-verp.eml").read_bytes()
    raw = raw.replace(b"bperson=example.com", b"Odd+Tag=x=example.org")
    out, _ = process(write(tmp_path, raw))

    assert BounceEvent.objects.get().address == "Odd+Tag=x@example.org"
    assert "found by VERP" in out


def test_a_delay_warning_is_not_a_bounce(mlist):
    _, err = process(fixture("delay.eml"))
    assert "skipped: only a delay warning, no permanent failure" in err
    assert not BounceEvent.objects.exists()


@pytest.mark.parametrize(
    "name", ["postfix-delayed-verp.eml", "exim-delayed-verp.eml", "exim-delayed-plain-verp.eml"]
)
def test_a_delay_warning_sent_to_a_verpd_address_is_not_a_bounce(mlist, name):
    _, err = process(fixture(name))

    assert "skipped:" in err
    assert "delay" in err
    assert not BounceEvent.objects.exists()


@pytest.mark.parametrize("name", ["vacation-verp.eml", "outlook-ooo-verp.eml"])
def test_an_out_of_office_reply_to_a_verpd_address_is_not_a_bounce(mlist, name):
    _, err = process(fixture(name))

    assert "skipped: an automatic reply (" in err
    assert not BounceEvent.objects.exists()


def test_five_days_of_vacation_replies_leave_a_member_enabled(mlist, tmp_path):
    raw = (BOUNCES / "vacation-verp.eml").read_bytes()
    for day in range(5):
        raw = raw.replace(b"-123456-%d@" % day, b"-123456-%d@" % (day + 1))  # a new Message-ID
        process(write(tmp_path, raw, f"reply-{day}.eml"))

    anne = member("aperson@example.com")
    assert (anne.delivery_status, anne.bounce_score) == (DeliveryStatus.ENABLED, 0)
    assert not BounceEvent.objects.exists()


@pytest.mark.parametrize(
    "header",
    [
        b"Auto-Submitted: auto-replied",
        b"X-Autoreply: yes",
        b"Precedence: auto_reply",
        b"Subject: Out of office",
        b"Subject: Vacation reply",
        b"Subject: Automatic reply: My first post",
    ],
)
def test_any_sign_of_an_automatic_reply_keeps_a_verpd_message_from_counting(
    mlist, tmp_path, header
):
    raw = (BOUNCES / "unknown-verp.eml").read_bytes()
    if header.startswith(b"Subject:"):
        raw = raw.replace(b"Subject: Undeliverable: My first post", header, 1)
    else:
        raw = header + b"\n" + raw
    _, err = process(write(tmp_path, raw))

    assert "skipped: an automatic reply (" in err
    assert not BounceEvent.objects.exists()


def test_a_verpd_report_that_says_delivered_is_not_a_bounce(mlist, tmp_path):
    raw = (
        (BOUNCES / "postfix-failed-verp.eml")
        .read_bytes()
        .replace(b"Action: failed", b"Action: delivered")
    )
    _, err = process(write(tmp_path, raw))

    assert "skipped: a delivery report without a permanent failure (action: delivered)" in err
    assert not BounceEvent.objects.exists()


# -- every VERP'd address counts ----------------------------------------------------


def test_every_verpd_address_in_a_bounce_counts(mlist):
    out, _ = process(fixture("sendmail-two-verp.eml"))

    assert sorted(BounceEvent.objects.values_list("address", flat=True)) == [
        "aperson@example.com",
        "cperson@example.com",
    ]
    assert "aperson@example.com bounced on test@example.com (found by VERP)" in out
    assert "cperson@example.com bounced on test@example.com (found by VERP)" in out


def test_the_mtas_envelope_recipient_and_the_headers_count_together(mlist):
    process(
        fixture("postfix-failed-verp.eml"),
        "--recipient",
        "test-bounces+cperson=example.com@example.com",
    )

    assert sorted(BounceEvent.objects.values_list("address", flat=True)) == [
        "bperson@example.com",
        "cperson@example.com",
    ]


# -- VERP_DELIMITER -------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", ["+", "-"])
@pytest.mark.parametrize("list_address", ["test@example.com", "my-list@example.com"])
def test_a_bounce_to_the_verpd_sender_of_a_delivered_copy_finds_the_member(
    deliver_to, smtpd, first_post, tmp_path, delimiter, list_address
):
    """Delivered with either delimiter, bounced back to the envelope sender of Bart's copy."""
    deliver_to(
        VERP_DELIMITER=delimiter, VERP_FORMAT=f"${{bounces}}{delimiter}${{local}}=${{domain}}"
    )
    mlist = MailingList.objects.create(address=list_address)
    for address in ("aperson@example.com", "bperson@example.com"):
        Member.objects.create(mailing_list=mlist, address=address)
    queue_post(mlist, first_post, verp=True)
    run()
    sender = next(m.mail_from for m in smtpd.messages if m.rcpt_tos == ["bperson@example.com"])
    assert sender.startswith(f"{mlist.list_name}-bounces{delimiter}bperson=")

    raw = (BOUNCES / "postfix-failed-verp.eml").read_bytes()
    raw = raw.replace(b"test-bounces+bperson=example.com@example.com", sender.encode())
    out, err = process(write(tmp_path, raw), "--recipient", sender)

    assert BounceEvent.objects.get().address == "bperson@example.com"
    assert f"bperson@example.com bounced on {list_address} (found by VERP)" in out
    assert err == ""


def test_a_plain_report_to_the_bounces_address_finds_the_list_with_a_dash_delimiter(
    settings, mlist
):
    settings.LISTDELIVERY = {"VERP_DELIMITER": "-", "VERP_FORMAT": "${bounces}-${local}=${domain}"}
    out, err = process(fixture("postfix.eml"))
    assert "bperson@example.com bounced on test@example.com (found by DSN)" in out
    assert err == ""


# -- anything at all: a reason, never a crash -----------------------------------------


def nested_multipart(depth: int) -> bytes:
    head = b"From: x@example.org\nTo: test-bounces+aperson=example.com@example.com\n"
    head += b"MIME-Version: 1.0\n"
    for level in range(depth):
        head += b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (level, level)
    tail = b"".join(b"\n--b%d--\n" % level for level in reversed(range(depth)))
    return head + b"Content-Type: text/plain\n\nhello\n" + tail


def nested_messages(depth: int) -> bytes:
    head = b"From: x@example.org\nTo: test-bounces+aperson=example.com@example.com\n"
    return head + b"Content-Type: message/rfc822\n\n" * depth + b"Subject: inner\n\nhello\n"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (nested_multipart(5000), "its MIME parts nest 5000 deep (at most 20 are read)"),
        (nested_messages(5000), "its MIME parts nest too deep to be read"),
    ],
    ids=["multipart", "message-rfc822"],
)
def test_mime_nested_thousands_deep_is_skipped_with_a_reason(mlist, tmp_path, raw, reason):
    out, err = process(write(tmp_path, raw))

    assert f"skipped: {reason}" in err
    assert "0 bounces recorded, 1 messages skipped" in out
    assert not BounceEvent.objects.exists()


def test_a_message_id_of_1100_characters_is_stored_shortened(mlist, tmp_path):
    long_id = "<" + "x" * 1100 + "@example.com>"
    folded = long_id[:500] + "\n " + long_id[500:]
    raw = (BOUNCES / "postfix.eml").read_bytes().replace(b"<first>", folded.encode())
    out, err = process(write(tmp_path, raw))

    event = BounceEvent.objects.get()
    assert event.address == "bperson@example.com"
    assert event.message_id == long_id[:998]
    assert err == ""


def test_a_huge_message_is_skipped(mlist, tmp_path):
    path = tmp_path / "huge.eml"
    path.write_bytes((BOUNCES / "postfix.eml").read_bytes() + b"x" * (11 * 1024 * 1024))
    _, err = process(str(path))
    assert "larger than 10 MB" in err


@pytest.mark.parametrize("kind", ["mbox", "Maildir"])
def test_an_oversize_message_in_a_mailbox_is_skipped_and_the_rest_read(mlist, tmp_path, kind):
    box = mailbox.mbox(tmp_path / kind) if kind == "mbox" else mailbox.Maildir(tmp_path / kind)
    box.add((BOUNCES / "exim.eml").read_bytes() + b"x" * (MAX_BOUNCE_BYTES + 1))
    box.add((BOUNCES / "postfix.eml").read_bytes())
    box.flush()

    out, err = process(str(tmp_path / kind))

    assert err.count("skipped: it is larger than 10 MB") == 1
    assert BounceEvent.objects.get().address == "bperson@example.com"
    assert "1 bounces recorded, 1 messages skipped" in out


def run_command_measured(stdin: bytes) -> dict:
    """``manage.py process_bounce`` in a process of its own: exit code, output, peak memory."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], stdin=sys.stdin, capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'code': done.returncode, 'err': done.stderr, 'kb': peak}))\n"
    )
    command = [sys.executable, "-c", wrapper, sys.executable, "manage.py", "process_bounce"]
    done = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url()},
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.slow
def test_the_command_exits_0_for_hostile_input_on_stdin(mlist):
    result = run_command_measured(nested_multipart(5000))
    assert result["code"] == 0
    assert "stdin: skipped: its MIME parts nest 5000 deep" in result["err"]
    assert "Traceback" not in result["err"]


@pytest.mark.slow
def test_30_mb_on_stdin_is_skipped_without_being_held_in_memory(mlist):
    small = run_command_measured((BOUNCES / "delay.eml").read_bytes())
    large = run_command_measured(b"From: x\n\n" + b"0123456789abcdef\n" * (30 * 1024 * 1024 // 17))

    assert large["code"] == 0
    assert "stdin: skipped: it is larger than 10 MB" in large["err"]
    grown_mb = (large["kb"] - small["kb"]) / 1024
    assert grown_mb < 20, f"reading 30 MB of stdin took {grown_mb:.0f} MB more than a small bounce"


def test_an_mbox_and_a_maildir_are_read_message_by_message(mlist, tmp_path):
    box = mailbox.mbox(tmp_path / "bounces.mbox")
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    for name in ("postfix", "exim", "delay"):
        raw = (BOUNCES / f"{name}.eml").read_bytes()
        box.add(raw)
        maildir.add(raw)
    box.flush()

    out, err = process(str(tmp_path / "bounces.mbox"), str(tmp_path / "Maildir"))

    # the Maildir holds the same two bounces as the mbox: they count once
    assert BounceEvent.objects.count() == 2
    assert "2 bounces recorded, 2 messages skipped" in out
    assert out.count("this bounce was already recorded") == 2


def test_a_missing_path_is_a_clear_error(mlist):
    with pytest.raises(CommandError, match="does not exist"):
        process("/nonexistent/bounce.eml")


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
    _, err = process(write(tmp_path, raw))
    assert reason in err
    assert not BounceEvent.objects.exists()


def test_a_bounce_for_an_address_that_is_no_member_is_reported(mlist):
    Member.objects.filter(address="bperson@example.com").delete()
    _, err = process(fixture("postfix.eml"))
    assert "skipped bperson@example.com: not a member of test@example.com" in err
    assert not BounceEvent.objects.exists()


def test_the_list_can_be_named_when_the_addresses_do_not_say(mlist, tmp_path):
    raw = (
        (BOUNCES / "postfix.eml")
        .read_bytes()
        .replace(b"test-bounces@example.com", b"postmaster@example.com")
    )
    process(write(tmp_path, raw, "forwarded.eml"), "--list", "test@example.com")
    assert BounceEvent.objects.get().address == "bperson@example.com"


# -- one bounce message counts once -----------------------------------------------------


def test_reading_the_same_maildir_twice_records_each_bounce_once(mlist, tmp_path):
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    for name in ("postfix.eml", "exim.eml", "gmail.eml", "sendmail-two-verp.eml"):
        maildir.add((BOUNCES / name).read_bytes())

    first, _ = process(str(tmp_path / "Maildir"))
    second, _ = process(str(tmp_path / "Maildir"))

    assert "5 bounces recorded, 0 messages skipped" in first
    assert "0 bounces recorded, 0 messages skipped" in second
    assert second.count("this bounce was already recorded") == 5
    assert BounceEvent.objects.count() == 5
    assert set(Member.objects.values_list("bounce_score", flat=True)) == {1}


def test_two_copies_of_one_bounce_message_count_once(mlist, tmp_path):
    """The MTA's copy and a forwarded copy differ in their trace headers, not their Message-ID."""
    raw = (BOUNCES / "postfix.eml").read_bytes()
    process(write(tmp_path, raw, "one.eml"))
    process(write(tmp_path, b"Delivered-To: postmaster@example.com\n" + raw, "two.eml"))
    assert BounceEvent.objects.count() == 1


def test_a_bounce_without_a_message_id_read_twice_counts_once(mlist, tmp_path):
    raw = (BOUNCES / "exim.eml").read_bytes()
    raw = raw.replace(b"Message-Id: <E1abcde-0001Xy-AB@exim.example.net>\n", b"")
    assert message_from_bytes(raw)["Message-ID"] is None
    path = write(tmp_path, raw)
    process(path)
    process(path)
    assert BounceEvent.objects.count() == 1


def test_two_different_bounces_for_one_member_are_both_recorded(mlist, tmp_path):
    raw = (BOUNCES / "postfix.eml").read_bytes()
    process(write(tmp_path, raw, "one.eml"))
    process(write(tmp_path, raw.replace(b"3F1A21C0123@", b"4A2B32D1234@"), "two.eml"))
    assert BounceEvent.objects.count() == 2


# -- the bounce score -----------------------------------------------------------------


def bounce_on(mlist, address: str, days_ago: int) -> None:
    BounceEvent.objects.create(
        mailing_list=mlist, address=address, created_at=timezone.now() - timedelta(days=days_ago)
    )


def test_five_bouncing_days_disable_delivery_by_bounces_and_the_score_starts_again(mlist):
    for days_ago in (4, 3, 2, 1):
        bounce_on(mlist, "aperson@example.com", days_ago)
    score_bounces()
    anne = member("aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (4, DeliveryStatus.ENABLED)

    bounce_on(mlist, "aperson@example.com", 0)
    score_bounces()

    anne.refresh_from_db()
    assert (anne.bounce_score, anne.delivery_status) == (0, DeliveryStatus.BY_BOUNCES)
    assert anne.last_bounce_received == timezone.localdate()


@pytest.mark.parametrize(
    "status", [DeliveryStatus.BY_BOUNCES, DeliveryStatus.BY_MODERATOR, DeliveryStatus.BY_USER]
)
def test_bounces_for_a_member_whose_delivery_is_disabled_do_not_add_up(mlist, status):
    Member.objects.filter(address="aperson@example.com").update(
        delivery_status=status, bounce_score=2
    )
    for days_ago in (6, 5, 4, 3, 2, 1, 0):
        bounce_on(mlist, "aperson@example.com", days_ago)
    score_bounces()

    anne = member("aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (2, status)
    assert not BounceEvent.objects.filter(processed=False).exists()


@pytest.mark.parametrize("disabled_by", ["bounces", "a moderator at score 4"])
def test_a_member_enabled_again_is_not_disabled_by_the_next_bounce(
    admin_client, mlist, disabled_by
):
    if disabled_by == "bounces":
        for days_ago in (7, 6, 5, 4, 3):
            bounce_on(mlist, "aperson@example.com", days_ago)
        score_bounces()
    else:
        for days_ago in (6, 5, 4, 3):
            bounce_on(mlist, "aperson@example.com", days_ago)
        score_bounces()
        Member.objects.filter(address="aperson@example.com").update(
            delivery_status=DeliveryStatus.BY_MODERATOR
        )
    assert member("aperson@example.com").delivery_status != DeliveryStatus.ENABLED

    admin_client.post(
        reverse("admin:listdelivery_member_changelist"),
        {"action": "enable_delivery", "_selected_action": [member("aperson@example.com").pk]},
    )
    bounce_on(mlist, "aperson@example.com", 1)
    score_bounces()

    anne = member("aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (1, DeliveryStatus.ENABLED)


def test_several_bounces_on_one_day_count_once(mlist):
    for _ in range(6):
        bounce_on(mlist, "aperson@example.com", 0)
    score_bounces()
    anne = member("aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (1, DeliveryStatus.ENABLED)


def test_a_stale_score_starts_again(settings, mlist):
    for days_ago in (30, 29, 28, 27):
        bounce_on(mlist, "aperson@example.com", days_ago)
    bounce_on(mlist, "aperson@example.com", 1)
    score_bounces()
    anne = member("aperson@example.com")
    assert (anne.bounce_score, anne.delivery_status) == (1, DeliveryStatus.ENABLED)


def test_refusals_at_delivery_count_toward_the_score_too(deliver_to, smtpd, mlist, first_post):
    deliver_to(BOUNCE_SCORE_THRESHOLD=1)
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.1.1 No such user"}
    queue_post(mlist, first_post)
    run()

    bart = member("bperson@example.com")
    assert (bart.bounce_score, bart.delivery_status) == (0, DeliveryStatus.BY_BOUNCES)
    assert BounceEvent.objects.get().processed
