"""Variable envelope return paths: encode a recipient into the bounce address, and back.

Mailman's encoder puts the recipient's local part and domain into
``VERP_FORMAT`` unescaped, and its decoder splits on the first ``=``, so
``eq=x@example.org`` comes back as ``eq@x=example.org``. Ours keeps the same
encoding (plain addresses look exactly as Mailman's) but decodes by position:
the bounces part ends at the first separator, the domain starts after the
last one. Domains cannot contain the separators, so every address decodes
back to itself, whatever ``+``, ``=`` or case its local part holds.
"""

from __future__ import annotations

import re
from functools import lru_cache
from string import Template

PLACEHOLDERS = ("bounces", "local", "domain")
_GROUPS = {
    "bounces": r"(?P<bounces>.+?)",
    "local": r"(?P<local>.+)",
    "domain": r"(?P<domain>[^@]+?)",
}


def encode(sender: str, recipient: str, verp_format: str) -> str:
    """The VERP'd envelope sender for ``recipient``; ``sender`` if the recipient has no domain."""
    bounces, _, sender_domain = sender.rpartition("@")
    local, at, domain = recipient.rpartition("@")
    if not at or not local or not domain:
        return sender
    expanded = _template(verp_format).safe_substitute(bounces=bounces, local=local, domain=domain)
    return f"{expanded}@{sender_domain}"


def decode(address: str, verp_format: str, bounces: str | None = None) -> str | None:
    """The recipient encoded in a VERP'd ``address``, or ``None`` if it is not one.

    ``bounces`` is the list's bounces local part (``test-bounces``), when known:
    it is needed when the format's separator can also appear in it.
    """
    match = _pattern(verp_format, bounces).match(address)
    if not match:
        return None
    return f"{match['local']}@{match['domain']}"


def split_suffix(address: str, delimiter: str) -> tuple[str, str]:
    """``test-bounces+x=y@example.com`` → ``("test-bounces@example.com", "x=y")``."""
    local, _, domain = address.rpartition("@")
    base, _, suffix = local.partition(delimiter)
    return f"{base}@{domain}", suffix


def format_problem(verp_format: str) -> str | None:
    """Why ``verp_format`` cannot be used, or ``None`` if it round-trips."""
    try:
        Template(verp_format).substitute(bounces="b", local="l", domain="d")
    except (KeyError, ValueError) as error:
        return f"has a placeholder other than $bounces, $local and $domain ({error})"
    missing = [name for name in PLACEHOLDERS if not _mentions(verp_format, name)]
    if missing:
        return "must contain " + ", ".join(f"${{{name}}}" for name in missing)
    if "@" in verp_format:
        return "is the local part only: the bounces domain is appended, so it cannot contain @"
    sample = "Plus+Tag=x@example.org"
    encoded = encode("list-bounces@example.com", sample, verp_format)
    if decode(encoded, verp_format, bounces="list-bounces") != sample:
        return "cannot be decoded: put a separator between the placeholders"
    return None


def _mentions(verp_format: str, name: str) -> bool:
    return f"${{{name}}}" in verp_format or re.search(rf"\${name}\b", verp_format) is not None


@lru_cache(maxsize=8)
def _template(verp_format: str) -> Template:
    """Parsed once per format, not once per recipient."""
    return Template(verp_format)


@lru_cache(maxsize=64)
def _pattern(verp_format: str, bounces: str | None) -> re.Pattern[str]:
    groups = dict(_GROUPS)
    if bounces:
        groups["bounces"] = f"(?P<bounces>{re.escape(bounces)})"
    parts = re.split(r"\$\{?(bounces|local|domain)\}?", verp_format)
    regex = "".join(
        groups[part] if index % 2 else re.escape(part) for index, part in enumerate(parts)
    )
    return re.compile(rf"^{regex}@[^@]+$", re.IGNORECASE | re.DOTALL)
