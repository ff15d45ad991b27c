"""The guarantee in a hostile world: failing writes, poison posts, odd replies, and what they mean.

Each test names what a list administrator would notice. The server is a real
aiosmtpd server with the fault injected; the database is real, and where a
write must fail, a trigger in the database makes it fail.
"""

from __future__ import annotations

import logging

import pytest
from django.db import connection

from listdelivery.admin import discard_posts, retry_posts
from listdelivery.delivery import BaseDelivery
from listdelivery.models import BounceEvent, OutgoingMessage, OutgoingRecipient, Personalization
from listdelivery.runner import OutgoingRunner

from .conftest import THREE, make_due, queue_post, run, statuses

pytestmark = pytest.mark.django_db

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


class failing_inserts:
    """A database trigger that makes every INSERT into ``table`` fail, as a full disk would."""

    def __init__(self, table: str) -> None:
        self.table = table

    def __enter__(self) -> None:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(
                    "CREATE FUNCTION listdelivery_test_refuse() RETURNS trigger AS "
                    "$$ BEGIN RAISE EXCEPTION 'no space left on device'; END $$ LANGUAGE plpgsql"
                )
                cursor.execute(
                    f"CREATE TRIGGER listdelivery_test_refuse BEFORE INSERT ON {self.table} "
                    "FOR EACH ROW EXECUTE FUNCTION listdelivery_test_refuse()"
                )
            else:
                cursor.execute(
                    f"CREATE TRIGGER listdelivery_test_refuse BEFORE INSERT ON {self.table} "
                    "BEGIN SELECT RAISE(ABORT, 'no space left on device'); END"
                )

    def __exit__(self, *exc_info) -> None:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(f"DROP TRIGGER listdelivery_test_refuse ON {self.table}")
                cursor.execute("DROP FUNCTION listdelivery_test_refuse()")
            else:
                cursor.execute("DROP TRIGGER listdelivery_test_refuse")


# -- what a server accepted is never sent again ------------------------------------------


def test_a_checkpoint_that_cannot_be_saved_still_records_who_the_server_accepted(
    deliver_to, smtpd, mlist, first_post, caplog
):
    deliver_to(UNEXPECTED_ERROR_LIMIT=3)
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.1.1 No such user"}
    row = queue_post(mlist, first_post)

    with failing_inserts(BounceEvent._meta.db_table), caplog.at_level(logging.ERROR):
        run()
        row.refresh_from_db()
        assert row.status == Status.RETRY
        assert "no space left on device" in row.last_error
        assert statuses(row) == {
            "aperson@example.com": RStatus.SENT,
            "bperson@example.com": RStatus.PENDING,
            "cperson@example.com": RStatus.SENT,
        }
        for _ in range(2):
            make_due(row)
            run()

    # Every attempt after the first offered the post to the refused member only.
    assert [m.rcpt_tos for m in smtpd.messages] == [["aperson@example.com", "cperson@example.com"]]
    assert smtpd.recipients_count() == {"aperson@example.com": 1, "cperson@example.com": 1}
    row.refresh_from_db()
    assert row.status == Status.FAILED
    assert "3 times in a row" in row.last_error and "no space left" in row.last_error
    assert statuses(row)["bperson@example.com"] == RStatus.FAILED
    assert run().posts == 0  # final: never retried again


def test_a_folded_message_id_of_1100_characters_and_a_refusal_are_recorded(
    deliver_to, smtpd, mlist
):
    from email import message_from_string

    long_id = "<" + "x" * 1100 + "@example.com>"
    msg = message_from_string(
        f"From: a@example.com\nSubject: long id\nMessage-ID:\n {long_id}\n\nBody\n"
    )
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.1.1 No such user"}
    row = queue_post(mlist, msg)
    run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED
    bounce = BounceEvent.objects.get()
    assert bounce.address == "bperson@example.com"
    assert len(bounce.message_id) <= 998 and bounce.message_id.startswith("<xxx")
    make_due(row)
    assert run().posts == 0
    assert len(smtpd.messages) == 1


# -- poison posts reach a final status -----------------------------------------------


class ExplodingDelivery(BaseDelivery):
    """A site's own delivery module with a bug: it raises on every post."""

    def transactions(self, post, recipients):
        raise ValueError("this module cannot build a transaction")


def test_a_post_that_raises_every_time_fails_with_a_readable_reason_after_the_limit(
    deliver_to, smtpd, mlist, first_post
):
    deliver_to(UNEXPECTED_ERROR_LIMIT=3, BULK_DELIVERY=f"{__name__}.ExplodingDelivery")
    row = queue_post(mlist, first_post)

    for attempt in range(1, 4):
        run()
        row.refresh_from_db()
        if attempt < 3:
            assert row.status == Status.RETRY
            assert f"unexpected error ({attempt} of 3" in row.last_error
            make_due(row)

    assert row.status == Status.FAILED
    assert "ValueError: this module cannot build a transaction" in row.last_error
    assert set(statuses(row).values()) == {RStatus.FAILED}
    assert smtpd.messages == []


def test_a_success_after_an_unexpected_error_starts_the_count_again(
    deliver_to, smtpd, mlist, first_post
):
    deliver_to(UNEXPECTED_ERROR_LIMIT=2, BULK_DELIVERY=f"{__name__}.ExplodingDelivery")
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert row.unexpected_errors == 1

    deliver_to(UNEXPECTED_ERROR_LIMIT=2)
    make_due(row)
    run()
    row.refresh_from_db()
    assert (row.status, row.unexpected_errors) == (Status.DELIVERED, 0)


class LeakyDelivery(BaseDelivery):
    """A site's own delivery module whose error message quotes the password."""

    def transactions(self, post, recipients):
        raise RuntimeError(f"cannot log in with {self.config['SMTP_PASSWORD']}")


def test_an_unexpected_error_never_shows_the_smtp_password(deliver_to, smtpd, mlist, first_post):
    deliver_to(SMTP_PASSWORD="s3cret-Pässword", BULK_DELIVERY=f"{__name__}.LeakyDelivery")
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert "s3cret" not in row.last_error and "********" in row.last_error


# -- a discard stops a post wherever it is ------------------------------------------------


def test_a_post_discarded_while_it_waits_in_another_runners_claim_is_never_sent(
    deliver_to, smtpd, mlist, first_post
):
    first = queue_post(mlist, first_post, {"recipients": ["one@example.com"]})
    second = queue_post(mlist, first_post, {"recipients": ["two@example.com"]})

    def administrator_discards_the_second(row, summary):
        if row.pk == first.pk:
            discard_posts(OutgoingMessage.objects.filter(pk=second.pk), "admin")

    OutgoingRunner(on_post=administrator_discards_the_second).run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["one@example.com"]]
    second.refresh_from_db()
    assert (second.status, second.last_error) == (Status.DISCARDED, "discarded by admin")


# -- failures classified by their enhanced status codes -------------------------------------


def test_content_refused_at_data_on_a_personalized_list_bounces_nobody_and_holds_the_post(
    deliver_to, smtpd, mlist, first_post
):
    mlist.personalize = Personalization.FULL
    mlist.save()
    smtpd.fail_data = "554 5.7.1 Message content rejected"
    row = queue_post(mlist, first_post)
    run()

    row.refresh_from_db()
    assert row.status == Status.HELD
    assert row.next_attempt_at is None, "a refused post is not re-sent until someone acts"
    assert "5.7.1 Message content rejected" in row.last_error
    assert "administrator" in row.last_error
    assert not BounceEvent.objects.exists()
    assert set(statuses(row).values()) == {RStatus.DEFERRED}
    assert run().posts == 0

    smtpd.fail_data = None
    retry_posts(OutgoingMessage.objects.filter(pk=row.pk))
    run()
    assert smtpd.recipients_count() == {address: 1 for address in THREE}


@pytest.mark.parametrize(
    "reply",
    ["550 5.1.1 User unknown", "552 5.2.2 Mailbox full", "550 5.2.1 Mailbox disabled"],
)
def test_a_mailbox_refusal_at_data_is_that_members_bounce(
    deliver_to, smtpd, mlist, first_post, reply
):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    smtpd.fail_data = reply
    queue_post(mlist, first_post, {"recipients": ["only@example.com"]})
    run()
    if reply.startswith("552"):  # 552 is never permanent (RFC 5321 lets it mean "too many")
        assert not BounceEvent.objects.exists()
    else:
        assert BounceEvent.objects.get().address == "only@example.com"


def test_relay_access_denied_for_everyone_holds_the_post_and_bounces_nobody(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {a: f"554 5.7.1 <{a}>: Relay access denied" for a in THREE}
    row = queue_post(mlist, first_post)
    run()

    row.refresh_from_db()
    assert row.status == Status.HELD
    assert "Relay access denied" in row.last_error
    assert row.next_attempt_at is not None, "a server problem is retried on the backoff"
    assert not BounceEvent.objects.exists()
    assert set(statuses(row).values()) == {RStatus.DEFERRED}


def test_one_policy_refusal_among_accepted_recipients_fails_that_one_without_a_bounce(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {"bperson@example.com": "550 5.7.1 Recipient rejected by policy"}
    row = queue_post(mlist, first_post)
    run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED
    assert statuses(row)["bperson@example.com"] == RStatus.FAILED
    assert not BounceEvent.objects.exists()
    assert smtpd.recipients_count() == {"aperson@example.com": 1, "cperson@example.com": 1}


# -- replies that ask for another transaction, not a retry delay --------------------------


def test_too_many_recipients_sends_the_rest_in_new_transactions_at_once(
    deliver_to, smtpd, mlist, first_post
):
    deliver_to(MAX_RECIPIENTS=20)
    smtpd.max_recipients = 5
    recipients = [f"member{i:02d}@example.com" for i in range(17)]
    row = queue_post(mlist, first_post, {"recipients": recipients})
    summary = run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED, row.last_error
    assert smtpd.recipients_count() == {address: 1 for address in recipients}
    assert max(len(m.rcpt_tos) for m in smtpd.messages) == 5
    assert summary.posts == 1 and not BounceEvent.objects.exists()


def test_a_hang_up_after_too_many_errors_keeps_the_refusals_and_delivers_the_rest(
    deliver_to, smtpd, mlist, first_post
):
    """Postfix's smtpd_hard_error_limit: answered refusals are facts; the rest go out again."""
    deliver_to(MAX_RECIPIENTS=50)
    smtpd.hard_error_limit = 5
    unknown = [f"nobody{i:02d}@example.com" for i in range(12)]
    valid = [f"member{i:02d}@example.com" for i in range(10)]
    smtpd.fail_rcpt = {a: "550 5.1.1 User unknown" for a in unknown}
    row = queue_post(mlist, first_post, {"recipients": unknown + valid})
    run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED, row.last_error
    assert smtpd.recipients_count() == {address: 1 for address in valid}
    assert set(BounceEvent.objects.values_list("address", flat=True)) == set(unknown)
    assert BounceEvent.objects.count() == len(unknown)


def test_a_refused_verp_sender_falls_back_to_the_plain_bounces_address_for_that_copy(
    deliver_to, smtpd, mlist, first_post
):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    smtpd.max_local_part = 40
    long_local = "a.member.with.a.rather.long.local.part"
    recipients = ["anne@example.com", f"{long_local}@example.com"]
    row = queue_post(mlist, first_post, {"recipients": recipients}, verp=True)
    run()

    row.refresh_from_db()
    assert row.status == Status.DELIVERED, row.last_error
    senders = {m.rcpt_tos[0]: m.mail_from for m in smtpd.messages}
    assert senders == {
        "anne@example.com": "test-bounces+anne=example.com@example.com",
        f"{long_local}@example.com": "test-bounces@example.com",
    }


# -- a post the server will never take is held, once --------------------------------------


def test_a_post_over_the_servers_size_limit_is_held_without_uploading_it(
    deliver_to, smtpd, mlist, first_post, caplog
):
    from email import message_from_string

    smtpd.size_limit = 2000
    big = message_from_string("From: a@example.com\nSubject: big\n\n" + "line of text\n" * 400)
    row = queue_post(mlist, big)
    run()

    row.refresh_from_db()
    assert row.status == Status.HELD
    assert row.next_attempt_at is None
    assert "5.3.4" in row.last_error and "2000" in row.last_error
    assert smtpd.messages == [] and not BounceEvent.objects.exists()
    assert run().posts == 0, "held for an administrator: no automatic re-upload"


def test_a_size_refused_at_data_holds_the_post_for_an_administrator(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_data = "552 5.3.4 Message file too big"
    row = queue_post(mlist, first_post)
    run()
    row.refresh_from_db()
    assert (row.status, row.next_attempt_at) == (Status.HELD, None)
    assert "Message file too big" in row.last_error
    assert not BounceEvent.objects.exists()


def test_an_unreadable_reply_code_defers_the_recipient_and_says_so(
    deliver_to, smtpd, mlist, first_post
):
    smtpd.fail_rcpt = {"bperson@example.com": "4x1 try later"}
    row = queue_post(mlist, first_post)
    run()

    row.refresh_from_db()
    assert row.status == Status.RETRY
    bart = row.recipients.get(address="bperson@example.com")
    assert (bart.status, bart.smtp_code) == (RStatus.DEFERRED, None)
    assert "unreadable reply" in bart.smtp_message and "4x1 try later" in bart.smtp_message
    make_due(row)
    smtpd.fail_rcpt = {}
    run()
    assert smtpd.recipients_count() == {address: 1 for address in THREE}


def test_a_non_ascii_password_that_is_wrong_holds_the_post_and_never_shows_it(
    settings, mlist, first_post, caplog
):
    from listdelivery.testing import SMTPTestServer

    with SMTPTestServer(auth=("list", "right-pässword")) as server:
        settings.LISTDELIVERY = {
            "SMTP_HOST": server.host,
            "SMTP_PORT": server.port,
            "SMTP_USER": "list",
            "SMTP_PASSWORD": "wröng-pässword",
        }
        row = queue_post(mlist, first_post)
        with caplog.at_level(logging.DEBUG, logger="listdelivery"):
            run()
        row.refresh_from_db()
        assert row.status == Status.HELD
        assert "auth" in row.last_error
        for text in (row.last_error, caplog.text):
            assert "wröng" not in text and "ö" not in text

        settings.LISTDELIVERY = {**settings.LISTDELIVERY, "SMTP_PASSWORD": "right-pässword"}
        make_due(row)
        run()
        assert [m.rcpt_tos for m in server.messages] == [THREE]


def test_a_member_written_in_another_case_gets_their_own_one_click_link(
    deliver_to, smtpd, mlist, first_post
):
    """Issue 10, point 20: the member is found whatever the case of the recipient address."""
    from listdelivery.models import Member
    from listdelivery.tokens import read_token

    deliver_to(UNSUBSCRIBE_BASE_URL="https://lists.example.com")
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    queue_post(mlist, first_post, {"recipients": ["BPerson@Example.com"]})
    run()

    copy = smtpd.messages[0].message
    links = " ".join(str(copy["List-Unsubscribe"]).split())
    assert copy["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = links.split("<", 1)[1].split(">", 1)[0]
    assert url.startswith("https://lists.example.com/lists/unsubscribe/")
    token = url.rstrip("/").rsplit("/", 1)[1]
    assert read_token(token) == (mlist.pk, Member.objects.get(address="bperson@example.com").pk)


@pytest.mark.parametrize("table", ["listdelivery_deliveryhour", "listdelivery_deliveryattempt"])
def test_when_the_books_cannot_be_written_the_post_is_still_delivered_once(
    deliver_to, smtpd, mlist, first_post, table, caplog
):
    # The hourly totals and the attempt history are books kept beside the recipients:
    # when they cannot be written, the post is still delivered once and says so.
    row = queue_post(mlist, first_post)
    with failing_inserts(table), caplog.at_level(logging.ERROR):
        run()
    row.refresh_from_db()
    assert (row.status, set(statuses(row).values())) == (Status.DELIVERED, {RStatus.SENT})
    assert smtpd.recipients_count() == dict.fromkeys(THREE, 1)
    assert "no space left on device" in caplog.text
    assert run().posts == 0
