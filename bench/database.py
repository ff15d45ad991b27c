"""The benchmark's database: Django set up on it, checked to be the one asked for, emptied.

A scratch SQLite file in the run's temporary directory unless ``--database-url`` names
another (it must hold no listdelivery rows: every table is emptied between runs).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from bench import REPO_ROOT


def prepare_django(database_url: str, scratch: Path, *, migrate: bool) -> None:
    """Point Django at the benchmark's database, set it up, and send logs to a file."""
    if (REPO_ROOT / "project" / "settings.py").exists() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ["DATABASE_URL"] = database_url
    os.environ["DEBUG"] = "False"  # DEBUG keeps every query in memory: not a production figure
    os.environ["CACHE_DIR"] = str(scratch / "cache")
    import django

    django.setup()
    from django.conf import settings

    settings.DEBUG = False
    _check_database(database_url)
    # The project logs to the console (Mailman's smtp.log lines, one per post): keep the cost of
    # formatting and writing them, as in production, but send them to a file.
    handler = logging.FileHandler(scratch / "listdelivery.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("listdelivery").handlers = [handler]
    if migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)


def _check_database(database_url: str) -> None:
    """Refuse to run if the settings module ignored DATABASE_URL (never touch a real database)."""
    import environ
    from django.db import connection

    wanted = environ.Env.db_url_config(database_url)
    actual = connection.settings_dict
    if str(actual["NAME"]) != str(wanted["NAME"]) or actual["ENGINE"] != wanted["ENGINE"]:
        raise SystemExit(
            f"The settings module {os.environ['DJANGO_SETTINGS_MODULE']} does not take its "
            f"database from DATABASE_URL (it uses {actual['NAME']!r}); refusing to run."
        )


def database_label() -> str:
    from django.db import connection

    name = connection.settings_dict["NAME"]
    version = ""
    if connection.vendor == "sqlite":
        import sqlite3

        version = f" {sqlite3.sqlite_version}"
    return f"{connection.vendor}{version} ({name})"


def flush_tables() -> None:
    """Empty every listdelivery table (fast: no per-row cascade in Python).

    All of them in one flush: PostgreSQL truncates posts only together with the attempts
    that point at them, and each run starts with no hourly totals and no limits' state
    (tokens, learned rates, slots, quotas) left by the one before.
    """
    from django.apps import apps
    from django.core.management.color import no_style
    from django.db import connection

    models = apps.get_app_config("listdelivery").get_models()
    tables = [model._meta.db_table for model in models]
    statements = connection.ops.sql_flush(no_style(), tables, allow_cascade=False)
    connection.ops.execute_sql_flush(statements)


def ensure_empty_database() -> None:
    from listdelivery.models import MailingList, OutgoingMessage

    if MailingList.objects.exists() or OutgoingMessage.objects.exists():
        raise SystemExit(
            "The database given with --database-url holds mailing lists or posts; the benchmark "
            "deletes every listdelivery row between runs, so give it an empty scratch database."
        )
