"""Groups of recipient domains with a rate each: how fast one mailbox provider is sent to.

``DESTINATION_PACK`` switches on the shipped groups below; ``DESTINATION_LIMITS``
adds groups or overrides them, key by key::

    "DESTINATION_PACK": True,
    "DESTINATION_LIMITS": {"google": {"RATE": "50/s"},
                           "example": {"DOMAINS": ["example.net"], "RATE": "1/s"}},

The shipped rates are cautious starting points, not the providers' published
limits (most publish none): raise them when your reputation allows.
Parsing needs nothing from Django.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .rates import Rate, parse_rates

PACK: dict[str, dict[str, Any]] = {
    "google": {"DOMAINS": ["gmail.com", "googlemail.com"], "RATE": ["20/s"]},
    "microsoft": {
        "DOMAINS": ["outlook.com", "hotmail.com", "live.com", "msn.com"],
        "RATE": ["10/s"],
    },
    "yahoo": {
        "DOMAINS": ["yahoo.com", "ymail.com", "rocketmail.com", "aol.com"],
        "RATE": ["10/s"],
    },
    "apple": {"DOMAINS": ["icloud.com", "me.com", "mac.com"], "RATE": ["10/s"]},
}


class DestinationError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Group:
    name: str
    domains: frozenset[str]
    rates: tuple[Rate, ...]


def parse_destination_limits(value: Any) -> dict[str, dict[str, Any]]:
    """``DESTINATION_LIMITS`` checked: ``{name: {"DOMAINS": [...], "RATE": [...]}}``."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise DestinationError("is not JSON (a value from the environment is JSON)") from None
    if not isinstance(value, Mapping):
        raise DestinationError("must map group names to dicts with DOMAINS and RATE")
    parsed = {}
    for name, group in value.items():
        if not isinstance(group, Mapping) or set(group) - {"DOMAINS", "RATE"}:
            raise DestinationError(f"group {name!r} must be a dict with DOMAINS and RATE only")
        checked: dict[str, Any] = {}
        if "DOMAINS" in group:
            domains = group["DOMAINS"]
            if isinstance(domains, str):
                domains = domains.split(",")
            if not all(isinstance(d, str) for d in domains):
                raise DestinationError(f"group {name!r}: DOMAINS must be domain names")
            checked["DOMAINS"] = [d.strip().lower() for d in domains if d.strip()]
        if "RATE" in group:
            try:
                checked["RATE"] = [str(rate) for rate in parse_rates(group["RATE"])]
            except ValueError as error:
                raise DestinationError(f"group {name!r}: RATE {error}") from None
        parsed[str(name)] = checked
    return parsed


def groups_from(config: Mapping[str, Any]) -> list[Group]:
    """The groups in force: the pack if switched on, with the site's groups over it."""
    merged: dict[str, dict[str, Any]] = {}
    if config["DESTINATION_PACK"]:
        merged = {name: dict(group) for name, group in PACK.items()}
    for name, group in config["DESTINATION_LIMITS"].items():
        merged.setdefault(name, {}).update(group)
    return [
        Group(name, frozenset(group.get("DOMAINS", ())), tuple(parse_rates(group.get("RATE", []))))
        for name, group in merged.items()
        if group.get("DOMAINS") and group.get("RATE")
    ]


class Router:
    """Which group a recipient's domain belongs to."""

    def __init__(self, groups: list[Group]) -> None:
        self.groups = groups
        self._by_domain = {domain: group for group in groups for domain in group.domains}

    def group_of(self, address: str) -> Group | None:
        return self._by_domain.get(address.rpartition("@")[2].lower())

    def groups_of(self, addresses: list[str]) -> list[Group]:
        found: dict[str, Group] = {}
        for address in addresses:
            group = self.group_of(address)
            if group is not None:
                found.setdefault(group.name, group)
        return list(found.values())
