"""Per-recipient copies made on bytes.

Mailman deep-copies and re-serializes the whole message for every recipient.
Here the post is prepared once — ``To:`` replaced by a marker, list headers
added, header and footer attached with markers for the member's values — and
split at the markers; each copy is the pieces joined around that member's
values.
"""

from __future__ import annotations

from email.header import Header
from email.utils import formataddr
from typing import Protocol

from .decorate import MARKER, Decoration, header_fields, join, marker, split


class Addressee(Protocol):
    address: str
    display_name: str
    member_id: int | None


def format_to(address: str, display_name: str = "") -> str:
    """``Name <address>``, the name RFC 2047-encoded when it is not ASCII."""
    name = " ".join(display_name.split())  # no CR/LF can reach the header
    if not name:
        return address
    if address.isascii():
        return formataddr((name, address), charset="utf-8")
    if not name.isascii():
        name = Header(name, "utf-8").encode()
    return formataddr((name, "x@x")).replace("<x@x>", f"<{address}>")


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


class PersonalTemplate:
    """The post, ready to become each recipient's own copy."""

    def __init__(self, message: bytes, decoration: Decoration | None, *, rewrite_to: bool) -> None:
        self.message, self.decoration, self.rewrite_to = message, decoration, rewrite_to
        prepared = replace_to(message, marker("to")) if rewrite_to else message
        if decoration:
            prepared = decoration.apply(prepared, personal=True)
        pieces = MARKER.split(prepared)
        self.literals = pieces[0::2]
        self.slots = [name.decode() for name in pieces[1::2]]
        # A footer with very long lines is quoted-printable: markers would not survive it.
        self.splice = not any(b"=00LD:" in literal for literal in self.literals)

    def render(self, recipient: Addressee) -> bytes:
        values = {"to": format_to(recipient.address, recipient.display_name)}
        if self.decoration:
            values.update(
                self.decoration.member_values(
                    recipient.address, recipient.display_name, recipient.member_id
                )
            )
        if not self.splice:
            message = replace_to(self.message, values["to"]) if self.rewrite_to else self.message
            return self.decoration.apply(message, personal=True, member=values)
        out = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:], strict=True):
            out.append(values[slot].encode("utf-8"))
            out.append(literal)
        return b"".join(out)
