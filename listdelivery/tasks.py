"""django-q2 tasks: thin shells around the runner.

A post queued by ``to_outgoing`` gets a task as soon as its transaction
commits, so a cluster picks it up within a second or two; a Schedule sweeps
every minute for rows whose time has come (retries, lost tasks, expired
leases). The row, not the task, is the unit of work: a task that runs twice
finds nothing left to claim, and a task the broker loses only delays the
post until the next sweep.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections

from . import conf
from .redact import without_url_passwords
from .runner import OutgoingRunner

logger = logging.getLogger(__name__)

SWEEP_SCHEDULE = "listdelivery: deliver due posts"
TASK = "listdelivery.tasks.deliver_due"


def deliver_due() -> dict[str, Any]:
    """Deliver every due post once; the summary is the task's result in django-q2's admin."""
    summary = OutgoingRunner().run()
    return asdict(summary)


def tasks_enabled() -> bool:
    return apps.is_installed("django_q") and conf.get("ENQUEUE_TASKS")


def enqueue_delivery(post_id: int | None = None) -> None:
    """Ask the cluster to deliver now; called once the post's row is committed."""
    if not tasks_enabled():
        return
    name = f"deliver post {post_id}" if post_id else "deliver due posts"
    try:
        from django_q.tasks import async_task

        async_task(TASK, task_name=name, group="listdelivery")
    except Exception as error:  # the broker is down or misconfigured: the sweep delivers it
        logger.warning(
            "Could not enqueue %r (%s: %s); the every-minute sweep will deliver it",
            name,
            type(error).__name__,
            without_url_passwords(str(error)),
        )


def ensure_sweep_schedule(using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    """Create the every-minute sweep once (a ``post_migrate`` receiver; admins may edit it)."""
    if not apps.is_installed("django_q"):
        return
    from django_q.models import Schedule

    if Schedule._meta.db_table not in connections[using].introspection.table_names():
        return
    _, created = Schedule.objects.using(using).get_or_create(
        name=SWEEP_SCHEDULE,
        defaults={
            "func": TASK,
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
        },
    )
    if created:
        logger.info("Created the django-q2 schedule %r", SWEEP_SCHEDULE)
