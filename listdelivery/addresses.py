"""Checks on envelope addresses, shared by the pipeline and the runner."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def unique_addresses(addresses: Iterable[Any]) -> list[Any]:
    """Recipients in sorted order, each once, whatever its case (the first spelling wins)."""
    seen: dict[str, Any] = {}
    for address in (
        sorted(addresses, key=str) if isinstance(addresses, (set, frozenset)) else addresses
    ):
        seen.setdefault(str(address).casefold(), address)
    return list(seen.values())


def address_problem(address: Any) -> str | None:
    """Why ``address`` cannot be an envelope address, or ``None``."""
    if not isinstance(address, str):
        return f"is not text but {type(address).__name__}"
    if any(c in address for c in "\r\n\0"):
        return "contains a line break (header injection)"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "has no domain"
    if any(c.isspace() or c in "<>,;" for c in address) or len(address) > 254:
        return "is not a single address"
    return None
