"""Checks on envelope addresses, shared by the pipeline and the runner."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Searched once per address, not once per character: a million members' enqueue checks each.
_LINE_BREAK = re.compile(r"[\r\n\0]")
_NOT_SINGLE = re.compile(r"[\s<>,;]")  # \s: what str.isspace() says is a space


def unique_addresses(addresses: Iterable[Any]) -> list[Any]:
    """Recipients in sorted order, each once, whatever its case (the first spelling wins)."""
    seen: dict[str, Any] = {}
    for address in (
        sorted(addresses, key=str) if isinstance(addresses, (set, frozenset)) else addresses
    ):
        seen.setdefault(str(address).casefold(), address)
    return list(seen.values())


def unique_members(
    addresses: Iterable[str], spelled_otherwise: Callable[[str], bool]
) -> Iterator[str]:
    """A list's member addresses as they come, each once whatever its case, without
    remembering them all.

    The database keeps a list's members unique by ``lower(address)``, which every
    database applies to ASCII letters; only addresses with other letters can still
    fold together (``Ä``/``ä``, ``ß``/``ss``), so only those are remembered. One that
    folds to another member's address, lowered (``spelled_otherwise``), is left to it.
    """
    folded: set[str] = set()
    for address in addresses:
        if address.isascii():
            yield address
            continue
        key = address.casefold()
        if key in folded or (key.isascii() and spelled_otherwise(address)):
            continue
        folded.add(key)
        yield address


def address_problem(address: Any) -> str | None:
    """Why ``address`` cannot be an envelope address, or ``None``."""
    if not isinstance(address, str):
        return f"is not text but {type(address).__name__}"
    if _LINE_BREAK.search(address):
        return "contains a line break (header injection)"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "has no domain"
    if _NOT_SINGLE.search(address) or len(address) > 254:
        return "is not a single address"
    return None
