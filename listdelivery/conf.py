"""The one place listdelivery reads its settings.

Everything lives in a single ``LISTDELIVERY`` dict in the Django settings. It
is read at call time and cached until ``setting_changed`` fires, so
``override_settings(LISTDELIVERY={...})`` works the way Mailman's
``config.push`` does. The keys follow Mailman's ``[mta]`` names in upper case.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, Any] = {
    # Upstream SMTP server (Mailman's [mta] section).
    "SMTP_HOST": "localhost",
    "SMTP_PORT": 25,
    "SMTP_USER": "",
    "SMTP_PASSWORD": "",
    "SMTP_SECURE_MODE": "smtp",
    "SMTP_VERIFY_CERT": True,
    "SMTP_VERIFY_HOSTNAME": True,
    "SMTP_TIMEOUT": timedelta(seconds=60),
    "SMTP_EHLO_NAME": "",  # empty: this machine's fully qualified name
    "MAX_RECIPIENTS": 10,
    "MAX_SESSIONS_PER_CONNECTION": 0,
    # Retries of temporary failures.
    "DELIVERY_RETRY_PERIOD": timedelta(days=5),
    "DELIVERY_RETRY_DELAY": timedelta(minutes=15),
    "DELIVERY_RETRY_MAX_DELAY": timedelta(hours=4),
    # VERP.
    "VERP_DELIMITER": "+",
    "VERP_FORMAT": "${bounces}+${local}=${domain}",
    "VERP_PERSONALIZED_DELIVERIES": False,
    "VERP_DELIVERY_INTERVAL": 0,
    # Bounce scoring (Mailman's list defaults).
    "BOUNCE_SCORE_THRESHOLD": 5,
    "BOUNCE_INFO_STALE_AFTER": timedelta(days=7),
    # RFC 8058 one-click unsubscribe on personalized copies (off while the URL is empty).
    "UNSUBSCRIBE_BASE_URL": "",
    "UNSUBSCRIBE_TOKEN_MAX_AGE": timedelta(days=90),
    # Delivery modules, by dotted path.
    "BULK_DELIVERY": "listdelivery.delivery.bulk.BulkDelivery",
    "INDIVIDUAL_DELIVERY": "listdelivery.delivery.individual.IndividualDelivery",
    # Our own: parallelism and crash safety.
    "SMTP_CONNECTIONS": 1,
    "LEASE_DURATION": timedelta(minutes=5),
    "CHECKPOINT_EVERY": 100,
    "CLAIM_BATCH": 20,
    # A post whose attempts end in an error of listdelivery itself this many times
    # in a row fails with that error instead of being retried for ever.
    "UNEXPECTED_ERROR_LIMIT": 5,
    "ENQUEUE_TASKS": True,
}

DURATION_KEYS = frozenset(k for k, v in DEFAULTS.items() if isinstance(v, timedelta))
INTEGER_KEYS = frozenset(
    k for k, v in DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)
)
BOOLEAN_KEYS = frozenset(k for k, v in DEFAULTS.items() if isinstance(v, bool))
SECRET_KEYS = frozenset({"SMTP_PASSWORD"})

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhms]?)\s*$", re.IGNORECASE)
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds", "": "seconds"}
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


def parse_duration(value: Any) -> timedelta:
    """A ``timedelta``, a number of seconds, or Mailman's ``5d`` / ``15m`` / ``30s``."""
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = timedelta(seconds=value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        amount, unit = match.groups()
        result = timedelta(**{_UNITS[unit.lower()]: float(amount)})
    else:
        raise ValueError(
            f"{value!r} is not a duration: use a timedelta, seconds, or a form like 5d, 15m, 30s"
        )
    if result < timedelta(0):
        raise ValueError("a duration cannot be negative")
    return result


def _parse_integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"{value!r} is not a whole number")


def _parse_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is not yes or no")


def normalize(key: str, value: Any) -> Any:
    if key in DURATION_KEYS:
        return parse_duration(value)
    if key in INTEGER_KEYS:
        return _parse_integer(value)
    if key in BOOLEAN_KEYS:
        return _parse_boolean(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


def user_settings() -> dict[str, Any]:
    """The site's own ``LISTDELIVERY`` dict, as written."""
    return dict(getattr(settings, "LISTDELIVERY", None) or {})


def problems() -> list[tuple[str, str]]:
    """``(key, message)`` for every value that cannot be used; the system checks report them."""
    found = []
    for key, value in user_settings().items():
        if key not in DEFAULTS:
            continue
        try:
            normalize(key, value)
        except ValueError as error:
            found.append((key, _describe(key, error)))
    return found


def _describe(key: str, error: ValueError) -> str:
    if key in SECRET_KEYS:
        return "is not text"
    return str(error)


@lru_cache(maxsize=1)
def get_config() -> dict[str, Any]:
    """Every setting, defaults merged with the site's values and converted to their types."""
    config = dict(DEFAULTS)
    for key, value in user_settings().items():
        if key not in DEFAULTS:
            continue
        try:
            config[key] = normalize(key, value)
        except ValueError as error:
            raise ImproperlyConfigured(f"LISTDELIVERY[{key!r}] {_describe(key, error)}") from None
    return config


def get(key: str) -> Any:
    return get_config()[key]


@receiver(setting_changed)
def _reset_cache(*, setting: str, **kwargs: Any) -> None:
    if setting == "LISTDELIVERY":
        get_config.cache_clear()
