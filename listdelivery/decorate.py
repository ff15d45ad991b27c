"""Decoration and list headers, applied to the serialized post.

A list's header and footer are ``string.Template`` texts with Mailman's
names (``$display_name``, ``$listname``, ``$user_address`` …). They are
attached as Mailman attaches them (spec §8.7): a text/plain post gets them
around its body, re-encoded; a multipart/mixed post gets inline text parts
before and after; anything else is wrapped in a new multipart/mixed.
RFC 2369 ``List-*`` headers replace any the post had.

Everything works on bytes. For personalized copies the per-member values are
left as markers (``\\0LD:name\\0``, which no valid message contains) so the
decoration is done once per post and each copy only splices values in
(see :mod:`listdelivery.personalize`).
"""

from __future__ import annotations

import base64
import hashlib
import quopri
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.header import Header
from email.parser import BytesHeaderParser
from string import Template

from .tokens import make_token

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
MAX_LINE = 998


def marker(name: str) -> str:
    return f"\0LD:{name}\0"


MARKER = re.compile(rb"\0LD:(\w+)\0")


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

    def apply(
        self, message: bytes, *, personal: bool, member: Mapping[str, str] | None = None
    ) -> bytes:
        """The post with list headers and header/footer.

        For a personal copy, member values are ``member`` or, when not given, markers.
        """
        if personal and member is None:
            member = {name: marker(name) for name in MEMBER_NAMES}
        member = member or {}
        headers = list(self.list_headers)
        if personal and self.one_click and member.get("unsubscribe_url"):
            headers = [(n, v) for n, v in headers if n != "List-Unsubscribe"]
            unsubscribe = next(v for n, v in self.list_headers if n == "List-Unsubscribe")
            headers += [
                ("List-Unsubscribe", f"<{member['unsubscribe_url']}>, {unsubscribe}"),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ]
        message = replace_headers(message, headers)
        header = expand(self.header, {**self.variables, **member})
        footer = expand(self.footer, {**self.variables, **member})
        return attach(message, header, footer, utf8=personal)

    def member_values(
        self, address: str, display_name: str, member_id: int | None
    ) -> dict[str, str]:
        """Mailman's per-member substitutions (``handlers/decorate.py``), plus ``$unsubscribe_url``."""
        name = " ".join(display_name.split())
        url = ""
        if self.one_click and member_id is not None and self.list_pk is not None:
            url = self.unsubscribe_url.format(token=make_token(self.list_pk, member_id))
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


def expand(template: str, values: Mapping[str, str]) -> str:
    """Mailman's expansion: unknown ``$names`` stay literal; whitespace alone counts as empty."""
    text = Template(template).safe_substitute(values)
    return text if text.strip() else ""


def split(message: bytes) -> tuple[bytes, list[bytes], bytes]:
    """``(eol, header lines with their endings, body)``."""
    eol = b"\r\n" if b"\r\n" in message[: message.find(b"\n") + 1] else b"\n"
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


def header_fields(lines: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """Group header lines into fields with their continuation lines: ``[(lowercased name, lines)]``."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), [line]))
    return fields


def replace_headers(message: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Drop every field named in ``headers`` and append the new ones at the end of the header block."""
    if not headers:
        return message
    eol, lines, body = split(message)
    names = {name.lower() for name, _ in headers}
    kept = [line for name, group in header_fields(lines) if name not in names for line in group]
    added = [f"{name}: {value}".encode() + eol for name, value in headers]
    return join(eol, kept + added, body)


def attach(message: bytes, header: str, footer: str, *, utf8: bool = False) -> bytes:
    """Attach ``header`` and ``footer`` text the way Mailman does."""
    if not header and not footer:
        return message
    eol, lines, body = split(message)
    parsed = BytesHeaderParser().parsebytes(b"".join(lines) + eol)
    content_type = parsed.get_content_type()
    if content_type == "text/plain" and not parsed.is_multipart():
        return _around_text(eol, lines, body, parsed, header, footer, utf8)
    if content_type == "multipart/mixed" and parsed.get_boundary():
        decorated = _inside_mixed(eol, body, parsed.get_boundary(), header, footer)
        if decorated is not None:
            return join(eol, lines, decorated)
    return _wrapped(eol, lines, body, header, footer)


def _around_text(eol, lines, body, parsed, header, footer, utf8) -> bytes:
    raw_body = body.replace(b"\r\n", b"\n")
    encoding = str(parsed.get("content-transfer-encoding", "7bit")).strip().lower()
    if encoding == "base64":
        raw_body = base64.b64decode(raw_body + b"===", validate=False)
    elif encoding == "quoted-printable":
        raw_body = quopri.decodestring(raw_body)
    charset = parsed.get_content_charset("us-ascii")
    try:
        text = raw_body.decode(charset)
    except (LookupError, UnicodeDecodeError):
        text = raw_body.decode("utf-8", "replace")
    front = "\n" if header and not header.endswith("\n") else ""
    back = "\n" if footer and text and not text.endswith("\n") else ""
    text = header + front + text + back + footer
    new_charset = "utf-8" if utf8 or not text.isascii() else "us-ascii"
    payload = text.encode(new_charset).replace(b"\n", eol)
    if max(map(len, payload.split(eol)), default=0) > MAX_LINE:
        cte = "quoted-printable"
        payload = quopri.encodestring(text.encode(new_charset)).replace(b"\n", eol)
    else:
        cte = "8bit" if not payload.isascii() or utf8 else "7bit"
    kept = [
        line
        for name, group in header_fields(lines)
        if name not in CONTENT_HEADERS and name != "mime-version"
        for line in group
    ]
    kept += [
        b"MIME-Version: 1.0" + eol,
        f'Content-Type: text/plain; charset="{new_charset}"'.encode() + eol,
        f"Content-Transfer-Encoding: {cte}".encode() + eol,
    ]
    return join(eol, kept, payload)


def _text_part(eol: bytes, text: str) -> bytes:
    payload = text.encode("utf-8").replace(b"\r\n", b"\n").replace(b"\n", eol)
    if not payload.endswith(eol):
        payload += eol
    cte = "7bit" if payload.isascii() and "\0" not in text else "8bit"
    return eol.join(
        [
            b'Content-Type: text/plain; charset="utf-8"',
            f"Content-Transfer-Encoding: {cte}".encode(),
            b"Content-Disposition: inline",
            b"",
            payload,
        ]
    )


def _inside_mixed(eol, body, boundary, header, footer) -> bytes | None:
    delimiter = b"--" + boundary.encode("ascii", "replace")
    first = _line_start(body, delimiter)
    last = _line_start(body, delimiter + b"--")
    if first is None or last is None:
        return None
    if footer:
        body = body[:last] + delimiter + eol + _text_part(eol, footer) + eol + body[last:]
    if header:
        body = body[:first] + delimiter + eol + _text_part(eol, header) + eol + body[first:]
    return body


def _line_start(body: bytes, token: bytes) -> int | None:
    match = re.search(rb"(?:^|\n)(" + re.escape(token) + rb")[ \t]*(?:\r?\n|$)", body)
    return match.start(1) if match else None


def _wrapped(eol, lines, body, header, footer) -> bytes:
    boundary = (
        "listdelivery-"
        + hashlib.sha1(body[:4096] + header.encode() + footer.encode()).hexdigest()[:24]
    )
    outer, inner = [], []
    for name, group in header_fields(lines):
        if name in CONTENT_HEADERS:
            inner.extend(group)
        elif name != "mime-version":
            outer.extend(group)
    outer += [
        b"MIME-Version: 1.0" + eol,
        f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode() + eol,
    ]
    delimiter = f"--{boundary}".encode()
    parts = []
    if header:
        parts.append(_text_part(eol, header))
    parts.append(b"".join(inner) + eol + body)
    if footer:
        parts.append(_text_part(eol, footer))
    # The line break before a delimiter belongs to the delimiter, so every part gets one more.
    wrapped = b"".join(delimiter + eol + part + eol for part in parts)
    return join(eol, outer, wrapped + delimiter + b"--" + eol)


def list_headers(list_id: str, display_name: str, address: str, leave: str, archive: str) -> tuple:
    """RFC 2369 and RFC 2919 headers for every copy."""
    name = display_name if display_name.isascii() else Header(display_name, "utf-8").encode()
    headers = [
        ("List-Id", f"{name} <{list_id}>" if name else f"<{list_id}>"),
        ("List-Post", f"<mailto:{address}>"),
        ("List-Unsubscribe", f"<mailto:{leave}>"),
    ]
    if archive:
        headers.append(("List-Archive", f"<{archive}>"))
    return tuple(headers)
