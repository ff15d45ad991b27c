"""Property tests: whatever the post, what goes on the wire is valid and keeps the post's text.

Hypothesis writes posts in many charsets (an unknown one, Latin-1 without any
charset), every transfer encoding, LF / CRLF / bare CR line ends, several
MIME shapes, raw 8-bit and very long header fields, with list headers and
footers holding long lines, CRLF and member names, for members with long
and non-ASCII names and for non-members. For every personalization mode,
with and without VERP, each copy must be: CRLF only, no line over 998
octets, 7-bit unless the server offers 8BITMIME, readable by the ``email``
package, and still holding the post's text.

The pure functions (decoration, personalization, ``wire_safe``) take many
examples; a real runner and SMTP server take fewer.
"""

from __future__ import annotations

import base64
import email
import quopri
import re
from dataclasses import dataclass
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser

import pytest
from django.test import override_settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from listdelivery.decorate import Decoration, _lf, list_headers
from listdelivery.models import Member, OutgoingMessage, Personalization
from listdelivery.personalize import PersonalTemplate
from listdelivery.testing import SMTPTestServer
from listdelivery.wire import plain_fields, wire_safe

from .conftest import queue_post, run

#: charset → the characters its text may hold; ``None`` is Latin-1 with no charset declared.
CHARSETS = {
    "us-ascii": "ascii",
    "utf-8": "utf-8",
    "iso-8859-1": "latin-1",
    "koi8-r": "koi8-r",
    "x-no-such-charset": "latin-1",
    None: "latin-1",
}
LINE_ENDS = ["\n", "\r\n", "\r"]
SHAPES = ["text", "related", "mixed", "alternative", "nested"]
NAMES = ["$user_name", "$user_address", "${user_email}", "$member", "$unsubscribe_url"]
NAMES += ["$display_name", "$listname"]
USER_ADDRESS = re.compile(r"\$user_address(?!\w)")


@dataclass
class Post:
    raw: bytes
    text: str  # the post's text as a reader sees it: line ends are "\n"
    codec: str  # what its text part is written in
    subject: str
    attachment: bytes | None


def normalized(text: str) -> str:
    return re.sub(r"\r*\n|\r", "\n", text)


def text_in(codec: str) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec=codec, exclude_characters="\r\n"), max_size=40)


@st.composite
def long_lines(draw, codec: str) -> str:
    """A line of up to ~2,400 characters: a piece repeated."""
    piece = draw(text_in(codec))
    return piece * draw(st.integers(1, 60))


@st.composite
def posts(draw) -> Post:
    charset = draw(st.sampled_from(list(CHARSETS)))
    codec = CHARSETS[charset]
    lines = draw(st.lists(text_in(codec) | long_lines(codec), max_size=6))
    ends = draw(st.lists(st.sampled_from(LINE_ENDS), min_size=len(lines), max_size=len(lines)))
    if ends and ends[-1] == "\r":
        ends[-1] = "\n"  # a CR just before the LF that ends a MIME part would make one CRLF
    text = "".join(line + end for line, end in zip(lines, ends, strict=True))
    data = text.encode(codec)
    cte = draw(st.sampled_from(["7bit", "8bit", "quoted-printable", "base64"]))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    if cte == "quoted-printable":
        body = quopri.encodestring(data).replace(b"\n", eol)
    elif cte == "base64":
        body = base64.encodebytes(data).replace(b"\n", eol)
    else:
        body = data
    content_headers = [f"Content-Transfer-Encoding: {cte}".encode()]
    if charset is not None:
        content_headers.insert(0, f"Content-Type: text/plain; charset={charset}".encode())
    elif cte in ("7bit", "8bit"):
        content_headers = []  # a plain RFC 822 message: Latin-1 with no charset anywhere
    text_part = eol.join(content_headers) + eol + eol + body

    shape = draw(st.sampled_from(SHAPES))
    attachment = draw(st.binary(max_size=300)) if shape in ("mixed", "nested") else None
    html = b"Content-Type: text/html; charset=us-ascii" + eol + eol + b"<p>html</p>" + eol
    if shape == "text":
        top, payload = content_headers, body
    elif shape == "related":  # not text/plain nor multipart/mixed: decoration wraps it
        top = [b'Content-Type: multipart/related; boundary="outer"']
        payload = _multipart(eol, "outer", [html, text_part])
    elif shape == "alternative":
        top = [b'Content-Type: multipart/alternative; boundary="alt"']
        payload = _multipart(eol, "alt", [text_part, html])
    else:
        attached = eol.join(
            [
                b"Content-Type: application/octet-stream",
                b"Content-Transfer-Encoding: base64",
                b"",
                base64.encodebytes(attachment).replace(b"\n", eol),
            ]
        )
        first = text_part
        if shape == "nested":
            first = (
                b'Content-Type: multipart/alternative; boundary="alt"'
                + eol
                + eol
                + _multipart(eol, "alt", [text_part, html])
            )
        top = [b'Content-Type: multipart/mixed; boundary="outer"']
        payload = _multipart(eol, "outer", [first, attached])

    subject = draw(st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=300))
    if draw(st.booleans()):
        subject_field = b"Subject: " + subject.encode()  # raw 8-bit, as careless clients send
    else:
        subject_field = b"Subject: " + str(make_header([(subject, "utf-8")])).encode()
    head = [b"From: aperson@example.com", b"To: test@example.com", subject_field]
    head.append(b"Message-ID: <prop@example.com>")
    if draw(st.booleans()):
        head.append(b"References: " + b" ".join(b"<%d@example.com>" % i for i in range(70)))
    if top:
        head += [b"MIME-Version: 1.0", *top]
    raw = eol.join(head) + eol + eol + payload
    return Post(raw, normalized(text), codec, subject, attachment)


def _multipart(eol: bytes, boundary: str, parts: list[bytes]) -> bytes:
    delimiter = b"--" + boundary.encode()
    return b"".join(delimiter + eol + part + eol for part in parts) + delimiter + b"--" + eol


def admin_text(text: str) -> str:
    """Text an admin form accepts (Django's forms refuse NUL; PostgreSQL cannot store it)."""
    return text.replace("$", "").replace("\x00", "")


@st.composite
def decorations(draw) -> tuple[str, str]:
    """A list's header and footer as an admin might write them: CRLF, long lines, $names."""

    def template() -> str:
        pieces = draw(
            st.lists(
                st.sampled_from(NAMES)
                | text_in("utf-8").map(admin_text)
                | long_lines("ascii").map(admin_text),
                max_size=8,
            )
        )
        separators = draw(
            st.lists(
                st.sampled_from([" ", "\r\n", "\n", ""]), min_size=len(pieces), max_size=len(pieces)
            )
        )
        return "".join(p + s for p, s in zip(pieces, separators, strict=True))

    return template(), template()


member_names = st.text(
    st.characters(exclude_categories=("Cc", "Cs")), max_size=200
) | st.sampled_from(
    ["😀" * 200, "漢字" * 100, "Zoë Müller", "x" * 200, '"Quoted", with <specials>']
)


# -- what every copy must be ---------------------------------------------------------------


def check_copy(content: bytes, post: Post, *, eight_bit_ok: bool) -> email.message.Message:
    """The wire rules, and the post's text and attachment found in the copy."""
    without_crlf = content.replace(b"\r\n", b"")
    assert b"\r" not in without_crlf and b"\n" not in without_crlf, "a bare CR or LF"
    assert max(len(line) for line in content.split(b"\r\n")) <= 998, "a line over 998 octets"
    if not eight_bit_ok:
        assert content.isascii(), "8-bit content without 8BITMIME"
    message = email.message_from_bytes(content, policy=policy.default)
    texts = []
    for part in message.walk():
        if part.is_multipart():
            continue
        data = part.get_payload(decode=True) or b""
        if part.get_content_maintype() == "text":
            for codec in (part.get_content_charset(), post.codec):
                try:
                    texts.append(normalized(data.decode(codec or "latin-1")))
                except (LookupError, UnicodeDecodeError):
                    pass
        elif post.attachment is not None and part.get_content_type() == "application/octet-stream":
            assert data == post.attachment, "the attachment changed"
    assert any(post.text in text for text in texts), "the post's text is not in the copy"
    assert _squeezed(_subject(content)) == _squeezed(post.subject), "the subject changed"
    return message


def _subject(content: bytes) -> str:
    raw = email.message_from_bytes(content)["Subject"]  # compat32: what was on the wire
    if isinstance(raw, email.header.Header):  # raw 8-bit octets (a server with 8BITMIME)
        return b"".join(data for data, _ in decode_header(raw)).decode("utf-8")
    return str(make_header(decode_header(raw)))


def _squeezed(text: str) -> str:
    return "".join(text.split())


def member_texts(message: email.message.Message) -> str:
    texts = []
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            data = part.get_payload(decode=True)
            try:
                texts.append(data.decode(part.get_content_charset() or "latin-1", "replace"))
            except LookupError:
                texts.append(data.decode("latin-1"))
    return "\n".join(texts)


# -- the pure functions, many examples --------------------------------------------------------


@dataclass(frozen=True)
class Addressee:
    address: str
    display_name: str
    member_id: int | None


def decoration_for(header: str, footer: str) -> Decoration:
    return Decoration(
        header=header,
        footer=footer,
        variables={"display_name": "Tést list", "listname": "test@example.com"},
        list_headers=list_headers(
            "test.example.com", "Tést " * 30, "test@example.com", "test-leave@example.com", ""
        ),
        one_click=True,
        unsubscribe_url="https://lists.example.com/{site}/unsubscribe/{token}/",
        list_pk=1,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(post=posts(), decoration=decorations(), name=member_names, full=st.booleans())
@example(  # found by Hypothesis: a stray CR before CRLF in a base64 body made two line ends
    post=Post(
        raw=b"From: aperson@example.com\nTo: test@example.com\nSubject: \n"
        b"Message-ID: <prop@example.com>\nMIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: base64\n\n"
        b"MA0NCgoKMAo=\n",
        text="0\n\n\n0\n",
        codec="ascii",
        subject="",
        attachment=None,
    ),
    decoration=("", "$user_name "),
    name="",
    full=False,
)
def test_decoration_and_wire_safe_keep_every_copy_valid_and_whole(post, decoration, name, full):
    header, footer = decoration
    decorated = decoration_for(header, footer)
    template = PersonalTemplate(post.raw, decorated, rewrite_to=full)
    member = Addressee("member@example.org", name, 7)
    stranger = Addressee("stranger@example.net", name, None)
    copies = {
        "bulk": decorated.apply(post.raw),
        "member": template.render(member),
        "stranger": template.render(stranger),
        "undecorated": post.raw,
    }
    for kind, copy in copies.items():
        for eight_bit_ok in (True, False):
            message = check_copy(
                wire_safe(copy, eight_bit_ok=eight_bit_ok), post, eight_bit_ok=eight_bit_ok
            )
            if kind == "member" and USER_ADDRESS.search(footer):
                assert "member@example.org" in member_texts(message)
            if kind == "stranger" and USER_ADDRESS.search(footer):
                assert "$user_address" in member_texts(message)


#: Pieces of header blocks, plain and not: every kind of line end, names with a space, 8-bit.
HEADER_NAMES = st.sampled_from(
    ["From", "Content-Type", "content-type", "To", "X-A", "A b", "From ", ""]
)
HEADER_PIECES = st.sampled_from(
    ["", " ", "\t", "x", "text/plain", '; charset="x"', ":", "\x0c", "\x1c", "\r", "\n", "é"]
)


@st.composite
def header_blocks(draw) -> bytes:
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    lines = []
    for field in range(draw(st.integers(0, 6))):
        value = "".join(draw(st.lists(HEADER_PIECES, max_size=4)))
        continued = field and draw(st.booleans())
        lines.append(" " + value if continued else f"{draw(HEADER_NAMES)}:{value}")
    body = draw(st.sampled_from(["", "body\n", "\nX: y\n"]))
    ending = draw(st.sampled_from([eol + eol, eol, ""]))
    return (eol.join(lines) + ending + body).encode("utf-8", "surrogateescape")


@settings(max_examples=2000, deadline=None)
@given(message=header_blocks())
def test_plain_fields_read_what_the_email_parser_reads_or_decline(message):
    fields = plain_fields(message)
    if fields is None:
        return  # the parser's to read
    parsed = BytesHeaderParser().parsebytes(message)
    assert fields == {name.lower(): parsed.get(name) for name in reversed(parsed.keys())}


@settings(max_examples=2000, deadline=None)
@given(text=st.text(alphabet="\r\na\u00e9", max_size=30))
def test_a_body_made_lf_reads_as_every_line_end_the_full_rule_finds(text):
    """The fast path (CRLF pairs only) gives what the regular expression would."""
    assert _lf(text) == re.sub(r"\r*\n|\r", "\n", text)


# -- through a real runner and SMTP server, fewer examples -----------------------------------------


@pytest.fixture
def servers():
    with SMTPTestServer() as modern, SMTPTestServer(eight_bit_mime=False) as old:
        yield {True: modern, False: old}


@pytest.mark.django_db
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    post=posts(),
    decoration=decorations(),
    name=member_names,
    mode=st.sampled_from(list(Personalization)),
    verp=st.booleans(),
    eight_bit_ok=st.booleans(),
)
def test_every_copy_the_server_receives_is_valid_and_whole(
    servers, mlist, post, decoration, name, mode, verp, eight_bit_ok
):
    server = servers[eight_bit_ok]
    server.clear()
    server.max_line_length = 998
    mlist.header, mlist.footer = decoration
    mlist.personalize = mode
    mlist.save()
    member = Member.objects.create(
        mailing_list=mlist, address="member@example.org", display_name=name
    )
    recipients = ["member@example.org", "aperson@example.com", "stranger@example.net"]
    config = {
        "SMTP_HOST": server.host,
        "SMTP_PORT": server.port,
        "UNSUBSCRIBE_BASE_URL": "https://lists.example.com",
        "VERP_PERSONALIZED_DELIVERIES": verp,
        "VERP_DELIVERY_INTERVAL": int(verp),
    }
    try:
        with override_settings(LISTDELIVERY=config):
            queue_post(mlist, post.raw, {"recipients": recipients})
            summary = run()
        assert summary.delivered == 1, str(summary)
        received = server.messages
        assert sorted(r for m in received for r in m.rcpt_tos) == sorted(recipients)
        for message in received:
            check_copy(message.content, post, eight_bit_ok=eight_bit_ok)
    finally:
        member.delete()
        OutgoingMessage.objects.all().delete()
