"""System checks: a bad setting is reported at start-up, not discovered at delivery time.

Ids are stable and documented in the README:

- ``listdelivery.E001`` ``SMTP_SECURE_MODE`` is not smtp, starttls or smtps.
- ``listdelivery.E002`` ``VERP_DELIVERY_INTERVAL`` is negative.
- ``listdelivery.E003`` ``VERP_FORMAT`` cannot be used.
- ``listdelivery.E004`` a delivery class cannot be imported or is not a delivery module.
- ``listdelivery.E005`` a value has the wrong type (not a number, duration or yes/no).
- ``listdelivery.E006`` a number is out of range.
- ``listdelivery.E007`` ``VERP_DELIMITER`` is not a single separator character.
- ``listdelivery.E010`` ``UNSUBSCRIBE_BASE_URL`` is set but is not an http(s) URL (or holds
  characters no URL may hold unencoded: it goes into a header of every personal copy).
- ``listdelivery.E011`` ``SMTP_EHLO_NAME`` is not a host name or an address literal.
- ``listdelivery.W001`` an unknown key in ``LISTDELIVERY`` (a typo is otherwise silent).
- ``listdelivery.W002`` ``LEASE_DURATION`` is not longer than ``SMTP_TIMEOUT``.
- ``listdelivery.W003`` only one of ``SMTP_USER`` and ``SMTP_PASSWORD`` is set.
- ``listdelivery.W004`` ``django_q`` is not in ``INSTALLED_APPS``: only ``deliver_pending`` delivers.
- ``listdelivery.E008`` ``Q_CLUSTER['retry']`` is not longer than its ``timeout``.
- ``listdelivery.E009`` ``Q_CLUSTER`` would retry a failing task forever.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from . import conf, verp

SECURE_MODES = ("smtp", "starttls", "smtps")
MINIMUMS = {
    "SMTP_PORT": 1,
    "MAX_SESSIONS_PER_CONNECTION": 0,
    "SMTP_CONNECTIONS": 1,
    "CHECKPOINT_EVERY": 1,
    "CLAIM_BATCH": 1,
    "BOUNCE_SCORE_THRESHOLD": 1,
    "UNEXPECTED_ERROR_LIMIT": 1,
}


def _error(key: str, message: str, number: int, hint: str | None = None) -> checks.Error:
    return checks.Error(
        f"LISTDELIVERY[{key!r}] {message}", hint=hint, id=f"listdelivery.E{number:03d}"
    )


def _warning(message: str, number: int, hint: str | None = None) -> checks.Warning:
    return checks.Warning(message, hint=hint, id=f"listdelivery.W{number:03d}")


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    user = conf.user_settings()
    for key in user:
        if key not in conf.DEFAULTS:
            close = difflib.get_close_matches(key, conf.DEFAULTS, n=1)
            found.append(
                _warning(
                    f"LISTDELIVERY has an unknown key {key!r}; it is ignored.",
                    1,
                    hint=f"Did you mean {close[0]!r}?" if close else None,
                )
            )
    broken = dict(conf.problems())
    for key, message in broken.items():
        found.append(_error(key, message, 5))
    config = {**conf.DEFAULTS}
    config.update(
        {k: conf.normalize(k, v) for k, v in user.items() if k in conf.DEFAULTS and k not in broken}
    )

    if str(config["SMTP_SECURE_MODE"]).lower() not in SECURE_MODES:
        found.append(
            _error(
                "SMTP_SECURE_MODE",
                f"is {config['SMTP_SECURE_MODE']!r}.",
                1,
                hint="Use one of: " + ", ".join(SECURE_MODES) + ".",
            )
        )
    if config["VERP_DELIVERY_INTERVAL"] < 0:
        found.append(
            _error(
                "VERP_DELIVERY_INTERVAL",
                "is negative.",
                2,
                hint="0 never VERPs, 1 always does, N VERPs every Nth post.",
            )
        )
    problem = verp.format_problem(config["VERP_FORMAT"])
    if problem:
        found.append(
            _error(
                "VERP_FORMAT",
                problem + ".",
                3,
                hint="The default is ${bounces}+${local}=${domain}.",
            )
        )
    for key in ("BULK_DELIVERY", "INDIVIDUAL_DELIVERY"):
        problem = _delivery_class_problem(config[key])
        if problem:
            found.append(_error(key, problem, 4))
    for key, minimum in MINIMUMS.items():
        if key not in broken and config[key] < minimum:
            found.append(_error(key, f"must be at least {minimum}.", 6))
    if config["SMTP_PORT"] > 65535:
        found.append(_error("SMTP_PORT", "must be at most 65535.", 6))
    delimiter = config["VERP_DELIMITER"]
    if len(delimiter) != 1 or delimiter.isalnum() or delimiter in "@ \t\r\n":
        found.append(
            _error(
                "VERP_DELIMITER",
                f"is {delimiter!r}.",
                7,
                hint="Use your MTA's recipient delimiter, one character such as + or -.",
            )
        )
    base_url = config["UNSUBSCRIBE_BASE_URL"]
    if base_url and not re.fullmatch(r"https?://[^/\s<>\"{}|\\^`]+[^\s<>\"{}|\\^`]*", base_url):
        found.append(
            _error(
                "UNSUBSCRIBE_BASE_URL",
                f"is {base_url!r}, not an http(s) URL a header can carry.",
                10,
                hint="For example https://lists.example.com (the site that serves "
                "listdelivery.urls), without spaces, quotes, braces or angle brackets.",
            )
        )
    ehlo_name = config["SMTP_EHLO_NAME"]
    if ehlo_name and not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f.:IPv]+\]", ehlo_name):
        found.append(
            _error(
                "SMTP_EHLO_NAME",
                f"is {ehlo_name!r}, not a host name or an address literal.",
                11,
                hint="For example lists.example.com or [192.0.2.1]; empty: this machine's name.",
            )
        )
    if config["LEASE_DURATION"] <= config["SMTP_TIMEOUT"]:
        found.append(
            _warning(
                "LISTDELIVERY['LEASE_DURATION'] is not longer than SMTP_TIMEOUT: a slow server "
                "could let a second runner take over a post that is still being delivered.",
                2,
            )
        )
    if bool(config["SMTP_USER"]) != bool(config["SMTP_PASSWORD"]):
        found.append(
            _warning(
                "Only one of LISTDELIVERY['SMTP_USER'] and LISTDELIVERY['SMTP_PASSWORD'] is set: "
                "listdelivery logs in only when both are.",
                3,
            )
        )
    return found


def _delivery_class_problem(path: str) -> str | None:
    from .delivery.base import BaseDelivery

    try:
        cls = import_string(path)
    except ImportError as error:
        return f"cannot be imported: {error}."
    if not (isinstance(cls, type) and issubclass(cls, BaseDelivery)):
        return f"{path!r} is not a subclass of listdelivery.delivery.base.BaseDelivery."
    return None


@checks.register()
def check_cluster(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if not apps.is_installed("django_q"):
        return [
            _warning(
                "django_q is not in INSTALLED_APPS: posts are delivered only when someone runs "
                "manage.py deliver_pending.",
                4,
                hint="Add 'django_q' to INSTALLED_APPS and run manage.py qcluster.",
            )
        ]
    cluster = getattr(settings, "Q_CLUSTER", {}) or {}
    found: list[checks.CheckMessage] = []
    timeout, retry = cluster.get("timeout"), cluster.get("retry", 60)
    if timeout is None or retry <= timeout:
        found.append(
            checks.Error(
                f"Q_CLUSTER['retry'] ({retry}) must be longer than Q_CLUSTER['timeout'] ({timeout}).",
                hint="Otherwise the broker hands a task that is still running to a second worker.",
                id="listdelivery.E008",
            )
        )
    if not cluster.get("max_attempts") and not cluster.get("ack_failures"):
        found.append(
            checks.Error(
                "Q_CLUSTER would retry a failing task forever (max_attempts 0, ack_failures off).",
                hint="Set 'max_attempts': 1 and 'ack_failures': True: listdelivery retries the "
                "post itself, from its row.",
                id="listdelivery.E009",
            )
        )
    return found
