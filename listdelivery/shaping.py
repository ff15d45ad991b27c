"""Traffic shaping: which relay takes a transaction, when it may go, and what a reply means for the pace.

The SMTP pool asks a :class:`Shaper` before each transaction and tells it
every outcome. The shaper keeps nothing that matters in memory: rates,
learned rates, quotas, session caps and resting relays live in the shared
store of :mod:`listdelivery.limits`, so every runner on every machine obeys
the same limits.

- A transaction goes to a healthy relay chosen at random by ``WEIGHT`` among
  those the list may use. A relay that refuses connections, TLS or the login,
  or does not answer, rests for ``RELAY_REST`` and its traffic moves to the
  others; only when every relay rests does the failure reach the runner.
- It waits for a token of every rate of its relay and of the destination
  group of each of its recipients, and for the relay's daily quota.
- A reply that means "slow down" (:data:`SLOW_DOWN_REPLIES`) halves the
  relay's learned rate (and the group's), which climbs back after a quiet
  period; the transaction is sent again when the limit allows. It is not a
  failure: no deferral, no bounce, no retry delay.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .destinations import Group, Router, groups_from
from .rates import Rate
from .relays import Relay, relays_from

logger = logging.getLogger(__name__)

#: Replies that mean "slow down", matched against "<code> <text>" without case.
SLOW_DOWN_REPLIES = [
    r"^421\b",  # closing: come back later
    r"^4\d\d\s+4\.7\.\d+",  # 4xx with an enhanced code about policy or rate
    r"throttl",  # Amazon SES: 454 Throttling failure
    r"rate limit",
    r"too much mail",  # Postfix anvil: 450 4.7.1 Error: too much mail from …
    r"too many connections",  # 421 4.7.0 too many connections
    r"too many (messages|emails|mails)",
    r"\b4\.7\.28\b",  # Gmail: unusual rate of unsolicited mail
    r"\bTSS04\b",  # Yahoo: temporarily deferred
    r"peak smtp relay limit",  # Gmail relay: 450 4.2.1
    r"\b4\.2\.1\b.*(limit|rate)",
]
#: A transaction turned away by throttling this many times in one run is given back as it is.
MAX_THROTTLES = 8
#: Seconds a slot of a session cap lives without renewal (a killed runner's frees itself).
SLOT_TTL = 60.0
#: Seconds a rate waits after a "slow down" reply, for the server's window to empty.
SLOW_DOWN_PAUSE = 0.5
#: Seconds a "too many connections" reply rests the relay's new sessions.
CONNECTION_PAUSE = 1.0
#: Seconds between two reads of whether a relay rests.
HEALTH_CHECK_EVERY = 1.0


class Shaper:
    """The traffic policy of one runner's SMTP pool."""

    def __init__(self, config: Mapping[str, Any], store: Any = None) -> None:
        self.config = config
        self.relays = relays_from(config)
        self.router = Router(groups_from(config))
        patterns = config["SLOW_DOWN_REPLIES"]
        self.slow_down_replies = [
            re.compile(p, re.IGNORECASE)
            for p in (SLOW_DOWN_REPLIES if patterns is None else patterns)
        ]
        self.max_wait = config["LIMIT_WAIT"].total_seconds()
        self.rest = config["RELAY_REST"].total_seconds()
        self._store = store
        self._resting: dict[str, float] = {}  # relay name -> until, as last read
        self._checked: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """Whether there is anything to shape: else the pool sends as it always has."""
        return (
            len(self.relays) > 1 or any(r.limited for r in self.relays) or bool(self.router.groups)
        )

    @property
    def store(self) -> Any:
        if self._store is None:
            from .limits import store_for

            self._store = store_for(self.config["RATE_LIMIT_STORAGE"] or None)
        return self._store

    def thread_done(self) -> None:
        """A pool thread ends its work: let go of its database connection, if the store used one."""
        from .limits import DatabaseStore

        if isinstance(self._store, DatabaseStore):
            from django.db import connection

            connection.close()

    # -- choosing ----------------------------------------------------------------

    def choose(self, allowed: Iterable[Relay], avoid: frozenset[str] = frozenset()) -> Relay | None:
        """A healthy relay by weight, or ``None`` when every one rests."""
        healthy = [r for r in allowed if r.name not in avoid and not self.resting(r)]
        if not healthy:
            return None
        if len(healthy) == 1:
            return healthy[0]
        return random.choices(healthy, weights=[r.weight for r in healthy])[0]

    def resting(self, relay: Relay) -> bool:
        now = time.time()
        if now - self._checked.get(relay.name, 0.0) >= HEALTH_CHECK_EVERY:
            self._checked[relay.name] = now
            self._resting[relay.name] = _until(self.store.snapshot(_down(relay)))
        return self._resting.get(relay.name, 0.0) > now

    def rest_relay(self, relay: Relay, why: str) -> None:
        """Leave ``relay`` alone for ``RELAY_REST``: every runner moves its traffic elsewhere."""
        if len(self.relays) == 1:
            return  # nowhere else to go: the failure is the runner's to judge
        logger.warning("Relay %s rests for %g s: %s", relay.name, self.rest, why)
        self.store.throttle_for(_down(relay), self.rest)
        self._resting[relay.name] = time.time() + self.rest
        self._checked[relay.name] = time.time()

    # -- pacing -------------------------------------------------------------------

    def admit(self, relay: Relay, recipients: list[str]) -> float:
        """Take the tokens a transaction needs; 0.0 when it may go, else seconds to wait."""
        for group in self.router.groups_of(recipients):
            for rate in group.rates:
                wait = self.store.take(_group_key(group, rate), rate)
                if wait > 0:
                    return wait
        for rate in relay.rates:
            wait = self.store.take(_relay_key(relay, rate), rate)
            if wait > 0:
                return wait
        if relay.quota:
            from .limits import seconds_until_quota_reopens

            if self.store.consume_quota(_quota_key(relay), relay.quota, len(recipients)) < len(
                recipients
            ):
                return seconds_until_quota_reopens()
        return 0.0

    def is_slow_down(self, code: int | None, text: str) -> bool:
        reply = f"{code} {text}" if code is not None else text
        return any(pattern.search(reply) for pattern in self.slow_down_replies)

    def slow_down(self, relay: Relay, recipients: list[str], code: int | None, text: str) -> float:
        """The server said "slow down": lower the learned rates and pause them a moment.

        The pause lets the server's own window empty: sending again at once, even at
        the lower rate, would only be turned away again. Returns the seconds to wait.
        """
        logger.info("Relay %s asks to slow down: %s %s", relay.name, code, text)
        if code == 421 and "connection" in text.lower():
            self.store.throttle_for(_relay_key(relay, None), CONNECTION_PAUSE)
        keys = [_relay_key(relay, rate) for rate in relay.rates[:1]]
        for group in self.router.groups_of(recipients):
            keys += [_group_key(group, rate) for rate in group.rates[:1]]
        for key in keys:
            self.store.slow_down(key)
            self.store.throttle_for(key, SLOW_DOWN_PAUSE)
        if not relay.rates:
            self.store.throttle_for(_relay_key(relay, None), CONNECTION_PAUSE)
            return CONNECTION_PAUSE
        return SLOW_DOWN_PAUSE

    def paused_for(self, relay: Relay) -> float:
        """Seconds until the relay takes new sessions again (after "too many connections")."""
        return max(_until(self.store.snapshot(_relay_key(relay, None))) - time.time(), 0.0)

    # -- session caps --------------------------------------------------------------

    def open_session(self, relay: Relay, holder: str) -> Any:
        """A slot of the relay's session cap, ``True`` when it has none, ``None`` when all are taken."""
        if not relay.connections:
            return True
        return self.store.acquire_slot(_relay_key(relay, None), relay.connections, holder, SLOT_TTL)

    def keep_session(self, slot: Any) -> bool:
        return slot is True or self.store.renew_slot(slot, SLOT_TTL)

    def close_session(self, slot: Any) -> None:
        if slot is not True and slot is not None:
            self.store.release_slot(slot)

    # -- for people ------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Each relay and destination group: limits, learned rate, sessions, quota, resting.

        ``throttled_until`` and ``resting_until`` are aware datetimes (UTC), ``None`` when past.
        """
        rows = []
        for relay in self.relays:
            state = self.store.snapshot(_relay_key(relay, relay.rates[0] if relay.rates else None))
            sessions = self.store.snapshot(_relay_key(relay, None)).get("sessions", 0)
            quota = (
                self.store.snapshot(_quota_key(relay)).get("quota_used", 0) if relay.quota else 0
            )
            down = self.store.snapshot(_down(relay)).get("throttled_until")
            rows.append(
                {
                    "kind": "relay",
                    "name": relay.name,
                    "limits": relay.describe(),
                    "learned_rate": state.get("learned_rate"),
                    "throttled_until": state.get("throttled_until"),
                    "sessions": sessions,
                    "quota_used": quota,
                    "quota": relay.quota,
                    "resting_until": down,
                }
            )
        for group in self.router.groups:
            state = self.store.snapshot(_group_key(group, group.rates[0]))
            rows.append(
                {
                    "kind": "destination",
                    "name": group.name,
                    "limits": ", ".join(str(r) for r in group.rates)
                    + f" to {', '.join(sorted(group.domains))}",
                    "learned_rate": state.get("learned_rate"),
                    "throttled_until": state.get("throttled_until"),
                    "sessions": None,
                    "quota_used": None,
                    "quota": None,
                    "resting_until": None,
                }
            )
        return rows


def _until(state: Mapping[str, Any]) -> float:
    """A snapshot's ``throttled_until`` (a datetime, ``None`` once past) as epoch seconds."""
    moment = state.get("throttled_until")
    return moment.timestamp() if moment else 0.0


def _relay_key(relay: Relay, rate: Rate | None) -> str:
    return f"relay:{relay.name}" + (f":{rate}" if rate is not None else "")


def _group_key(group: Group, rate: Rate) -> str:
    return f"destination:{group.name}:{rate}"


def _quota_key(relay: Relay) -> str:
    return f"quota:{relay.name}"


def _down(relay: Relay) -> str:
    return f"down:{relay.name}"
