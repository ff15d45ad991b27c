"""Per-recipient copies made on bytes, at the header level.

Mailman deep-copies and re-serializes the whole message for every recipient;
here the serialized post is split once around its ``To:`` header, and each
copy is the two halves joined around a new ``To:`` line.
"""

from __future__ import annotations

import re
from email.header import Header
from email.utils import formataddr
from typing import Protocol

_TO_LINE = re.compile(rb"^to[ \t]*:", re.IGNORECASE)


class Addressee(Protocol):
    address: str
    display_name: str


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


class MessageTemplate:
    """The serialized post, ready to receive a different ``To:`` per recipient."""

    def __init__(self, message: bytes) -> None:
        eol = b"\r\n" if b"\r\n" in message[: message.find(b"\n") + 1] else b"\n"
        end = message.find(eol + eol)
        headers, rest = (
            (message, b"") if end < 0 else (message[: end + len(eol)], message[end + len(eol) :])
        )
        lines = headers.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if _TO_LINE.match(line)), None)
        if start is None:
            self.before, self.after = headers, rest
            if headers and not headers.endswith(b"\n"):
                self.before += eol
        else:
            stop = start + 1
            while stop < len(lines) and lines[stop][:1] in (b" ", b"\t"):
                stop += 1
            self.before = b"".join(lines[:start])
            self.after = b"".join(lines[stop:]) + rest
        self.eol = eol

    def addressed_to(self, recipient: Addressee) -> bytes:
        line = format_to(recipient.address, recipient.display_name).encode("utf-8")
        return b"".join((self.before, b"To: ", line, self.eol, self.after))
