"""The upstream relays a site sends through, read from its settings.

``LISTDELIVERY["RELAYS"]`` is a list of dicts, one per relay::

    {"NAME": "ses", "HOST": "email-smtp.eu-west-1.amazonaws.com", "PORT": 587,
     "SECURE_MODE": "starttls", "USER": "…", "PASSWORD": "…", "WEIGHT": 3,
     "CONNECTIONS": 10, "RATE": "14/s", "QUOTA": 50000}

Without ``RELAYS`` the ``SMTP_*`` settings form one relay named ``default``
(with ``SMTP_RATE`` and ``SMTP_CA_FILE``), so nothing changes for a site that
has one server. Parsing needs nothing from Django: :mod:`listdelivery.conf`
checks the setting with it before the apps are ready. A relay's password never
appears in an error message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .rates import Rate, parse_rates

#: The keys of a relay dict: the ``SMTP_*`` setting each one stands for, if any.
SMTP_KEYS = {
    "HOST": "SMTP_HOST",
    "PORT": "SMTP_PORT",
    "USER": "SMTP_USER",
    "PASSWORD": "SMTP_PASSWORD",
    "SECURE_MODE": "SMTP_SECURE_MODE",
    "VERIFY_CERT": "SMTP_VERIFY_CERT",
    "VERIFY_HOSTNAME": "SMTP_VERIFY_HOSTNAME",
    "CA_FILE": "SMTP_CA_FILE",
    "TIMEOUT": "SMTP_TIMEOUT",
    "EHLO_NAME": "SMTP_EHLO_NAME",
}
OWN_KEYS = ("NAME", "WEIGHT", "CONNECTIONS", "RATE", "QUOTA")
SECURE_MODES = ("smtp", "starttls", "smtps")


class RelayError(ValueError):
    """A relay setting that cannot be used; the message never quotes a password."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Relay:
    """One upstream: where it is (``smtp``, the ``SMTP_*`` keys for a connection) and its limits."""

    name: str
    smtp: Mapping[str, Any] = field(compare=False, repr=False)
    weight: int = 1
    connections: int = 0  # sessions open at once across every runner; 0: no cap
    rates: tuple[Rate, ...] = ()
    quota: int = 0  # recipients per UTC day; 0: none

    @property
    def limited(self) -> bool:
        return bool(self.connections or self.rates or self.quota)

    def describe(self) -> str:
        """For people: where it is and its limits, never its password."""
        limits = [str(rate) for rate in self.rates]
        if self.connections:
            limits.append(f"{self.connections} sessions")
        if self.quota:
            limits.append(f"{self.quota:,} recipients a day")
        where = f"{self.smtp['SMTP_HOST']}:{self.smtp['SMTP_PORT']}"
        return f"{self.name} ({where}, weight {self.weight}; {', '.join(limits) or 'no limits'})"


def parse_relays(value: Any) -> list[dict[str, Any]]:
    """The ``RELAYS`` setting checked and normalized: a list of dicts with known keys.

    JSON text is accepted too (from an environment variable).
    """
    if isinstance(value, str):
        value = _json(value, "RELAYS")
    if not isinstance(value, (list, tuple)):
        raise RelayError("must be a list of relays, each a dict with NAME and HOST")
    relays, names = [], set()
    for index, relay in enumerate(value):
        if not isinstance(relay, Mapping):
            raise RelayError(f"relay {index + 1} is not a dict")
        unknown = sorted(set(relay) - set(SMTP_KEYS) - set(OWN_KEYS))
        if unknown:
            raise RelayError(f"relay {index + 1} has unknown keys: {', '.join(unknown)}")
        name = relay.get("NAME")
        if not isinstance(name, str) or not name.strip() or any(c in name for c in ":\r\n "):
            raise RelayError(f"relay {index + 1} needs a NAME: a word without spaces or colons")
        if name in names:
            raise RelayError(f"two relays are named {name!r}")
        names.add(name)
        if not isinstance(relay.get("HOST"), str) or not relay["HOST"].strip():
            raise RelayError(f"relay {name!r} needs a HOST")
        relays.append(_relay_dict(name, relay))
    return relays


def _relay_dict(name: str, relay: Mapping[str, Any]) -> dict[str, Any]:
    checked = dict(relay)
    for key in ("PORT", "WEIGHT", "CONNECTIONS", "QUOTA"):
        if key in checked:
            checked[key] = _whole(name, key, checked[key])
    if checked.get("WEIGHT", 1) < 1:
        raise RelayError(f"relay {name!r}: WEIGHT must be at least 1")
    if "SECURE_MODE" in checked and checked["SECURE_MODE"] not in SECURE_MODES:
        raise RelayError(f"relay {name!r}: SECURE_MODE must be one of {', '.join(SECURE_MODES)}")
    if "RATE" in checked:
        try:
            checked["RATE"] = [str(rate) for rate in parse_rates(checked["RATE"])]
        except ValueError as error:
            raise RelayError(f"relay {name!r}: RATE {error}") from None
    for key in ("PASSWORD", "USER", "CA_FILE", "EHLO_NAME"):
        if key in checked and not isinstance(checked[key], str):
            raise RelayError(f"relay {name!r}: {key} must be text")
    return checked


def _whole(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RelayError(f"relay {name!r}: {key} must be a whole number")
    try:
        number = int(value)
    except ValueError:
        raise RelayError(f"relay {name!r}: {key} must be a whole number") from None
    if number < 0:
        raise RelayError(f"relay {name!r}: {key} cannot be negative")
    return number


def parse_list_relays(value: Any) -> dict[str, list[str]]:
    """``LIST_RELAYS``: ``{list address: [relay names]}``, addresses compared without case."""
    if isinstance(value, str):
        value = _json(value, "LIST_RELAYS")
    if not isinstance(value, Mapping):
        raise RelayError("must map list addresses to lists of relay names")
    parsed = {}
    for address, names in value.items():
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise RelayError(f"{address!r} must map to a list of relay names")
        parsed[str(address).lower()] = list(names)
    return parsed


def _json(text: str, key: str) -> Any:
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except ValueError:
        raise RelayError(f"is not JSON (a {key} value from the environment is JSON)") from None


def relays_from(config: Mapping[str, Any]) -> list[Relay]:
    """Every relay of the site; the ``SMTP_*`` settings when ``RELAYS`` is empty."""
    base = {key: config[key] for key in SMTP_KEYS.values()}
    if not config["RELAYS"]:
        rates = tuple(parse_rates(config["SMTP_RATE"]))
        return [Relay("default", base, rates=rates)]
    relays = []
    for relay in config["RELAYS"]:
        smtp = dict(base)
        for key, setting in SMTP_KEYS.items():
            if key in relay:
                smtp[setting] = relay[key]
        if "PASSWORD" not in relay and "USER" in relay:
            smtp["SMTP_PASSWORD"] = ""  # another login must not borrow SMTP_PASSWORD
        relays.append(
            Relay(
                relay["NAME"],
                smtp,
                weight=relay.get("WEIGHT", 1),
                connections=relay.get("CONNECTIONS", 0),
                rates=tuple(parse_rates(relay.get("RATE", ""))),
                quota=relay.get("QUOTA", 0),
            )
        )
    return relays


def describe_setting(value: Any) -> str:
    """``RELAYS`` for the dashboard: names, hosts and limits, never a password."""
    try:
        relays = parse_relays(value)
    except RelayError as error:
        return f"(cannot be used: {error.reason})"
    if not relays:
        return "(none: the SMTP_* settings are the one relay)"
    return "; ".join(
        f"{r['NAME']} ({r['HOST']}:{r.get('PORT', 'SMTP_PORT')}, weight {r.get('WEIGHT', 1)}"
        + (f", {', '.join(r['RATE'])}" if r.get("RATE") else "")
        + (f", {r['CONNECTIONS']} sessions" if r.get("CONNECTIONS") else "")
        + (f", {r['QUOTA']:,} a day" if r.get("QUOTA") else "")
        + ")"
        for r in relays
    )
