"""What may go on the wire: CRLF line ends only, no line over 998 octets, 7-bit unless allowed.

The SMTP layer calls :func:`wire_safe` on every message it sends, as the last
line of defence (RFC 5321 §2.3.8 and §4.5.3.1.6, RFC 6152). It is a pure
function on bytes and cheap when the message is already fine, which is what
decoration and personalization produce. Otherwise it changes only what must
change: a header field that is too long or 8-bit is refolded (RFC 2047 encoded
words of at most 75 characters), a MIME part whose lines are too long or
8-bit is re-encoded as quoted-printable (text) or base64 (anything else), and
every other byte is left as it was.
"""

from __future__ import annotations

import base64
import functools
import quopri
import re
from email import base64mime, quoprimime
from email.parser import BytesHeaderParser
from email.policy import SMTP

MAX_LINE = 998
#: Nesting deeper than this is not a real message: its rest is only made safe, not re-encoded.
MAX_DEPTH = 40
#: ``=?utf-8?b?…?=`` holds at most 75 characters (RFC 2047 §2): 60 of base64, 45 octets.
_WORD_OCTETS = 45

_LINE_END = re.compile(rb"\r*\n|\r")
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_PLAIN_NAME = re.compile(rb"[!-9;-~]+:")  # as the email parser reads a field: no space before ":"
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]+")
_EIGHT_BIT_TO_QUESTION_MARK = bytes(range(128)) + b"?" * 128
_IDENTITY = ("", "7bit", "8bit", "binary")
_ENCAPSULATED = ("message/rfc822", "message/global", "message/news")


class WireReady(bytes):
    """Bytes whose maker guarantees CRLF line ends only and no line over 998 octets.

    Decoration and personalization check their pieces once per post and their
    values once per copy; marking the copy this way spares it the scan.
    """


class SevenBitWireReady(WireReady):
    """:class:`WireReady` bytes that are 7-bit as well."""


def ready(data: bytes) -> WireReady:
    """``data``, which the caller made wire-safe (8-bit allowed), marked as such."""
    return SevenBitWireReady(data) if data.isascii() else WireReady(data)


def wire_safe(message: bytes, *, eight_bit_ok: bool) -> bytes:
    """``message`` with CRLF line ends only, lines of at most 998 octets, and 7-bit
    unless ``eight_bit_ok`` (the server offers 8BITMIME)."""
    if isinstance(message, SevenBitWireReady) or (eight_bit_ok and isinstance(message, WireReady)):
        return message
    message = crlf(message)
    if fits(message, eight_bit_ok=eight_bit_ok):
        return message
    return _made_safe(message, eight_bit_ok)


def crlf(data: bytes) -> bytes:
    """``data`` with every line end made CRLF: a bare CR or LF becomes one, and so does
    ``CR CR LF`` (text converted twice)."""
    pairs = data.count(b"\r\n")
    if data.count(b"\r") == pairs and data.count(b"\n") == pairs:
        return data
    return _LINE_END.sub(b"\r\n", data)


def fits(data: bytes, *, eight_bit_ok: bool) -> bool:
    """No line over 998 octets, and 7-bit unless ``eight_bit_ok`` (``data`` has CRLF line ends)."""
    if not eight_bit_ok and not data.isascii():
        return False
    # Splitting is several times faster than any regular expression here.
    return len(data) <= MAX_LINE or max(map(len, data.split(b"\r\n"))) <= MAX_LINE


def encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 encoded words of at most 75 characters, split between characters."""
    words, chunk, size = [], [], 0
    for char in text:
        octets = len(char.encode("utf-8", "surrogatepass"))
        if chunk and size + octets > _WORD_OCTETS:
            words.append(_word("".join(chunk)))
            chunk, size = [], 0
        chunk.append(char)
        size += octets
    if chunk or not words:
        words.append(_word("".join(chunk)))
    return words


def _word(text: str) -> str:
    data = text.encode("utf-8", "replace")
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="


def fold_field(name: str, value: str) -> bytes:
    """The field ``name: value`` folded into 7-bit lines well under 998 octets, ending in CRLF.

    The email package's SMTP policy knows the structure of address and other
    fields; where it fails or leaves a line too long, the value becomes encoded
    words (right for any unstructured field).
    """
    name = re.sub(r"[^!-9;-~]", "", name) or "X-Unreadable"
    try:
        folded = SMTP.header_factory(name, value).fold(policy=SMTP).encode("ascii")
    except Exception:  # the email package's folder has many ways to fail
        folded = b""
    if folded.endswith(b"\r\n") and fits(folded, eight_bit_ok=False):
        return folded
    return (
        f"{name}: {' '.join(encoded_words(value))}".encode("ascii").replace(b"?= =?", b"?=\r\n =?")
        + b"\r\n"
    )


# -- the slow path: a message that needs changing -------------------------------------


@functools.lru_cache(maxsize=4)  # a bulk post is the same bytes for every chunk
def _made_safe(message: bytes, eight_bit_ok: bool) -> bytes:
    return _safe_entity(message, eight_bit_ok, depth=0)


def _safe_entity(entity: bytes, eight_bit_ok: bool, depth: int) -> bytes:
    """One message or MIME part (CRLF line ends), made safe."""
    if depth > MAX_DEPTH:
        return _crude(entity, eight_bit_ok)
    lines, separated, body = _split_entity(entity)
    fields = header_fields(lines)
    headers = BytesHeaderParser().parsebytes(b"".join(lines) + b"\r\n")
    content_type = headers.get_content_type()
    cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
    boundary = headers.get_boundary() if headers.get_content_maintype() == "multipart" else None
    if boundary:
        body = _safe_multipart(body, boundary.encode("ascii", "replace"), eight_bit_ok, depth)
    elif content_type in _ENCAPSULATED and cte in _IDENTITY:
        body = _safe_entity(body, eight_bit_ok, depth + 1)
    elif not fits(body, eight_bit_ok=eight_bit_ok):
        fields, body = _reencoded(fields, headers, body, top=depth == 0)
    head = b"".join(_safe_field(group, eight_bit_ok) for _, group in fields)
    return head + (b"\r\n" + body if separated or body else b"")


def _split_entity(entity: bytes) -> tuple[list[bytes], bool, bytes]:
    """``(header lines with their CRLF, whether a blank line ended them, body)``.

    As the email parser reads it: the header ends at the first empty line, or
    before the first line that is neither a field nor a continuation.
    """
    lines: list[bytes] = []
    position = 0
    while position < len(entity):
        end = entity.find(b"\r\n", position)
        end = len(entity) if end < 0 else end + 2
        line = entity[position:end]
        if line == b"\r\n":
            return lines, True, entity[end:]
        continuation = line[:1] in (b" ", b"\t") and lines
        unix_from = not lines and position == 0 and line.startswith(b"From ")
        if not continuation and not unix_from and not _FIELD.match(line):
            break
        lines.append(line if line.endswith(b"\r\n") else line + b"\r\n")
        position = end
    return lines, False, entity[position:]


def plain_fields(message: bytes) -> dict[str, str] | None:
    """The first value of each of ``message``'s header fields, by lowercased name, exactly as
    the email package's header parser gives it (compat32: unfolded by nothing, line breaks
    kept) — or ``None`` when the header block is not plain: not ASCII, line ends of more than
    one kind, a line that is neither a field nor a continuation (an mbox From line
    included). Only the parser can say what those read as.

    A fraction of a parse's cost; the posts a runner sends are nearly all plain.
    """
    first = message.find(b"\n")
    eol = b"\r\n" if first > 0 and message[first - 1] == 13 else b"\n"
    end = message.find(eol + eol)
    head = message if end < 0 else message[: end + len(eol)]
    if not head or head.startswith(eol) or not head.isascii():
        return None
    crs = head.count(b"\r")
    if crs != (head.count(b"\r\n") if eol == b"\r\n" else 0) or (crs and crs != head.count(b"\n")):
        return None
    fields: dict[str, str] = {}
    name, value = b"", b""
    for line in [*head.split(eol), b""]:  # a last field without a line end ends here too
        if line[:1] in (b" ", b"\t"):
            if not name:
                return None
            value += eol + line
            continue
        if name:
            fields.setdefault(name.lower().decode(), value.rstrip(b"\r\n").decode())
        if not line:  # the end of the block
            break
        if not _PLAIN_NAME.match(line):
            return None
        name, _, value = line.partition(b":")
        value = value.lstrip(b" \t")
    return fields


def header_fields(lines: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """Group header lines into fields with their continuation lines: ``[(lowercased name, lines)]``."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), [line]))
    return fields


def _safe_field(lines: list[bytes], eight_bit_ok: bool) -> bytes:
    raw = b"".join(lines)
    if all(len(line) <= MAX_LINE + 2 for line in lines) and (eight_bit_ok or raw.isascii()):
        return raw
    name, _, value = raw.partition(b":")
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", value).strip()
    return fold_field(name.strip().decode("ascii", "replace"), decode_unknown(unfolded))


def decode_unknown(data: bytes) -> str:
    """Bytes of unknown charset as text: UTF-8 when they are, else Windows-1252 or Latin-1."""
    for charset in ("utf-8", "cp1252"):
        try:
            return data.decode(charset)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def _safe_multipart(body: bytes, boundary: bytes, eight_bit_ok: bool, depth: int) -> bytes:
    delimiter = re.compile(rb"(?:\A|(?<=\n))--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    found = list(delimiter.finditer(body))
    if not found:
        return _crude(body, eight_bit_ok)
    out = [_crude(body[: found[0].start()], eight_bit_ok)]  # the preamble
    for index, match in enumerate(found):
        out.append(match.group(0))
        if match.group(1):
            out.append(_crude(body[match.end() :], eight_bit_ok))  # the epilogue
            break
        start = match.end() + 2
        # The line break before a delimiter belongs to the delimiter.
        end = found[index + 1].start() - 2 if index + 1 < len(found) else len(body)
        part = body[start:end] if end > start else b""
        tail = b"\r\n" if index + 1 < len(found) else b""
        out.append(b"\r\n" + _safe_entity(part, eight_bit_ok, depth + 1) + tail)
    return b"".join(out)


def _reencoded(fields, headers, body: bytes, *, top: bool):
    """A leaf part's fields and body, its content re-encoded so that it is 7-bit with short lines.

    Text becomes quoted-printable, anything else base64; a base64 body is only re-wrapped
    (decoders skip what is not base64), so even one that does not decode survives.
    """
    cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
    maintype = headers.get_content_maintype()
    if cte == "base64":
        data = _NOT_BASE64.sub(b"", body)
        new_cte = "base64"
        body = b"".join(data[i : i + 76] + b"\r\n" for i in range(0, len(data), 76))
    else:
        data = quopri.decodestring(body) if cte == "quoted-printable" else body
        if maintype in ("text", "message"):
            new_cte = "quoted-printable"
            body = quoprimime.body_encode(data.decode("latin-1"), 76, "\r\n").encode("latin-1")
        else:
            new_cte = "base64"
            body = base64mime.body_encode(data, 76, "\r\n").encode("ascii")
    names = [name for name, _ in fields]
    fields = [(n, g) for n, g in fields if n != "content-transfer-encoding"]
    if maintype == "text" and headers.get_param("charset") is None and not data.isascii():
        # Undeclared 8-bit text: say what it is, or that it is unknown (RFC 1428).
        charset = "utf-8" if _is_utf8(data) else "unknown-8bit"
        kept = str(headers.get("content-type", "text/plain")).strip()
        value = f'{" ".join(kept.split())}; charset="{charset}"'
        fields = [(n, g) for n, g in fields if n != "content-type"]
        fields.append(("content-type", [fold_field("Content-Type", value)]))
    if top and "mime-version" not in names:
        fields.append(("mime-version", [b"MIME-Version: 1.0\r\n"]))
    fields.append(
        ("content-transfer-encoding", [f"Content-Transfer-Encoding: {new_cte}\r\n".encode()])
    )
    return fields, body


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _crude(data: bytes, eight_bit_ok: bool) -> bytes:
    """Text no reader interprets (a preamble, an epilogue, absurd nesting): made safe bluntly."""
    if fits(data, eight_bit_ok=eight_bit_ok):
        return data
    if not eight_bit_ok:
        data = data.translate(_EIGHT_BIT_TO_QUESTION_MARK)
    return b"\r\n".join(
        b"\r\n".join(line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE))
        for line in data.split(b"\r\n")
    )
