"""Rates as sites write them: ``14/s``, ``1000/h``, ``50000/d``, ``100/10s``.

Pure parsing with nothing from Django, so :mod:`listdelivery.conf` can check a
setting before the apps are ready.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Share of a second's worth of a rate that may go at once (the default burst).
BURST_SHARE = 0.02

DAY = 86400
UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY}
UNIT_NAMES = {
    **{name: "s" for name in ("s", "sec", "second", "seconds")},
    **{name: "m" for name in ("m", "min", "minute", "minutes")},
    **{name: "h" for name in ("h", "hour", "hours")},
    **{name: "d" for name in ("d", "day", "days")},
}
RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Rate:
    """``count`` tokens every ``per`` seconds."""

    count: int
    per: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"14/s"``, ``"1000/h"``, ``"50000/d"``, ``"100/10s"`` (units s, m, h, d)."""
        match = RATE.match(text)
        if not match or match.group(3).lower() not in UNIT_NAMES:
            raise ValueError(
                f"{text!r} is not a rate: write a count per unit, such as 14/s, 1000/h or 50000/d"
            )
        count, periods = int(match.group(1)), int(match.group(2) or 1)
        if count == 0 or periods == 0:
            raise ValueError(f"{text!r} allows nothing: a rate needs a count and a period above 0")
        return cls(count, float(periods * UNITS[UNIT_NAMES[match.group(3).lower()]]))

    @property
    def interval(self) -> float:
        """Seconds per token."""
        return self.per / self.count

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def default_burst(self) -> int:
        """Tokens that may go at once: :data:`BURST_SHARE` of a second's worth, at least one."""
        return max(1, int(self.per_second * BURST_SHARE))

    def __str__(self) -> str:
        for unit in ("d", "h", "m", "s"):
            periods = self.per / UNITS[unit]
            if periods == int(periods):
                return f"{self.count}/{int(periods) if periods != 1 else ''}{unit}"
        return f"{self.count}/{self.per:g}s"


def parse_rates(value: str | Iterable[str]) -> list[Rate]:
    """Rates from ``"14/s, 50000/d"`` or ``["14/s", "50000/d"]``; empty text gives none."""
    texts = re.split(r"[,;]", value) if isinstance(value, str) else list(value)
    return [Rate.parse(text) for text in texts if text.strip()]
