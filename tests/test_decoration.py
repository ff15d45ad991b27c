"""Header and footer decoration, list headers, and RFC 8058 one-click unsubscribe."""

from __future__ import annotations

import re
import time
from email import message_from_string
from email.message import EmailMessage

import pytest
from django.test import Client

from listdelivery.decorate import attach
from listdelivery.models import DeliveryStatus, Member, OutgoingMessage, Personalization

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

FOOTER = "-- \n$display_name -- $listname\nYou are $user_name_or_address <$user_address>\n"


@pytest.fixture
def decorated(mlist):
    mlist.footer = FOOTER
    mlist.save()
    return mlist


def by_recipient(smtpd) -> dict:
    return {m.rcpt_tos[0]: m.message for m in smtpd.messages}


def test_bulk_gets_the_footer_once_without_member_data(deliver_to, smtpd, decorated, first_post):
    queue_post(decorated, first_post)
    run()

    (received,) = smtpd.messages
    message = received.message
    assert message.get_payload(decode=True).decode() == (
        "First post!\n-- \nTest -- test@example.com\nYou are $user_name_or_address <$user_address>\n"
    )
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "text/plain"
    assert message["Subject"] == "My first post"


def test_each_personalized_copy_gets_its_members_footer(deliver_to, smtpd, decorated, first_post):
    decorated.personalize = Personalization.INDIVIDUAL
    decorated.save()
    Member.objects.create(
        mailing_list=decorated, address="jm@example.org", display_name="Jürgen Müller"
    )
    queue_post(decorated, first_post)
    run()

    footers = {
        rcpt: m.get_payload(decode=True).decode("utf-8") for rcpt, m in by_recipient(smtpd).items()
    }
    assert footers["aperson@example.com"].endswith("You are Anne Person <aperson@example.com>\n")
    assert footers["jm@example.org"].endswith("You are Jürgen Müller <jm@example.org>\n")
    assert all(
        f.startswith("First post!\n-- \nTest -- test@example.com\n") for f in footers.values()
    )


def test_a_non_ascii_body_is_re_encoded_with_the_footer(deliver_to, smtpd, decorated):
    decorated.personalize = Personalization.FULL
    decorated.save()
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "Grüße"
    msg.set_content("Grüße aus Köln\n", charset="iso-8859-1", cte="quoted-printable")
    queue_post(decorated, msg, {"recipients": ["aperson@example.com"]})
    run()

    (message,) = by_recipient(smtpd).values()
    text = message.get_payload(decode=True).decode(message.get_content_charset())
    assert text.startswith("Grüße aus Köln\n-- \n")
    assert text.endswith("You are Anne Person <aperson@example.com>\n")
    assert message["To"] == "Anne Person <aperson@example.com>"


def test_a_multipart_mixed_post_gets_inline_parts_before_and_after(deliver_to, smtpd, decorated):
    decorated.header = "Header for $user_address"
    decorated.personalize = Personalization.INDIVIDUAL
    decorated.save()
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "with attachment"
    msg.set_content("Body text\n")
    msg.add_attachment(
        b"\x00\x01binary", maintype="application", subtype="octet-stream", filename="a.bin"
    )
    queue_post(decorated, msg, {"recipients": ["aperson@example.com"]})
    run()

    (message,) = by_recipient(smtpd).values()
    parts = message.get_payload()
    assert message.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "text/plain",
        "application/octet-stream",
        "text/plain",
    ]
    assert parts[0].get_payload(decode=True).decode() == "Header for aperson@example.com\n"
    assert parts[1].get_payload(decode=True).decode() == "Body text\n"
    assert parts[2].get_payload(decode=True) == b"\x00\x01binary"
    assert "You are Anne Person" in parts[3].get_payload(decode=True).decode()


def test_an_html_only_post_is_wrapped(deliver_to, smtpd, decorated):
    msg = message_from_string(
        "From: a@example.com\nSubject: html\nMIME-Version: 1.0\n"
        "Content-Type: text/html; charset=utf-8\n\n<p>Hello</p>\n"
    )
    queue_post(decorated, msg)
    run()

    message = smtpd.messages[0].message
    assert message.get_content_type() == "multipart/mixed"
    inner, footer = message.get_payload()
    assert inner.get_content_type() == "text/html"
    assert inner.get_payload().strip() == "<p>Hello</p>"
    assert footer.get_payload(decode=True).decode().startswith("-- \nTest -- test@example.com")


def test_without_header_or_footer_the_body_is_untouched():
    raw = b"From: a@example.com\r\nSubject: x\r\n\r\nBody\r\n"
    assert attach(raw, "", "") == raw


def test_a_retry_is_decorated_once(deliver_to, smtpd, decorated, first_post):
    smtpd.fail_rcpt = {"cperson@example.com": "450 busy"}
    row = queue_post(decorated, first_post)
    run()
    smtpd.clear()
    OutgoingMessage.objects.filter(pk=row.pk).update(next_attempt_at=row.created_at)
    run()

    (received,) = smtpd.messages
    assert received.rcpt_tos == ["cperson@example.com"]
    assert received.message.get_payload(decode=True).decode().count("Test -- test@example.com") == 1


def test_nodecorate_skips_header_and_footer_but_keeps_the_list_headers(
    deliver_to, smtpd, decorated, first_post
):
    queue_post(decorated, first_post, nodecorate=True)
    run()
    message = smtpd.messages[0].message
    assert message.get_payload() == "First post!\n"
    assert message["List-Id"] == "Test <test.example.com>"


@pytest.mark.parametrize(
    "personalize", [Personalization.NONE, Personalization.INDIVIDUAL, Personalization.FULL]
)
def test_every_copy_carries_the_list_headers_and_replaces_the_posts_own(
    deliver_to, smtpd, mlist, personalize
):
    mlist.personalize = personalize
    mlist.archive_url = "https://archive.example.com/test/"
    mlist.save()
    msg = message_from_string(
        "From: a@example.com\nList-Id: <forged.example.net>\nSubject: s\n\nBody\n"
    )
    queue_post(mlist, msg)
    run()

    assert smtpd.messages
    for received in smtpd.messages:
        message = received.message
        assert message.get_all("List-Id") == ["Test <test.example.com>"]
        assert message["List-Post"] == "<mailto:test@example.com>"
        assert message["List-Unsubscribe"] == "<mailto:test-leave@example.com>"
        assert message["List-Archive"] == "<https://archive.example.com/test/>"
        assert message["List-Unsubscribe-Post"] is None


@pytest.fixture
def one_click(deliver_to, mlist):
    deliver_to(UNSUBSCRIBE_BASE_URL="https://lists.example.com")
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    return mlist


def unsubscribe_urls(smtpd) -> dict[str, str]:
    urls = {}
    for rcpt, message in by_recipient(smtpd).items():
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url, mailto = re.fullmatch(
            r"<(https://[^>]+)>, <(mailto:[^>]+)>", " ".join(message["List-Unsubscribe"].split())
        ).groups()
        assert mailto == "mailto:test-leave@example.com"
        urls[rcpt] = url
    return urls


def test_personalized_copies_get_a_one_click_link_of_their_own(smtpd, one_click, first_post):
    queue_post(one_click, first_post)
    run()

    urls = unsubscribe_urls(smtpd)
    assert len(set(urls.values())) == 3
    assert all(
        url.startswith("https://lists.example.com/lists/unsubscribe/") for url in urls.values()
    )


def test_a_bulk_copy_has_only_the_mailto_unsubscribe(deliver_to, smtpd, mlist, first_post):
    deliver_to(UNSUBSCRIBE_BASE_URL="https://lists.example.com")
    queue_post(mlist, first_post)
    run()
    assert smtpd.messages[0].message["List-Unsubscribe"] == "<mailto:test-leave@example.com>"


def test_one_click_post_disables_the_member_without_login_or_csrf(smtpd, one_click, first_post):
    queue_post(one_click, first_post)
    run()
    url = unsubscribe_urls(smtpd)["bperson@example.com"].removeprefix("https://lists.example.com")
    client = Client(enforce_csrf_checks=True)

    first = client.post(url, {"List-Unsubscribe": "One-Click"})
    replay = client.post(url, {"List-Unsubscribe": "One-Click"})

    assert first.status_code == replay.status_code == 200
    statuses = dict(Member.objects.values_list("address", "delivery_status"))
    assert statuses == {
        "aperson@example.com": DeliveryStatus.ENABLED,
        "bperson@example.com": DeliveryStatus.BY_USER,
        "cperson@example.com": DeliveryStatus.ENABLED,
    }


def test_opening_the_link_only_asks_for_confirmation(smtpd, one_click, first_post):
    queue_post(one_click, first_post)
    run()
    url = unsubscribe_urls(smtpd)["aperson@example.com"].removeprefix("https://lists.example.com")

    page = Client().get(url)

    assert page.status_code == 200
    assert b'method="post"' in page.content
    assert (
        Member.objects.get(address="aperson@example.com").delivery_status == DeliveryStatus.ENABLED
    )


def test_a_forged_token_is_rejected(smtpd, one_click, first_post):
    queue_post(one_click, first_post)
    run()
    url = unsubscribe_urls(smtpd)["aperson@example.com"].removeprefix("https://lists.example.com")
    forged = url.replace(url.rstrip("/").rsplit("/", 1)[1], "W1sxLDJdXQ:forged")

    response = Client().post(forged)

    assert response.status_code == 400
    assert not Member.objects.exclude(delivery_status=DeliveryStatus.ENABLED).exists()


def test_an_expired_token_is_rejected(deliver_to, smtpd, one_click, first_post):
    queue_post(one_click, first_post)
    run()
    url = unsubscribe_urls(smtpd)["aperson@example.com"].removeprefix("https://lists.example.com")
    deliver_to(UNSUBSCRIBE_BASE_URL="https://lists.example.com", UNSUBSCRIBE_TOKEN_MAX_AGE=1)
    time.sleep(2.1)

    response = Client().post(url)

    assert response.status_code == 400
    assert b"expired" in response.content
    assert (
        Member.objects.get(address="aperson@example.com").delivery_status == DeliveryStatus.ENABLED
    )


def test_a_footer_too_long_for_splicing_is_still_personal(deliver_to, smtpd, mlist, first_post):
    mlist.footer = "x" * 1200 + "\nfor $user_address\n"
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    queue_post(mlist, first_post)
    run()

    for rcpt, message in by_recipient(smtpd).items():
        assert message["Content-Transfer-Encoding"] == "quoted-printable"
        assert message.get_payload(decode=True).decode().endswith(f"for {rcpt}\n")


def test_new_lists_start_with_the_sites_default_footer(db):
    from listdelivery.models import MailingList

    mlist = MailingList.objects.create(address="new@example.com")
    assert mlist.footer.startswith(
        "_______________________________________________\n$display_name mailing list"
    )
