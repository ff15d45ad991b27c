"""Per-recipient copies made on bytes.

Mailman deep-copies and re-serializes the whole message for every recipient.
Here the post is prepared once — ``To:`` replaced by a slot, list headers
added, header and footer attached with slots for the member's values — and
split at the slots; each copy is the pieces joined around that member's
values, each encoded for the context its slot sits in (a header field, plain
text, quoted-printable text).

A post has up to three prepared forms, each made at most once: for members
with plain text around the slots (the usual copy, 7-bit when the post is),
for members whose values do not fit plain text (not ASCII, or a line would
pass 998 octets) with that text quoted-printable, and for recipients who are
not members, whose ``$user_*`` names stay as written (Mailman).
"""

from __future__ import annotations

import secrets
from email.utils import formataddr
from typing import Protocol

from .decorate import (
    MEMBER_NAMES,
    Decoration,
    header_fields,
    header_marker,
    join,
    marker,
    one_line,
    slot_pattern,
    split,
)
from .wire import MAX_LINE, SevenBitWireReady, WireReady, crlf, encoded_words, fits, wire_safe

#: Longest line of a quoted-printable body, soft line break included (RFC 2045 §6.7).
QP_LINE = 76


class Addressee(Protocol):
    address: str
    display_name: str
    member_id: int | None


def format_to(address: str, display_name: str = "") -> str:
    """``Name <address>``, the name quoted or RFC 2047-encoded as needed.

    Encoded words hold at most 75 characters and go one to a line (CRLF and a
    space between them), so no name makes a line long.
    """
    name, address = one_line(display_name), one_line(address)
    if not name:
        return address
    if name.isascii():
        value = formataddr((name, "x@x")).replace("<x@x>", f"<{address}>")
        if len(value) <= MAX_LINE - len("To: "):
            return value
    lines = encoded_words(name)
    if len(lines[-1]) + len(address) + 3 <= 78:
        lines[-1] += f" <{address}>"
    else:
        lines.append(f"<{address}>")
    return "\r\n ".join(lines)


def replace_to(message: bytes, value: str) -> bytes:
    """Replace the first ``To:`` field (Mailman's ``replace_header``), or add one at the end."""
    eol, lines, body = split(message)
    fields = header_fields(lines)
    line = f"To: {value}".encode() + eol
    index = next((i for i, (name, _) in enumerate(fields) if name == "to"), None)
    if index is None:
        return join(eol, lines + [line], body)
    fields[index] = ("to", [line])
    return join(eol, (part for _, group in fields for part in group), body)


def quoted_printable(value: str) -> bytes:
    """``value`` for a quoted-printable slot: it starts a line and ends with a soft line break,
    so lines stay within 76 characters whatever its length. Every ``-`` is encoded where a
    line could otherwise start with ``--`` (a MIME boundary)."""
    if not value:
        return b""
    if (
        len(value) < QP_LINE
        and value.isascii()
        and value.isprintable()
        and "=" not in value
        and "--" not in value
    ):
        return value.encode("ascii") + b"=\r\n"
    out, width = [], 0
    for octet in value.encode("utf-8", "replace"):
        literal = 32 <= octet <= 126 and octet not in (61, 45)  # "=" and "-"
        token = chr(octet) if literal else f"={octet:02X}"
        if width + len(token) >= QP_LINE:
            out.append("=\r\n")
            width = 0
        out.append(token)
        width += len(token)
    out.append("=\r\n")
    return "".join(out).encode("ascii")


class Spliced:
    """A prepared post split at its slots, and the lines that hold slots."""

    def __init__(self, prepared: bytes, prefix: str) -> None:
        # Once per post: the post's own parts may have long lines or bare line ends.
        prepared = wire_safe(prepared, eight_bit_ok=True)
        pieces = slot_pattern(prefix).split(prepared)
        self.literals = pieces[0::3]
        self.slots = [
            (kind.decode(), name.decode())
            for kind, name in zip(pieces[1::3], pieces[2::3], strict=True)
        ]
        self.seven_bit = all(literal.isascii() for literal in self.literals)
        self.checked = fits(b"".join(self.literals), eight_bit_ok=True)
        # (octets of the literal text, slot indexes) for every line that holds a slot
        self.lines: list[tuple[int, list[int]]] = []
        width, on_line = len(self.literals[0].rpartition(b"\n")[2]), []
        for index, literal in enumerate(self.literals[1:]):
            on_line.append(index)
            head, newline, tail = literal.partition(b"\r\n")
            if newline:
                self.lines.append((width + len(head), on_line))
                width, on_line = len(literal.rpartition(b"\n")[2]), []
            else:
                width += len(literal)
        if on_line:
            self.lines.append((width, on_line))

    def render(self, values: dict[str, str]) -> bytes | None:
        """The copy with ``values`` in its slots; ``None`` if one does not fit plain text."""
        encoded, widths, vouched = [], [], self.checked
        for kind, name in self.slots:
            value = values[name]
            if kind == "q":
                data = quoted_printable(value)
            elif kind == "r":
                if not value.isascii() or "--" in value:
                    return None
                data = value.encode("ascii")
            else:
                data = value.encode("utf-8")
                vouched = vouched and data.isascii()
            encoded.append(data)
            widths.append(max(map(len, data.split(b"\r\n"))) if b"\r\n" in data else len(data))
        for width, on_line in self.lines:
            if width + sum(widths[i] for i in on_line) > MAX_LINE:
                if any(self.slots[i][0] == "r" for i in on_line):
                    return None
                vouched = False
        out = [self.literals[0]]
        for data, literal in zip(encoded, self.literals[1:], strict=True):
            out.append(data)
            out.append(literal)
        copy = b"".join(out)
        if not vouched:
            return copy
        return SevenBitWireReady(copy) if self.seven_bit else WireReady(copy)


class PersonalTemplate:
    """The post, ready to become each recipient's own copy."""

    def __init__(self, message: bytes, decoration: Decoration | None, *, rewrite_to: bool) -> None:
        self.message, self.decoration, self.rewrite_to = crlf(message), decoration, rewrite_to
        self.prefix = f"\0LD{secrets.token_hex(8)}:"  # no post can contain it by chance
        self._forms: dict[str, Spliced] = {}

    def render(self, recipient: Addressee) -> bytes:
        values = {}
        if self.rewrite_to:
            values["to"] = format_to(recipient.address, recipient.display_name)
        if self.decoration is None or recipient.member_id is None:
            return self._form("other").render(values)
        values.update(
            self.decoration.member_values(
                recipient.address, recipient.display_name, recipient.member_id
            )
        )
        copy = self._form("member").render(values)
        if copy is None:
            copy = self._form("member-qp").render(values)
        return copy

    def _form(self, kind: str) -> Spliced:
        if kind not in self._forms:
            self._forms[kind] = Spliced(self._prepare(kind), self.prefix)
        return self._forms[kind]

    def _prepare(self, kind: str) -> bytes:
        prefix, decoration = self.prefix, self.decoration
        message = self.message
        if self.rewrite_to:
            message = replace_to(message, header_marker("to", prefix))
        if decoration is None:
            return message
        if kind == "other":  # not a member: the $user_* names stay as written
            return decoration.prepare(message, {})
        values = {name: marker(name, prefix) for name in MEMBER_NAMES}
        url = header_marker("unsubscribe_url", prefix) if decoration.offers_one_click else ""
        return decoration.prepare(
            message,
            values,
            one_click_url=url,
            slots=prefix,
            quoted_printable=kind == "member-qp",
        )
