"""Decoration and list headers, applied to the serialized post.

A list's header and footer are ``string.Template`` texts with Mailman's
names (``$display_name``, ``$listname``, ``$user_address`` …). They are
attached as Mailman attaches them (spec §8.7): a text/plain post gets them
around its body, re-encoded; a multipart/mixed post gets inline text parts
before and after; anything else, and a text/plain body that cannot be decoded
(an unknown or undeclared charset, broken base64), is wrapped in a new
multipart/mixed, so no content is ever lost. RFC 2369 ``List-*`` headers
replace any the post had.

Everything works on bytes and produces what may go on the wire: CRLF line
ends, no line over 998 octets, and the text we write 7-bit (plain when it is
ASCII with short lines, else quoted-printable). For personalized copies the
per-member values are left as slots (``\\0<prefix>name\\0``, with a prefix no
post contains) so the decoration is done once per post and each copy only
splices values in (see :mod:`listdelivery.personalize`). A slot records the
context its value lands in — ``h`` a header field, ``r`` plain text, ``q``
quoted-printable text — so the splice can encode the value for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import quopri
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import quoprimime
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import quote, specialsre
from functools import cached_property, lru_cache
from string import Template

from django.utils.encoding import iri_to_uri

from .tokens import make_token
from .wire import MAX_LINE, crlf, encoded_words, header_fields, plain_fields, ready, wire_safe

MEMBER_NAMES = (
    "member",
    "user_email",
    "user_address",
    "user_delivered_to",
    "user_name",
    "user_name_or_email",
    "user_name_or_address",
    "unsubscribe_url",
)
CONTENT_HEADERS = (
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-description",
)
CRLF = b"\r\n"
_LINE_END = re.compile(r"\r*\n|\r")
#: Fold header fields we write at this width where spaces allow (RFC 5322 §2.1.1).
FOLD_AT = 78

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_WHITESPACE = re.compile(rb"\s+")


def marker(name: str, prefix: str) -> str:
    """A slot for ``name`` in header or footer text; the text's encoding gives it a context."""
    return f"{prefix}{name}\0"


def header_marker(name: str, prefix: str) -> str:
    """A slot for ``name`` inside a header field we write."""
    return f"{prefix}h.{name}\0"


def slot_pattern(prefix: str) -> re.Pattern[bytes]:
    """Matches the slots of a prepared post: groups (context, name)."""
    return re.compile(re.escape(prefix.encode()) + rb"([hrq])\.(\w+)\0")


def one_line(text: str) -> str:
    """``text`` with runs of whitespace (line breaks included) made one space, and no controls."""
    if text.isprintable() and "  " not in text and text == text.strip():
        return text  # the common case, once per member value of every copy
    return _CONTROLS.sub("", " ".join(text.split()))


@dataclass(frozen=True)
class Decoration:
    """What the runner knows about a list's decoration, for the delivery modules."""

    header: str = ""
    footer: str = ""
    variables: Mapping[str, str] = field(default_factory=dict)
    list_headers: tuple[tuple[str, str], ...] = ()
    one_click: bool = False  # personalized copies get an RFC 8058 List-Unsubscribe URL

    unsubscribe_url: str = ""  # with {token} where the member's signed token goes
    list_pk: int | None = None

    @property
    def offers_one_click(self) -> bool:
        return self.one_click and self.list_pk is not None and "{token}" in self.unsubscribe_url

    def apply(
        self, message: bytes, *, personal: bool = False, member: Mapping[str, str] | None = None
    ) -> bytes:
        """The post with list headers and header/footer, ready for the wire.

        ``member`` holds a member's values (see :meth:`member_values`); without
        it the ``$user_*`` names stay as written, as on Mailman's bulk copies.
        A personal copy of a member also gets the one-click unsubscribe headers.
        """
        member = member or {}
        url = member.get("unsubscribe_url", "") if personal and self.offers_one_click else ""
        return ready(wire_safe(self.prepare(message, member, one_click_url=url), eight_bit_ok=True))

    def prepare(
        self,
        message: bytes,
        values: Mapping[str, str],
        *,
        one_click_url: str = "",
        slots: str | None = None,
        quoted_printable: bool = False,
    ) -> bytes:
        """The decorated post; ``values`` (member values or slots) go into header and footer.

        ``slots`` is the prefix of the slots in ``values`` and ``one_click_url``;
        with ``quoted_printable`` every text that holds a slot is quoted-printable.
        """
        message = crlf(message)
        headers = list(self.list_headers)
        if one_click_url:
            mailto = next((v for n, v in headers if n == "List-Unsubscribe"), "")
            headers = [(n, v) for n, v in headers if n != "List-Unsubscribe"]
            headers += [
                ("List-Unsubscribe", f"<{one_click_url}>, {mailto}".rstrip(", ")),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ]
        message = replace_headers(message, headers)
        header = expand(self.header, self.variables, values)
        footer = expand(self.footer, self.variables, values)
        return attach(message, header, footer, slots=slots, quoted_printable=quoted_printable)

    def member_values(
        self, address: str, display_name: str, member_id: int | None
    ) -> dict[str, str]:
        """Mailman's per-member substitutions (``handlers/decorate.py``), plus ``$unsubscribe_url``."""
        name = one_line(display_name)
        address = one_line(address)
        url = ""
        if self.offers_one_click and member_id is not None:
            url = self._url_template.replace("{token}", make_token(self.list_pk, member_id))
        return {
            "member": f"{name} <{address}>" if name else address,
            "user_email": address,
            "user_address": address,
            "user_delivered_to": address,
            "user_name": name,
            "user_name_or_email": name or address,
            "user_name_or_address": name or address,
            "unsubscribe_url": url,
        }

    @cached_property
    def _url_template(self) -> str:
        # A plain replace, never str.format: a base URL may hold other braces.
        return "{token}".join(
            iri_to_uri(one_line(part)) for part in self.unsubscribe_url.split("{token}")
        )


def expand(template: str, variables: Mapping[str, str], values: Mapping[str, str]) -> str:
    """Mailman's expansion: unknown ``$names`` stay literal; whitespace alone counts as empty.

    Line ends become ``\\n`` whatever the admin's textarea sent; list variables are one line.
    """
    template = template.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
    substitutions = {name: one_line(str(value)) for name, value in variables.items()}
    text = Template(template).safe_substitute({**substitutions, **values})
    return text if text.strip() else ""


def split(message: bytes) -> tuple[bytes, list[bytes], bytes]:
    """``(eol, header lines with their endings, body)``."""
    first = message[: message.find(b"\n") + 1]
    eol = b"\n" if first and not first.endswith(b"\r\n") else b"\r\n"
    end = message.find(eol + eol)
    head, body = (
        (message, b"") if end < 0 else (message[: end + len(eol)], message[end + 2 * len(eol) :])
    )
    lines = head.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += eol
    return eol, lines, body


def join(eol: bytes, lines: Iterable[bytes], body: bytes) -> bytes:
    return b"".join(lines) + eol + body


def field_line(name: str, value: str, eol: bytes = CRLF) -> bytes:
    """One header field we write: never a line break from ``value``, folded at spaces."""
    line = f"{name}: {' '.join(value.splitlines())}"
    if len(line) <= FOLD_AT:
        return line.encode("utf-8") + eol
    lines, current = [], ""
    for word in re.split(r"(?<=\S) (?=\S)", line):
        if current and len(current) + 1 + len(word) > FOLD_AT:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return (eol + b" ").join(part.encode("utf-8") for part in lines) + eol


def replace_headers(message: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Drop every field named in ``headers`` and append the new ones at the end of the header block."""
    if not headers:
        return message
    eol, lines, body = split(message)
    names = {name.lower() for name, _ in headers}
    kept = [line for name, group in header_fields(lines) if name not in names for line in group]
    added = [field_line(name, value, eol) for name, value in headers]
    return join(eol, kept + added, body)


def attach(
    message: bytes,
    header: str,
    footer: str,
    *,
    slots: str | None = None,
    quoted_printable: bool = False,
) -> bytes:
    """Attach ``header`` and ``footer`` text the way Mailman does."""
    if not header and not footer:
        return message
    texts = _Texts(slots, quoted_printable)
    eol, lines, body = split(crlf(message))
    content = _Content.of(b"".join(lines) + eol)
    if content.type == "text/plain":
        decorated = _around_text(lines, body, content, header, footer, texts)
        if decorated is not None:
            return decorated
    elif content.type == "multipart/mixed" and content.boundary:
        decorated = _inside_mixed(body, content.boundary, header, footer, texts)
        if decorated is not None:
            return join(CRLF, lines, decorated)
    return _wrapped(lines, body, header, footer, texts)


class _Content:
    """What decoration reads of a post's header block, as the email package reads it.

    Each fact is read when first asked, as from the parsed header block. A plain block
    (:func:`~listdelivery.wire.plain_fields`) is not parsed: its Content-Type and
    Content-Transfer-Encoding alone say it all, and posts of one mail program share them.
    """

    def __init__(self, parsed: Message) -> None:
        self._parsed = parsed

    @classmethod
    def of(cls, head: bytes) -> _Content:
        fields = plain_fields(head)
        if fields is None:
            return cls(BytesHeaderParser().parsebytes(head))
        return _plain_content(fields.get("content-type"), fields.get("content-transfer-encoding"))

    @cached_property
    def type(self) -> str:
        return self._parsed.get_content_type()

    @cached_property
    def boundary(self) -> str | None:
        return self._parsed.get_boundary()

    @cached_property
    def transfer_encoding(self) -> str:
        return str(self._parsed.get("content-transfer-encoding", "7bit")).strip().lower()

    @cached_property
    def charset(self) -> str:
        return self._parsed.get_content_charset("us-ascii")

    @cached_property
    def declared(self) -> str:
        """The Content-Type field on one line ("" without one)."""
        return one_line(str(self._parsed.get("content-type", "")))


@lru_cache(maxsize=64)
def _plain_content(content_type: str | None, transfer_encoding: str | None) -> _Content:
    holder = Message()
    for name, value in (
        ("Content-Type", content_type),
        ("Content-Transfer-Encoding", transfer_encoding),
    ):
        if value is not None:
            holder.set_raw(name, value)
    return _Content(holder)


class _Texts:
    """Encodes the text we write (header and footer, a re-encoded body) and its slots."""

    def __init__(self, prefix: str | None, quoted_printable: bool) -> None:
        self.prefix = prefix
        self.quoted_printable = quoted_printable
        self.pattern = re.compile(re.escape(prefix) + r"(\w+)\0") if prefix else None

    def encode(self, text: str) -> tuple[str, str, bytes]:
        """``(transfer encoding, charset, CRLF payload)`` for ``text`` (``\\n`` line ends).

        Plain 7-bit when the text is ASCII with short lines (its slots then take
        ASCII values only, checked per copy), quoted-printable otherwise.
        """
        plain = self.pattern.sub("", text) if self.pattern else text
        has_slots = len(plain) != len(text)
        if (not has_slots or not self.quoted_printable) and _plain_ok(plain, text):
            payload = text.replace("\n", "\r\n")
            if has_slots:
                payload = self.pattern.sub(lambda m: f"{self.prefix}r.{m[1]}\0", payload)
            return "7bit", "us-ascii", payload.encode("ascii")
        return "quoted-printable", "utf-8", self._quoted_printable(text)

    def _quoted_printable(self, text: str) -> bytes:
        """Each slot on a line of its own, between soft line breaks, so a value of any
        length can be encoded alone (see :func:`listdelivery.personalize.quoted_printable`)."""
        out, position = [], 0
        for match in self.pattern.finditer(text) if self.pattern else ():
            piece = text[position : match.start()]
            out.append(_qp(piece))
            if piece and not piece.endswith("\n"):
                out.append("=\r\n")
            out.append(f"{self.prefix}q.{match[1]}\0")
            position = match.end()
        out.append(_qp(text[position:]))
        return "".join(out).encode("ascii")


def _plain_ok(plain: str, text: str) -> bool:
    return (
        plain.isascii()
        and "\0" not in plain
        and max(map(len, text.split("\n")), default=0) <= MAX_LINE
    )


def _qp(text: str) -> str:
    return quoprimime.body_encode(text.encode("utf-8", "replace").decode("latin-1"), 76, "\r\n")


def _decoded_body(body: bytes, content: _Content) -> str | None:
    """The body as text, or ``None`` when it cannot be decoded without loss (Mailman then wraps)."""
    encoding = content.transfer_encoding
    if encoding == "base64":
        data = _WHITESPACE.sub(b"", body)
        if len(data) % 4 == 1:
            return None
        try:
            raw = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
    elif encoding == "quoted-printable":
        raw = quopri.decodestring(body)
    elif encoding in ("", "7bit", "8bit", "binary"):
        raw = body
    else:
        return None
    try:
        text = raw.decode(content.charset)
    except (LookupError, UnicodeError, ValueError):
        return None
    return _lf(text)


def _lf(text: str) -> str:
    """``text`` with every line end made LF; as wire.py, stray CRs before a line end are no line."""
    lf = text.replace("\r\n", "\n")  # what almost every body holds: many times faster
    return lf if "\r" not in lf else _LINE_END.sub("\n", text)


def _around_text(lines, body, content: _Content, header, footer, texts: _Texts) -> bytes | None:
    text = _decoded_body(body, content)
    if text is None:
        return None
    # Mailman's separators: a line break after a header that lacks one, and before
    # the footer when the body does not end with one (an empty body included).
    front = "\n" if header and not header.endswith("\n") else ""
    back = "\n" if footer and not text.endswith("\n") else ""
    cte, charset, payload = texts.encode(header + front + text + back + footer)
    kept = [
        line
        for name, group in header_fields(lines)
        if name not in CONTENT_HEADERS and name != "mime-version"
        for line in group
    ]
    kept += [
        b"MIME-Version: 1.0\r\n",
        field_line("Content-Type", _content_type(content.declared, charset)),
        f"Content-Transfer-Encoding: {cte}\r\n".encode(),
    ]
    return join(CRLF, kept, payload)


@lru_cache(maxsize=64)
def _content_type(original: str, charset: str) -> str:
    """The post's Content-Type (on one line) with the new charset; other parameters
    (``format=flowed``, ``delsp``) are kept."""
    fallback = f'text/plain; charset="{charset}"'
    if not original.isascii() or not original:
        return fallback
    try:
        holder = Message()
        holder["Content-Type"] = original
        holder.set_param("charset", charset)
        value = one_line(str(holder["Content-Type"]))
    except Exception:  # odd parameters: the charset alone is what matters
        return fallback
    return value if value.isascii() else fallback


def _text_part(text: str, texts: _Texts) -> bytes:
    if not text.endswith("\n"):
        text += "\n"
    cte, charset, payload = texts.encode(text)
    return CRLF.join(
        [
            f'Content-Type: text/plain; charset="{charset}"'.encode(),
            f"Content-Transfer-Encoding: {cte}".encode(),
            b"Content-Disposition: inline",
            b"",
            payload,
        ]
    )


def _inside_mixed(body, boundary, header, footer, texts: _Texts) -> bytes | None:
    delimiter = b"--" + boundary.encode("ascii", "replace")
    first = _line_start(body, delimiter)
    last = _line_start(body, delimiter + b"--")
    if first is None or last is None:
        return None
    if footer:
        body = body[:last] + delimiter + CRLF + _text_part(footer, texts) + CRLF + body[last:]
    if header:
        body = body[:first] + delimiter + CRLF + _text_part(header, texts) + CRLF + body[first:]
    return body


def _line_start(body: bytes, token: bytes) -> int | None:
    match = re.search(rb"(?:^|\n)(" + re.escape(token) + rb")[ \t]*(?:\r?\n|$)", body)
    return match.start(1) if match else None


def _boundary(body: bytes, header: str, footer: str) -> str:
    """A boundary found nowhere in what it separates (RFC 2046 §5.1.1)."""
    seed = hashlib.sha1(
        body[:4096] + header.encode("utf-8", "replace") + footer.encode("utf-8", "replace")
    )
    base = "listdelivery-" + seed.hexdigest()[:24]
    for attempt in itertools.count():
        boundary = f"{base}-{attempt}" if attempt else base
        if boundary.encode() not in body and boundary not in header and boundary not in footer:
            return boundary
    raise AssertionError("unreachable")


def _wrapped(lines, body, header, footer, texts: _Texts) -> bytes:
    boundary = _boundary(body, header, footer)
    outer, inner = [], []
    for name, group in header_fields(lines):
        if name in CONTENT_HEADERS:
            inner.extend(group)
        elif name != "mime-version":
            outer.extend(group)
    outer += [
        b"MIME-Version: 1.0\r\n",
        f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode() + CRLF,
    ]
    delimiter = f"--{boundary}".encode()
    parts = []
    if header:
        parts.append(_text_part(header, texts))
    parts.append(b"".join(inner) + CRLF + body)
    if footer:
        parts.append(_text_part(footer, texts))
    # The line break before a delimiter belongs to the delimiter, so every part gets one more.
    wrapped = b"".join(delimiter + CRLF + part + CRLF for part in parts)
    return join(CRLF, outer, wrapped + delimiter + b"--" + CRLF)


def list_headers(list_id: str, display_name: str, address: str, leave: str, archive: str) -> tuple:
    """RFC 2369 and RFC 2919 headers for every copy; nothing from the database can break a line."""
    name = one_line(display_name)
    if name and not name.isascii():
        name = " ".join(encoded_words(name))
    elif specialsre.search(name):
        name = f'"{quote(name)}"'
    list_id, address, leave = one_line(list_id), one_line(address), one_line(leave)
    headers = [
        ("List-Id", f"{name} <{list_id}>" if name else f"<{list_id}>"),
        ("List-Post", f"<mailto:{address}>"),
        ("List-Unsubscribe", f"<mailto:{leave}>"),
    ]
    if archive:
        headers.append(("List-Archive", f"<{iri_to_uri(one_line(archive))}>"))
    return tuple(headers)
