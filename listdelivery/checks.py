"""System checks: a bad setting is reported at start-up, not discovered at delivery time.

Ids are stable and documented in the README:

- ``listdelivery.E001`` ``SMTP_SECURE_MODE`` is not smtp, starttls or smtps.
- ``listdelivery.E002`` ``VERP_DELIVERY_INTERVAL`` is negative.
- ``listdelivery.E003`` ``VERP_FORMAT`` cannot be used.
- ``listdelivery.E004`` a delivery class cannot be imported or is not a delivery module.
- ``listdelivery.E005`` a value has the wrong type (not a number, duration or yes/no).
- ``listdelivery.E006`` a number is out of range.
- ``listdelivery.E007`` ``VERP_DELIMITER`` is not a single separator character.
- ``listdelivery.E008`` and ``listdelivery.E009``: retired (they judged the host's own
  ``Q_CLUSTER``; each task now carries the options it needs). Never reused.
- ``listdelivery.E010`` ``UNSUBSCRIBE_BASE_URL`` is set but is not an http(s) URL (or holds
  characters no URL may hold unencoded: it goes into a header of every personal copy).
- ``listdelivery.E011`` ``SMTP_EHLO_NAME`` is not a host name or an address literal.
- ``listdelivery.E012`` ``LISTDELIVERY['Q_CLUSTER']`` names a cluster that
  ``Q_CLUSTER['ALT_CLUSTERS']`` does not define.
- ``listdelivery.E013`` ``USE_TZ`` is False: listdelivery needs aware datetimes.
- ``listdelivery.E014`` a database is MySQL, MariaDB or Oracle, which listdelivery does not support.
- ``listdelivery.W001`` an unknown key in ``LISTDELIVERY`` (a typo is otherwise silent).
- ``listdelivery.W002`` ``LEASE_DURATION`` is not longer than ``SMTP_TIMEOUT``.
- ``listdelivery.W003`` only one of ``SMTP_USER`` and ``SMTP_PASSWORD`` is set.
- ``listdelivery.W004`` ``django_q`` is not in ``INSTALLED_APPS``: only ``deliver_pending`` delivers.
- ``listdelivery.W005`` no schedule runs ``listdelivery.tasks.deliver_due``: retries wait for
  someone to run ``deliver_pending`` (a database check: ``migrate``, ``check --database``).
- ``listdelivery.W006`` a schedule runs ``deliver_due`` without ``save: False``: a success row
  a minute pushes the site's own task history out of ``save_limit`` (a database check).
- ``listdelivery.W007`` ``django_q`` is listed before ``listdelivery`` in ``INSTALLED_APPS``:
  ``manage.py qinfo --config`` is django-q2's own, which prints secrets.
- ``listdelivery.W008`` ``UNSUBSCRIBE_BASE_URL`` is set but the site's URLs do not include
  ``listdelivery.urls``: every one-click unsubscribe link would be a 404.
- ``listdelivery.W009`` the database is SQLite without ``IMMEDIATE`` transactions or a lock
  timeout of 20 seconds or more, while django-q2's workers will write beside other processes.
- ``listdelivery.W010`` ``METRICS_TOKEN`` is set but shorter than 32 characters: guessable.
- ``listdelivery.E015`` a CA file (``SMTP_CA_FILE`` or a relay's ``CA_FILE``) cannot be read.
- ``listdelivery.W011`` ``LIST_RELAYS`` names relays that ``RELAYS`` does not have.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import router
from django.urls import NoReverseMatch, reverse
from django.utils.module_loading import import_string

from . import conf, verp
from .redact import masked
from .relays import relays_from as relays_from_config

SECURE_MODES = ("smtp", "starttls", "smtps")
MINIMUMS = {
    "SMTP_PORT": 1,
    "MAX_SESSIONS_PER_CONNECTION": 0,
    "SMTP_CONNECTIONS": 1,
    "CHECKPOINT_EVERY": 1,
    "CLAIM_BATCH": 1,
    "SHARD_SIZE": 0,
    "BOUNCE_SCORE_THRESHOLD": 1,
    "UNEXPECTED_ERROR_LIMIT": 1,
}
METRICS_TOKEN_MINIMUM = 32


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
    from_environment = getattr(settings, "LISTDELIVERY", None)
    from_environment = getattr(from_environment, "from_environment", ())
    for key in user:
        if key not in conf.DEFAULTS:
            close = difflib.get_close_matches(key, conf.DEFAULTS, n=1)
            origin = " (from the environment)" if key in from_environment else ""
            found.append(
                _warning(
                    f"LISTDELIVERY has an unknown key {key!r}{origin}; it is ignored.",
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
    if 0 < len(config["METRICS_TOKEN"]) < METRICS_TOKEN_MINIMUM:
        found.append(
            _warning(
                f"LISTDELIVERY['METRICS_TOKEN'] is shorter than {METRICS_TOKEN_MINIMUM} "
                "characters: anyone who guesses it reads the delivery metrics.",
                10,
                hint="Use a random token, e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'.",
            )
        )
    found += _shaping_problems(config, broken)
    return found


def _shaping_problems(config: dict[str, Any], broken: dict[str, str]) -> list[checks.CheckMessage]:
    """A CA file that cannot be read, and per-list relays that name no relay."""
    found: list[checks.CheckMessage] = []
    if "RELAYS" in broken:
        return found
    relay_list = relays_from_config(config)
    for relay in relay_list:
        ca_file = relay.smtp.get("SMTP_CA_FILE")
        if ca_file and not os.access(ca_file, os.R_OK):
            key = "RELAYS" if config["RELAYS"] else "SMTP_CA_FILE"
            found.append(
                _error(
                    key,
                    f"names a CA file that cannot be read: {ca_file!r} (relay {relay.name}).",
                    15,
                    hint="A PEM file of the certificates of your private CA.",
                )
            )
    names = {relay.name for relay in relay_list}
    if "LIST_RELAYS" not in broken:
        for address, wanted in config["LIST_RELAYS"].items():
            unknown = [name for name in wanted if name not in names]
            if unknown:
                found.append(
                    _warning(
                        f"LISTDELIVERY['LIST_RELAYS'] sends {address} through relays that are "
                        f"not in RELAYS: {', '.join(unknown)}; it uses the others, or all.",
                        11,
                        hint=f"The relays are: {', '.join(sorted(names))}.",
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
    """What listdelivery needs of django-q2: installed after us, and our cluster defined.

    Nothing about the host's global ``Q_CLUSTER`` options: our tasks carry their own.
    """
    if not apps.is_installed("django_q"):
        return [
            _warning(
                "django_q is not in INSTALLED_APPS: posts are delivered only when someone runs "
                "manage.py deliver_pending.",
                4,
                hint="Add 'django_q' to INSTALLED_APPS and run manage.py qcluster.",
            )
        ]
    found: list[checks.CheckMessage] = []
    labels = [config.label for config in apps.get_app_configs()]
    if labels.index("django_q") < labels.index("listdelivery"):
        found.append(
            _warning(
                "django_q is listed before listdelivery in INSTALLED_APPS: manage.py qinfo "
                "--config is then django-q2's own, which prints SECRET_KEY and broker passwords.",
                7,
                hint="Move 'listdelivery' above 'django_q' in INSTALLED_APPS.",
            )
        )
    problem = _unknown_cluster()
    if problem:
        found.append(problem)
    return found


def _unknown_cluster() -> checks.CheckMessage | None:
    try:
        name = conf.normalize("Q_CLUSTER", conf.user_settings().get("Q_CLUSTER", ""))
    except ValueError:
        return None  # E005 already says so
    cluster = getattr(settings, "Q_CLUSTER", None) or {}
    main = cluster.get("cluster_name", cluster.get("name", "default"))
    alternatives = cluster.get("ALT_CLUSTERS") or {}
    if not name or name == main or name in alternatives:
        return None
    return _error(
        "Q_CLUSTER",
        f"is {name!r}, but Q_CLUSTER['ALT_CLUSTERS'] defines no such cluster: "
        "no qcluster would take listdelivery's tasks.",
        12,
        hint=f"Add it, e.g. Q_CLUSTER['ALT_CLUSTERS'] = {{{name!r}: {{'timeout': 1800, "
        f"'retry': 2000}}}}, and run a cluster for it: Q_CLUSTER_NAME={name} "
        "python manage.py qcluster. Or leave LISTDELIVERY['Q_CLUSTER'] empty to use your "
        f"cluster {main!r}.",
    )


@checks.register()
def check_site(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The host's own settings that listdelivery depends on: time zones, URLs, SQLite."""
    found: list[checks.CheckMessage] = []
    if not settings.USE_TZ:
        found.append(
            checks.Error(
                "listdelivery requires USE_TZ = True: its queue, retry times, deliver_after "
                "and the delivery dashboard work with time-zone-aware datetimes.",
                hint="Set USE_TZ = True (Django's default since 5.0); the TIME_ZONE setting "
                "still decides how times are shown.",
                id="listdelivery.E013",
            )
        )
    problem = _unsubscribe_links_problem()
    if problem:
        found.append(problem)
    found += sqlite_problems(settings.DATABASES)
    found += unsupported_databases(settings.DATABASES)
    return found


def unsupported_databases(databases: dict[str, Any]) -> list[checks.CheckMessage]:
    """MySQL cannot index the queue's 998-character Message-ID; Oracle is untested."""
    found = []
    for alias, database in databases.items():
        engine = str(database.get("ENGINE", ""))
        if any(name in engine for name in ("mysql", "oracle")):
            found.append(
                checks.Error(
                    f"The database {alias!r} ({engine}) is not one listdelivery supports.",
                    hint="Use PostgreSQL or SQLite: listdelivery's tables index a "
                    "998-character Message-ID column, which MySQL and MariaDB cannot index.",
                    id="listdelivery.E014",
                )
            )
    return found


def _unsubscribe_links_problem() -> checks.CheckMessage | None:
    base_url = conf.user_settings().get("UNSUBSCRIBE_BASE_URL")
    if not base_url or not isinstance(base_url, str):
        return None
    try:
        reverse("listdelivery:unsubscribe", args=["TOKEN"])
    except NoReverseMatch:
        return _warning(
            "LISTDELIVERY['UNSUBSCRIBE_BASE_URL'] is set but the site's URLs do not include "
            "listdelivery.urls: every one-click unsubscribe link in a personal copy would "
            "be a 404.",
            8,
            hint='Add path("lists/", include("listdelivery.urls")) to your ROOT_URLCONF (any '
            "prefix). If another site serves the links, add 'listdelivery.W008' to "
            "SILENCED_SYSTEM_CHECKS.",
        )
    return None


SQLITE_OPTIONS = {
    "transaction_mode": "IMMEDIATE",
    "timeout": 30,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}
SQLITE_MINIMUM_TIMEOUT = 20
SQLITE_DEFAULT_TIMEOUT = 5  # Python's sqlite3


def sqlite_problems(databases: dict[str, Any]) -> list[checks.CheckMessage]:
    """SQLite shared by several processes needs write locks taken early and waited for.

    With Django's default (DEFERRED) transactions a reader that turns writer fails at once
    with "database is locked" instead of waiting; with sqlite3's 5-second timeout a worker
    gives up while another commits a checkpoint. Only when django-q2 will run workers.
    """
    if not apps.is_installed("django_q"):
        return []
    from .models import OutgoingMessage

    aliases = [router.db_for_write(OutgoingMessage)]
    broker_alias = (getattr(settings, "Q_CLUSTER", None) or {}).get("orm")
    if broker_alias and broker_alias not in aliases:
        aliases.append(broker_alias)
    found = []
    for alias in aliases:
        database = databases.get(alias) or {}
        if not database.get("ENGINE", "").endswith("sqlite3"):
            continue
        options = database.get("OPTIONS") or {}
        missing, wanted = [], dict(options)
        if str(options.get("transaction_mode", "")).upper() != "IMMEDIATE":
            missing.append("IMMEDIATE transactions")
            wanted["transaction_mode"] = SQLITE_OPTIONS["transaction_mode"]
        timeout = options.get("timeout", SQLITE_DEFAULT_TIMEOUT)
        if not isinstance(timeout, (int, float)) or timeout < SQLITE_MINIMUM_TIMEOUT:
            missing.append(f"a lock timeout of {SQLITE_MINIMUM_TIMEOUT} seconds or more")
            wanted["timeout"] = SQLITE_OPTIONS["timeout"]
        if not missing:
            continue
        wanted.setdefault("init_command", SQLITE_OPTIONS["init_command"])
        found.append(
            _warning(
                f"DATABASES[{alias!r}] is SQLite without " + " and ".join(missing) + ": "
                "django-q2's workers, deliver_pending and the site write to it at once, and "
                "writers would fail with 'database is locked'.",
                9,
                hint=f"Set DATABASES[{alias!r}]['OPTIONS'] = {masked('OPTIONS', wanted)!r} "
                "(WAL lets readers run beside the writer).",
            )
        )
    return found


@checks.register(checks.Tags.database)
def check_sweep_schedule(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """The every-minute sweep exists, and does not flood the site's task history."""
    if not databases or not apps.is_installed("django_q"):
        return []
    from django_q.models import Schedule

    from .tasks import SWEEP_OPTIONS, TASK, schedule_table_exists

    found: list[checks.CheckMessage] = []
    for alias in databases:
        if not router.allow_migrate_model(alias, Schedule) or not schedule_table_exists(alias):
            continue
        schedules = list(Schedule.objects.using(alias).filter(func=TASK).exclude(repeats=0))
        if not schedules:
            found.append(
                _warning(
                    f"No django-q2 schedule runs {TASK}: retries, and posts whose task was "
                    "lost, wait until someone runs manage.py deliver_pending.",
                    5,
                    hint="Run python manage.py sweep_schedule, or add a schedule in the admin "
                    f"(Scheduled tasks): func {TASK}, schedule type Minutes, minutes 1, "
                    f"repeats -1, kwargs {{'q_options': {SWEEP_OPTIONS!r}}}.",
                )
            )
        if _history_kept():
            for schedule in schedules:
                if _q_options(schedule.kwargs).get("save", True) is not False:
                    found.append(
                        _warning(
                            f"The schedule {schedule.name or schedule.pk!r} stores every "
                            "successful sweep: one row a minute pushes the site's own task "
                            "history out of Q_CLUSTER['save_limit'].",
                            6,
                            hint=f"Set its kwargs to {{'q_options': {SWEEP_OPTIONS!r}}} in the "
                            "admin (Scheduled tasks): failures are still stored.",
                        )
                    )
    return found


def _history_kept() -> bool:
    cluster = getattr(settings, "Q_CLUSTER", None) or {}
    return cluster.get("save_limit", 250) >= 0 and not cluster.get("cached")


def _q_options(kwargs: str | None) -> dict[str, Any]:
    """The ``q_options`` of a schedule's kwargs, read the way django-q2's scheduler reads them."""
    try:
        parsed = ast.literal_eval(kwargs or "{}")
    except (SyntaxError, ValueError):
        try:
            call = ast.parse(f"f({kwargs})").body[0].value
            parsed = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError, AttributeError):
            return {}
    options = parsed.get("q_options") if isinstance(parsed, dict) else None
    return options if isinstance(options, dict) else {}
