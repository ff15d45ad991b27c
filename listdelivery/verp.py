"""Variable envelope return paths: encode a recipient into the bounce address, and back.

Mailman's encoder puts the recipient's local part and domain into
``VERP_FORMAT`` unescaped, and its decoder splits on the first ``=``, so
``eq=x@example.org`` comes back as ``eq@x=example.org``. Ours keeps the same
encoding (plain addresses look exactly as Mailman's) but decodes by position:
the bounces part ends at the first separator, the domain starts after the
last one. Domains cannot contain the separators, so every address decodes
back to itself, whatever ``+``, ``=`` or case its local part holds.

Coming back, the list is found by its bounces local part followed by the
delimiter (:func:`bounces_candidates`), never by splitting at the first
delimiter, which cuts ``test-bounces`` apart when the delimiter is ``-``.
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


def bounces_candidates(address: str, separators: str) -> list[tuple[str, str]]:
    """Every list whose bounces address ``address`` could be: ``(posting address, suffix)``.

    ``my-list-bounces-anne=example.org@example.com`` with ``-`` gives
    ``[("my-list@example.com", "anne=example.org")]``: the suffix starts at a
    separator right after ``-bounces``, never at one inside the list's name.
    The longest list name comes first (``a-bounces-b-bounces`` is the bounces
    address of list ``a-bounces-b`` before it is a VERP address of list ``a``).
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return []
    found = []
    marker = "-bounces"
    start = local.lower().find(marker)
    while start > 0:
        rest = local[start + len(marker) :]
        if not rest or rest[0] in separators:
            found.append((f"{local[:start]}@{domain}", rest[1:]))
        start = local.lower().find(marker, start + 1)
    return found[::-1]


def separator_after_bounces(verp_format: str) -> str:
    """The character ``verp_format`` puts right after ``${bounces}`` (``+`` in the default)."""
    parts = re.split(r"\$\{?(bounces|local|domain)\}?", verp_format)
    for index in range(1, len(parts) - 1, 2):
        if parts[index] == "bounces" and parts[index + 1]:
            return parts[index + 1][0]
    return ""


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
