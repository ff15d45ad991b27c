"""The one place listdelivery reads its settings.

Everything lives in a single ``LISTDELIVERY`` dict in the Django settings. It
is read at call time, so ``override_settings(LISTDELIVERY={...})`` works the
way Mailman's ``config.push`` does, and so does a plain
``settings.LISTDELIVERY = {...}``: the converted values are cached only while
the dict is the same object with the same contents. The keys follow Mailman's
``[mta]`` names in upper case.

This module never reads the environment (a host's settings file does that,
explicitly, with ``listdelivery.environment``) and can be imported before
Django's settings are configured: the parsers below need nothing from Django.
"""

from __future__ import annotations

import re
from datetime import timedelta
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
    "XVERP": False,  # let a server that offers XVERP (Postfix) write the VERP'd senders
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
    "CLAIM_BATCH": 50,
    # A post to more recipients than this is split into shards that several runners
    # deliver at the same time; 0: never split.
    "SHARD_SIZE": 2500,
    # A post whose attempts end in an error of listdelivery itself this many times
    # in a row fails with that error instead of being retried for ever.
    "UNEXPECTED_ERROR_LIMIT": 5,
    "ENQUEUE_TASKS": True,
    # A cluster of the host's Q_CLUSTER["ALT_CLUSTERS"] for our tasks and the sweep; empty:
    # the host's own cluster.
    "Q_CLUSTER": "",
    # Bearer token for the Prometheus endpoint metrics/; empty: staff login only.
    "METRICS_TOKEN": "",
    # Traffic shaping (listdelivery.relays, .destinations, .shaping): upstream relays,
    # limits shared by every runner, and pacing that listens to the server.
    "SMTP_CA_FILE": "",
    "SMTP_RATE": "",
    "RELAYS": [],
    "LIST_RELAYS": {},
    "DESTINATION_PACK": False,
    "DESTINATION_LIMITS": {},
    "SLOW_DOWN_REPLIES": None,  # None: listdelivery.shaping.SLOW_DOWN_REPLIES
    "RATE_LIMIT_STORAGE": "",  # empty: Redis with django-q2's Redis broker, else the database
    "LIMIT_WAIT": timedelta(seconds=10),
    "RELAY_REST": timedelta(seconds=30),
}

#: What each setting does, in one sentence, for the dashboard (and anyone reading this file).
DESCRIPTIONS: dict[str, str] = {
    "SMTP_HOST": "The upstream SMTP server every post is handed to.",
    "SMTP_PORT": "The port of the upstream SMTP server.",
    "SMTP_USER": "Login name at the SMTP server; we log in only when user and password are both set.",
    "SMTP_PASSWORD": "Password at the SMTP server; never shown on a page, in a log or in an error.",
    "SMTP_SECURE_MODE": "smtp (plain), starttls (upgrade the connection), or smtps (TLS from the start).",
    "SMTP_VERIFY_CERT": "With TLS, refuse a server whose certificate is not valid.",
    "SMTP_VERIFY_HOSTNAME": "With TLS, refuse a certificate made out for another host name.",
    "SMTP_TIMEOUT": "How long to wait for the server before taking it as a temporary failure.",
    "SMTP_EHLO_NAME": "The name we give in EHLO; empty: this machine's fully qualified name.",
    "MAX_RECIPIENTS": "Most recipients in one SMTP transaction of a bulk post; 0: all of them at once.",
    "MAX_SESSIONS_PER_CONNECTION": "Transactions on one connection before it is reopened; 0: no limit.",
    "DELIVERY_RETRY_PERIOD": "Give up on recipients that failed temporarily when they made no progress "
    "for this long.",
    "DELIVERY_RETRY_DELAY": "Wait before the first retry; the wait doubles at every attempt.",
    "DELIVERY_RETRY_MAX_DELAY": "The longest wait between two retries.",
    "VERP_DELIMITER": "Separates the bounces address from the recipient encoded after it.",
    "VERP_FORMAT": "How a VERP'd envelope sender is written; @ and the list's domain follow it.",
    "VERP_PERSONALIZED_DELIVERIES": "VERP every post of a personalized list.",
    "VERP_DELIVERY_INTERVAL": "Lists without personalization: 0 never VERP, 1 always, N every Nth post.",
    "XVERP": "VERP'd posts of lists without personalization go in chunks with XVERP, the "
    "server writing each copy's VERP'd sender, when the server offers it (Postfix) and "
    "VERP_FORMAT is the default; off: one copy per member.",
    "BOUNCE_SCORE_THRESHOLD": "A member whose bounce score reaches this has delivery disabled.",
    "BOUNCE_INFO_STALE_AFTER": "A bounce score older than this starts again from 1.",
    "UNSUBSCRIBE_BASE_URL": "Where the site serves listdelivery's pages; when set, personalized "
    "copies carry a one-click unsubscribe link.",
    "UNSUBSCRIBE_TOKEN_MAX_AGE": "How long a one-click unsubscribe link keeps working.",
    "BULK_DELIVERY": "The delivery module for posts sent as one copy to many (a dotted path).",
    "INDIVIDUAL_DELIVERY": "The delivery module for personalized or VERP'd posts (a dotted path).",
    "SMTP_CONNECTIONS": "SMTP connections one runner uses at the same time.",
    "LEASE_DURATION": "How long a post stays with a runner that stopped answering before another "
    "takes it over.",
    "CHECKPOINT_EVERY": "SMTP transactions between two saves of progress: the most a crash can "
    "send twice.",
    "CLAIM_BATCH": "Posts a runner takes from the queue at once, as long as they hold no more "
    "than SHARD_SIZE recipients together (the first is always taken).",
    "SHARD_SIZE": "A post to more recipients than this is split into shards of this many, which "
    "several runners (workers, machines) deliver at the same time; 0: never split.",
    "UNEXPECTED_ERROR_LIMIT": "Attempts in a row ending in an error of listdelivery itself before "
    "the post fails with it.",
    "ENQUEUE_TASKS": "Start a django-q2 task as soon as a post is queued.",
    "Q_CLUSTER": "The django-q2 cluster (one of ALT_CLUSTERS) for our tasks; empty: the site's own.",
    "METRICS_TOKEN": "Bearer token for the Prometheus metrics endpoint; empty: staff login only.",
    "SMTP_CA_FILE": "A file of CA certificates to trust for the server's TLS certificate "
    "(a private CA); empty: the system's.",
    "SMTP_RATE": "Most messages per period through the SMTP_* server, for every runner together "
    "(14/s, 1000/h, 50000/d; several with commas); empty: no limit.",
    "RELAYS": "Several upstream relays, each with its own host, login, weight, session cap, rate "
    "and daily quota; empty: the SMTP_* settings are the one relay.",
    "LIST_RELAYS": "Which relays a list may use, by list address; a list not named uses them all.",
    "DESTINATION_PACK": "Switch on the shipped rates for big mailbox providers (Google, "
    "Microsoft, Yahoo, Apple).",
    "DESTINATION_LIMITS": "Groups of recipient domains with a rate each, added to or overriding "
    "the shipped pack.",
    "SLOW_DOWN_REPLIES": "Patterns of server replies that mean 'slow down'; empty: the shipped "
    "list (421, 4.7.x, Throttling, rate limit …).",
    "RATE_LIMIT_STORAGE": "Where shared limits live: database, or a redis:// URL; empty: Redis "
    "when django-q2 runs on Redis, else the database.",
    "LIMIT_WAIT": "The longest a runner waits for a limit before it sets the post aside until "
    "the limit allows.",
    "RELAY_REST": "How long a relay that refused connections, TLS or login is left alone.",
}

DURATION_KEYS = frozenset(k for k, v in DEFAULTS.items() if isinstance(v, timedelta))
INTEGER_KEYS = frozenset(
    k for k, v in DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)
)
BOOLEAN_KEYS = frozenset(k for k, v in DEFAULTS.items() if isinstance(v, bool))
SECRET_KEYS = frozenset({"SMTP_PASSWORD", "METRICS_TOKEN"})
#: Keys whose values are lists or dicts, each with its own parser (JSON text from the
#: environment); their errors never quote the value, which may hold a relay's password.
STRUCTURED_KEYS = frozenset(
    {"RELAYS", "LIST_RELAYS", "DESTINATION_LIMITS", "SLOW_DOWN_REPLIES", "SMTP_RATE"}
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhms]?)\s*$", re.IGNORECASE)
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds", "": "seconds"}
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


class BadValue(ValueError):
    """A value that cannot be used: ``str()`` is ``'ten' is not a whole number``."""

    def __init__(self, value: Any, reason: str) -> None:
        super().__init__(f"{value!r} {reason}")
        self.value = value
        self.reason = reason


def parse_duration(value: Any) -> timedelta:
    """A ``timedelta``, a number of seconds, or Mailman's ``5d`` / ``15m`` / ``30s``."""
    try:
        if isinstance(value, timedelta):
            result = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            result = timedelta(seconds=value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            amount, unit = match.groups()
            result = timedelta(**{_UNITS[unit.lower()]: float(amount)})
        else:
            raise BadValue(
                value, "is not a duration: use a timedelta, seconds, or a form like 5d, 15m, 30s"
            )
    except (OverflowError, ValueError) as error:  # 1e20 seconds, nan
        if isinstance(error, BadValue):
            raise
        raise BadValue(value, "is too long a duration") from None
    if result < timedelta(0):
        raise BadValue(value, "is a negative duration")
    return result


def _parse_integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise BadValue(value, "is not a whole number")


def _parse_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadValue(value, "is not yes or no")


def normalize(key: str, value: Any) -> Any:
    """``value`` converted to the type of ``key``'s default; :class:`BadValue` if it cannot be."""
    if key in STRUCTURED_KEYS:
        return _parse_structured(key, value)
    if key in DURATION_KEYS:
        return parse_duration(value)
    if key in INTEGER_KEYS:
        return _parse_integer(value)
    if key in BOOLEAN_KEYS:
        return _parse_boolean(value)
    if not isinstance(value, str):
        raise BadValue(value, "is not text")
    return value


def _parse_structured(key: str, value: Any) -> Any:
    from . import destinations, rates, relays  # pure modules: nothing from Django

    try:
        if key == "RELAYS":
            return relays.parse_relays(value)
        if key == "LIST_RELAYS":
            return relays.parse_list_relays(value)
        if key == "DESTINATION_LIMITS":
            return destinations.parse_destination_limits(value)
        if key == "SMTP_RATE":
            if not isinstance(value, (str, list, tuple)):
                raise ValueError("is not a rate such as 14/s")
            return ", ".join(str(rate) for rate in rates.parse_rates(value))
        return _parse_patterns(value)
    except ValueError as error:
        raise BadValue("(this value)", getattr(error, "reason", str(error))) from None


def _parse_patterns(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split("\n") if "\n" in value else [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError("must be a list of regular expressions")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"has a pattern that is not a regular expression: {error}") from None
    return list(value)


def user_settings() -> dict[str, Any]:
    """The site's own ``LISTDELIVERY`` dict, as written."""
    return dict(_written())


def _written() -> Any:
    written = getattr(settings, "LISTDELIVERY", None)
    return _NOTHING_WRITTEN if written is None else written


_NOTHING_WRITTEN: dict[str, Any] = {}


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
    if key in SECRET_KEYS or key in STRUCTURED_KEYS:  # never the value of a secret
        return getattr(error, "reason", "cannot be used")
    return str(error)


# (the LISTDELIVERY object read, a copy of its contents then, the converted config)
_cache: tuple[Any, dict[str, Any], dict[str, Any]] | None = None


def get_config() -> dict[str, Any]:
    """Every setting, defaults merged with the site's values and converted to their types.

    Cached while ``settings.LISTDELIVERY`` is the same dict with the same contents: a test
    that assigns a new dict, or changes one key of it, is never served stale values. The
    check is an identity test and one comparison of a small dict.
    """
    global _cache
    written = _written()
    cached = _cache
    if cached is not None and cached[0] is written and cached[1] == written:
        return cached[2]
    config = dict(DEFAULTS)
    for key, value in written.items():
        if key not in DEFAULTS:
            continue
        try:
            config[key] = normalize(key, value)
        except ValueError as error:
            raise ImproperlyConfigured(f"LISTDELIVERY[{key!r}] {_describe(key, error)}") from None
    _cache = (written, dict(written), config)
    return config


def get(key: str) -> Any:
    return get_config()[key]


@receiver(setting_changed)
def _reset_cache(*, setting: str, **kwargs: Any) -> None:
    global _cache
    if setting == "LISTDELIVERY":
        _cache = None
