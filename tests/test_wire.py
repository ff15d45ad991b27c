"""Bytes on the wire: never invalid, never lossy (issue 10, points 3, 9–14 and 20).

Every test delivers through the real runner to a real SMTP server and reads
the bytes that server received. Unless a test says otherwise the server
refuses a line over 998 octets (``500 Line too long``), as real servers do,
so a copy that was not fixed would not arrive at all.
"""

from __future__ import annotations

import base64
import email
import re
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from listdelivery.models import MailingList, Member, Personalization
from listdelivery.pipeline import to_outgoing
from listdelivery.testing import SMTPTestServer

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db

FOOTER = "-- \nYou are $user_name_or_address <$user_address>\nLeave: $unsubscribe_url\n"


# -- what every copy must be ------------------------------------------------------------


def assert_valid_on_the_wire(content: bytes, *, seven_bit: bool = False) -> None:
    """CRLF only (RFC 5321 §2.3.8), no line over 998 octets, 7-bit where the server needs it."""
    without_crlf = content.replace(b"\r\n", b"")
    assert b"\r" not in without_crlf, "a bare CR went on the wire"
    assert b"\n" not in without_crlf, "a bare LF went on the wire"
    longest = max(len(line) for line in content.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets went on the wire"
    if seven_bit:
        assert content.isascii(), "8-bit content went to a server without 8BITMIME"


def parsed(received) -> EmailMessage:
    return email.message_from_bytes(received.content, policy=policy.default)


def texts(message: EmailMessage) -> list[str]:
    """Every text part, decoded with its charset (Latin-1 when unknown), with line ends as
    a reader sees them."""
    found = []
    for part in message.walk():
        if part.get_content_maintype() == "text":
            data = part.get_payload(decode=True)
            try:
                text = data.decode(part.get_content_charset() or "latin-1")
            except LookupError:
                text = data.decode("latin-1")
            found.append(text.replace("\r\n", "\n"))
    return found


def display_name(received, field: str = "To") -> str:
    """A field's value decoded as RFC 2047 says (the whitespace between encoded words
    ignored, which the email package's own address parser gets wrong)."""
    raw = email.message_from_bytes(received.content)[field]
    return str(make_header(decode_header(raw)))


def by_recipient(smtpd) -> dict:
    return {m.rcpt_tos[0].lower(): m for m in smtpd.messages}


def deliver(mlist: MailingList, msg, msgdata: dict | None = None, **extra) -> None:
    """Queue the post and run the runner: it must end delivered, at the first attempt."""
    queue_post(mlist, msg, msgdata, **extra)
    summary = run()
    assert (summary.delivered, summary.retrying, summary.failed) == (1, 0, 0), str(summary)


@pytest.fixture
def strict(smtpd):
    """The test server refusing long lines, as real servers do."""
    smtpd.max_line_length = 998
    return smtpd


@pytest.fixture
def old_server(settings):
    """A server that offers no 8BITMIME and refuses long lines."""
    with SMTPTestServer(eight_bit_mime=False) as server:
        server.max_line_length = 998
        settings.LISTDELIVERY = {
            "SMTP_HOST": server.host,
            "SMTP_PORT": server.port,
            "DELIVERY_RETRY_DELAY": 60,
        }
        yield server


def personalize(mlist: MailingList, mode=Personalization.INDIVIDUAL, footer=FOOTER) -> MailingList:
    mlist.personalize = mode
    mlist.footer = footer
    mlist.save()
    return mlist


def raw_post(body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"From: aperson@example.com\r\nTo: test@example.com\r\nSubject: raw\r\n"
        b"Message-ID: <raw@example.com>\r\n" + headers + b"\r\n" + body
    )


# -- 9: no bare CR, ever ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [Personalization.NONE, Personalization.INDIVIDUAL])
def test_a_footer_saved_from_the_admin_with_crlf_puts_no_bare_cr_on_the_wire(
    deliver_to, strict, mlist, first_post, mode
):
    personalize(mlist, mode, footer="-- \r\nThe Test list\r\nfor $user_address\r\n")
    deliver(mlist, first_post)

    for received in strict.messages:
        assert_valid_on_the_wire(received.content)
        assert b"\r\r" not in received.content
        (text,) = texts(parsed(received))
        assert text.startswith("First post!\n-- \nThe Test list\nfor ")


def test_a_base64_body_with_crlf_lines_is_decorated_without_bare_cr(deliver_to, strict, mlist):
    personalize(mlist, Personalization.NONE, footer="-- \nfooter\n")
    body = "line one\r\n.\r\nline three\r\n"
    raw = raw_post(
        base64.encodebytes(body.encode()).replace(b"\n", b"\r\n"),
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: base64\r\n",
    )
    deliver(mlist, raw)

    (received,) = strict.messages
    assert_valid_on_the_wire(received.content)
    assert b"\r.\r" not in received.content
    assert texts(parsed(received)) == ["line one\n.\nline three\n-- \nfooter\n"]


@pytest.mark.parametrize("mode", [Personalization.NONE, Personalization.FULL])
def test_a_bare_cr_in_a_raw_post_is_never_passed_through(deliver_to, strict, mlist, mode):
    personalize(mlist, mode, footer="")
    raw = raw_post(b"one\rtwo\r\nthree\n", b"X-Odd: a\rb\r\n")
    deliver(mlist, raw)

    for received in strict.messages:
        assert_valid_on_the_wire(received.content)
        assert received.content.endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\n")


# -- 10: no line over 998 octets ---------------------------------------------------------


@pytest.mark.parametrize("name", ["😀" * 200, "漢字" * 100, "Zoë " + "x" * 195])
def test_a_member_name_of_200_wide_characters_gives_a_folded_to_with_short_encoded_words(
    deliver_to, strict, mlist, first_post, name
):
    personalize(mlist, Personalization.FULL, footer="")
    Member.objects.create(mailing_list=mlist, address="wide@example.org", display_name=name)
    deliver(mlist, first_post, {"recipients": ["wide@example.org"]})

    (received,) = strict.messages
    assert_valid_on_the_wire(received.content, seven_bit=True)
    head = received.content.split(b"\r\n\r\n")[0]
    words = re.findall(rb"=\?[^?]+\?[bq]\?[^?]*\?=", head, re.I)
    assert words and max(map(len, words)) <= 75, "RFC 2047 allows 75 characters per encoded word"
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert display_name(received) == f"{name} <wide@example.org>"


def test_a_footer_line_that_grows_past_998_with_member_values_is_re_encoded(
    deliver_to, strict, mlist, first_post
):
    footer = "Hello " + " ".join(["$user_name"] * 6) + "\n"
    personalize(mlist, footer=footer)
    long_name = "N" * 200
    Member.objects.create(mailing_list=mlist, address="long@example.org", display_name=long_name)
    deliver(mlist, first_post)

    copies = by_recipient(strict)
    assert len(copies) == 4, "the server refused a copy"
    for received in copies.values():
        assert_valid_on_the_wire(received.content, seven_bit=True)
    (text,) = texts(parsed(copies["long@example.org"]))
    assert text == "First post!\nHello " + " ".join([long_name] * 6) + "\n"
    (text,) = texts(parsed(copies["aperson@example.com"]))
    assert text == "First post!\nHello " + " ".join(["Anne Person"] * 6) + "\n"


def test_an_undecorated_post_with_a_2000_octet_line_arrives_intact(deliver_to, strict, mlist):
    line = ("word " * 400).strip()
    raw = raw_post(
        line.encode() + b"\r\n",
        b"References: " + b" ".join(b"<%d@example.com>" % i for i in range(90)) + b"\r\n",
    )
    deliver(mlist, raw, nodecorate=True)

    (received,) = strict.messages
    assert_valid_on_the_wire(received.content)
    message = parsed(received)
    assert texts(message) == [line + "\n"]
    assert message["References"].split() == [f"<{i}@example.com>" for i in range(90)]


def test_a_long_line_in_an_attachment_is_re_encoded_and_arrives_intact(deliver_to, strict, mlist):
    personalize(mlist, Personalization.INDIVIDUAL)
    msg = EmailMessage()
    msg["From"], msg["Subject"] = "aperson@example.com", "data"
    msg.set_content("See the attachment.\n")
    data = b"x" * 3000 + b"\n"
    msg.add_attachment(data, maintype="application", subtype="x-data", cte="7bit")
    deliver(mlist, msg)

    assert len(strict.messages) == 3
    for received in strict.messages:
        assert_valid_on_the_wire(received.content)
        attachment = next(parsed(received).iter_attachments())
        assert attachment.get_payload(decode=True).replace(b"\r\n", b"\n") == data


# -- 11: no raw 8-bit to a server without 8BITMIME --------------------------------------


def test_a_seven_bit_post_stays_seven_bit_when_a_non_ascii_name_is_spliced_in(
    old_server, mlist, first_post
):
    personalize(mlist)
    Member.objects.create(
        mailing_list=mlist, address="jm@example.org", display_name="Jürgen Müller"
    )
    deliver(mlist, first_post)

    copies = by_recipient(old_server)
    assert len(copies) == 4
    for received in copies.values():
        assert_valid_on_the_wire(received.content, seven_bit=True)
        assert "BODY=8BITMIME" not in received.mail_options
    (text,) = texts(parsed(copies["jm@example.org"]))
    assert "You are Jürgen Müller <jm@example.org>" in text


@pytest.mark.parametrize("decorated", [False, True])
def test_an_eight_bit_post_reaches_a_server_without_8bitmime_as_seven_bit_intact(
    old_server, mlist, decorated
):
    personalize(mlist, Personalization.NONE, footer="-- \nDie Liste\n" if decorated else "")
    msg = EmailMessage()
    msg["From"], msg["Subject"] = "aperson@example.com", "Grüße aus Köln"
    msg.set_content("Grüße aus Köln\nÄrger über Öl\n", cte="8bit")
    msg.add_attachment("Straße\n".encode("latin-1"), maintype="text", subtype="plain", cte="8bit")
    raw = msg.as_bytes().replace(
        b"=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln".encode()
    )
    assert not raw.isascii()
    deliver(mlist, raw)

    (received,) = old_server.messages
    assert_valid_on_the_wire(received.content, seven_bit=True)
    message = parsed(received)
    assert message["Subject"] == "Grüße aus Köln"
    assert "Grüße aus Köln\nÄrger über Öl\n" in texts(message)
    attachment = next(message.iter_attachments())
    # Text's line ends are CRLF in canonical form (RFC 2049), whatever the sender wrote.
    assert attachment.get_payload(decode=True) == "Straße\r\n".encode("latin-1")


def test_an_eight_bit_post_goes_unchanged_to_a_server_with_8bitmime(deliver_to, strict, mlist):
    raw = raw_post(
        "Grüße\r\n".encode(),
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n",
    )
    deliver(mlist, raw, nodecorate=True)

    (received,) = strict.messages
    assert "BODY=8BITMIME" in received.mail_options
    assert received.content.endswith(b"\r\n\r\n" + "Grüße\r\n".encode())


# -- 12: decoration is lossless -----------------------------------------------------------


@pytest.mark.parametrize(
    "content_headers",
    [b"", b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n"],
    ids=["latin-1 without charset", "unknown charset"],
)
def test_a_body_that_cannot_be_decoded_is_wrapped_not_mangled(
    deliver_to, strict, mlist, content_headers
):
    personalize(mlist, Personalization.NONE, footer="-- \nfooter\n")
    body = "Café crème à l'école\r\n".encode("latin-1")
    deliver(mlist, raw_post(body, content_headers))

    (received,) = strict.messages
    assert_valid_on_the_wire(received.content)
    message = parsed(received)
    assert message.get_content_type() == "multipart/mixed"
    original, footer = message.get_payload()
    assert original.get_payload(decode=True) == body
    assert footer.get_payload(decode=True) == b"-- \r\nfooter\r\n"


def test_format_flowed_and_delsp_are_kept(deliver_to, strict, mlist):
    personalize(mlist, Personalization.NONE, footer="-- \nfooter\n")
    raw = raw_post(
        b"A flowed \r\nparagraph.\r\n",
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii; format=flowed; "
        b"delsp=yes\r\n",
    )
    deliver(mlist, raw)

    message = parsed(strict.messages[0])
    assert message.get_param("format") == "flowed"
    assert message.get_param("delsp") == "yes"
    assert texts(message) == ["A flowed \nparagraph.\n-- \nfooter\n"]


def test_a_wrapped_posts_boundary_never_collides_with_its_body(deliver_to, strict, mlist):
    personalize(mlist, Personalization.NONE, footer="footer\n")
    html = b"<p>" + b"x" * 5000 + b"</p>\r\n"
    headers = b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n"
    deliver(mlist, raw_post(html, headers))
    boundary = parsed(strict.messages[0]).get_boundary()
    strict.clear()
    strict.max_line_length = 998

    # The same first 4 KB, and a line that is the boundary the first copy used.
    tricky = html + b"--" + boundary.encode() + b"\r\n<p>more</p>\r\n"
    deliver(mlist, raw_post(tricky, headers))

    message = parsed(strict.messages[0])
    assert message.get_boundary() != boundary
    inner, footer = message.get_payload()
    assert inner.get_payload(decode=True) == tricky
    assert footer.get_payload(decode=True) == b"footer\r\n"


def test_an_empty_body_still_gets_mailmans_blank_line_before_the_footer(deliver_to, strict, mlist):
    personalize(mlist, Personalization.NONE, footer="footer\n")
    deliver(mlist, raw_post(b""))

    assert texts(parsed(strict.messages[0])) == ["\nfooter\n"]


# -- 13: no header injection through the list's name ----------------------------------------


def test_a_list_name_with_a_line_break_is_refused_on_save(mlist):
    mlist.display_name = "Test\r\nBcc: evil@example.net"
    with pytest.raises(ValidationError):
        mlist.save()


@pytest.mark.parametrize("mode", [Personalization.NONE, Personalization.FULL])
def test_a_line_break_in_a_stored_list_name_never_reaches_the_wire(
    deliver_to, strict, mlist, first_post, mode
):
    personalize(mlist, mode, footer="$display_name\n")
    MailingList.objects.filter(pk=mlist.pk).update(display_name="Test\r\nBcc: evil@example.net")
    deliver(mlist, first_post)

    for received in strict.messages:
        message = parsed(received)
        assert message["Bcc"] is None
        assert message.get_all("List-Id") == ['"Test Bcc: evil@example.net" <test.example.com>']
        assert texts(message)[0].endswith("\nTest Bcc: evil@example.net\n")


@pytest.mark.parametrize(
    "name",
    ["The " + "very " * 37 + "long list", "Liste für " + "Ärzte " * 31],  # <= 200
)
def test_a_long_list_name_gives_a_folded_list_id(deliver_to, strict, mlist, first_post, name):
    MailingList.objects.filter(pk=mlist.pk).update(display_name=name)
    deliver(mlist, first_post)

    (received,) = strict.messages
    head = received.content.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert head.isascii()
    list_id = parsed(received)["List-Id"]
    assert " ".join(list_id.split()) == f"{' '.join(name.split())} <test.example.com>"


# -- 14: a malformed encoded word crashes nothing ---------------------------------------------


def test_a_malformed_encoded_word_in_the_subject_is_queued_and_delivered(deliver_to, strict, mlist):
    raw = raw_post(b"Body\r\n").replace(b"Subject: raw", b"Subject: =?utf-8?b?QUJDR?= news")
    row = queue_post(mlist, email.message_from_bytes(raw))
    assert row.subject == "=?utf-8?b?QUJDR?= news"
    summary = run()
    assert summary.delivered == 1, str(summary)
    assert b"Subject: =?utf-8?b?QUJDR?= news\r\n" in strict.messages[0].content


def test_a_malformed_encoded_word_in_any_header_shows_on_the_posts_admin_page(admin_client, mlist):
    raw = raw_post(
        b"Body\r\n",
        b"X-Mangled: =?utf-8?b?QUJDR?=\r\nX-Bad-Charset: =?no-such?q?x?=\r\n"
        b"Subject: =?utf-8?b?QUJDR?=\r\nX-Raw: caf\xc3\xa9\r\n",
    ).replace(b"Subject: raw\r\n", b"")
    row = to_outgoing(mlist, raw, {"recipients": ["aperson@example.com"]})

    response = admin_client.get(reverse("admin:listdelivery_outgoingmessage_change", args=[row.pk]))

    assert response.status_code == 200
    page = response.content.decode()
    assert "=?utf-8?b?QUJDR?=" in page
    assert "=?no-such?q?x?=" in page
    assert "café" in page


# -- 20: one-click and member names only for members ---------------------------------------


def test_a_non_member_gets_no_one_click_and_the_member_names_as_written(
    deliver_to, strict, mlist, first_post
):
    deliver_to(UNSUBSCRIBE_BASE_URL="https://lists.example.com")
    strict.max_line_length = 998
    personalize(mlist)
    recipients = ["aperson@example.com", "stranger@example.org"]
    deliver(mlist, first_post, {"recipients": recipients})

    copies = {rcpt: parsed(m) for rcpt, m in by_recipient(strict).items()}
    stranger, anne = copies["stranger@example.org"], copies["aperson@example.com"]
    assert stranger["List-Unsubscribe-Post"] is None
    assert stranger["List-Unsubscribe"] == "<mailto:test-leave@example.com>"
    assert texts(stranger)[0].endswith(
        "You are $user_name_or_address <$user_address>\nLeave: $unsubscribe_url\n"
    )
    assert anne["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = re.match(r"<(https://lists\.example\.com/\S+/)>", anne["List-Unsubscribe"])[1]
    assert texts(anne)[0].endswith(f"You are Anne Person <aperson@example.com>\nLeave: {url}\n")


# -- 3: what used to raise on every attempt ---------------------------------------------------


@pytest.mark.parametrize("mode", [Personalization.NONE, Personalization.INDIVIDUAL])
def test_a_base64_body_with_invalid_padding_and_a_footer_is_delivered_intact(
    deliver_to, strict, mlist, mode
):
    personalize(mlist, mode)
    raw = raw_post(
        b"QUJDR\r\n",
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n",
    )
    deliver(mlist, raw)

    assert strict.messages
    for received in strict.messages:
        inner = parsed(received).get_payload()[0]
        assert inner["Content-Transfer-Encoding"] == "base64"
        assert inner.get_payload(decode=False).strip() == "QUJDR"


def test_a_body_holding_the_internal_marker_bytes_is_delivered_intact(deliver_to, strict, mlist):
    personalize(mlist)
    body = b"A\0LD:user_address\0B \0LD:nonsense\0 \0LDx:h.to\0\r\n"
    deliver(mlist, raw_post(body))

    assert len(strict.messages) == 3
    for received in strict.messages:
        assert_valid_on_the_wire(received.content)
        (text,) = texts(parsed(received))
        assert text.startswith(body.replace(b"\r\n", b"\n").decode())


def test_an_unsubscribe_base_url_with_braces_is_delivered(deliver_to, strict, mlist, first_post):
    deliver_to(UNSUBSCRIBE_BASE_URL="https://lists.example.com/{site}")
    strict.max_line_length = 998
    personalize(mlist)
    deliver(mlist, first_post)

    assert len(strict.messages) == 3
    for received in strict.messages:
        message = parsed(received)
        url = re.match(r"<(https://\S+/)>", message["List-Unsubscribe"])[1]
        assert url.startswith("https://lists.example.com/%7Bsite%7D/lists/unsubscribe/")
        assert texts(message)[0].endswith(f"Leave: {url}\n")
