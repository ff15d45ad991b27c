"""django-q2 tasks: thin shells around the runner, correct under any ``Q_CLUSTER``.

A post queued by ``to_outgoing`` gets a task as soon as its transaction
commits, so a cluster picks it up within a second or two; a Schedule sweeps
every minute for rows whose time has come (retries, lost tasks, expired
leases). The row, not the task, is the unit of work: a task that runs twice,
or that the broker hands out again, finds nothing left to claim, and a task
the broker loses only delays the post until the next sweep. So listdelivery
asks nothing of the host's ``Q_CLUSTER``; what it needs of django-q2 rides
on each task (:data:`TASK_OPTIONS`):

- ``ack_failure``: a failed task is acknowledged, never re-run by the broker
  (the post's row retries it), whatever ``max_attempts`` and ``ack_failures`` say;
- ``timeout``: a pass runs to its end even under a short host ``timeout``,
  because every pass stopped in the middle of a post repeats its last batch;
- ``cluster``: ``LISTDELIVERY["Q_CLUSTER"]`` routes the tasks to a cluster of
  ``Q_CLUSTER["ALT_CLUSTERS"]``;
- the sweep adds ``save: False``: its successes are not stored, so one a
  minute never pushes the host's own task history out of ``save_limit``
  (a failure is still stored and shown in django-q2's admin).

The sweep Schedule is created once, by the ``migrate`` that first creates
listdelivery's or django-q2's tables (and again after a ``flush``, which
empties the database). A later ``migrate`` never recreates one an
administrator deleted or renamed; the check ``listdelivery.W005`` says when
none is left, and ``manage.py sweep_schedule`` creates it again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from . import conf
from .redact import without_url_passwords
from .runner import OutgoingRunner

logger = logging.getLogger(__name__)

SWEEP_SCHEDULE = "listdelivery: deliver due posts"
TASK = "listdelivery.tasks.deliver_due"
# Long enough for a pass over a big post through a slow server; a pass that is
# stopped anyway resumes from its last checkpoint after its lease expires.
TASK_TIMEOUT = 30 * 60
TASK_OPTIONS: dict[str, Any] = {"ack_failure": True, "timeout": TASK_TIMEOUT}
SWEEP_OPTIONS: dict[str, Any] = {**TASK_OPTIONS, "save": False, "task_name": "deliver due posts"}
# The migrations that create the tables the sweep needs: ours, and the Schedule's.
FIRST_MIGRATIONS = {("listdelivery", "0001_initial"), ("django_q", "0001_initial")}


def deliver_due() -> dict[str, Any]:
    """Deliver every due post once; the summary is the task's result in django-q2's admin."""
    summary = OutgoingRunner().run()
    return asdict(summary)


def tasks_enabled() -> bool:
    return apps.is_installed("django_q") and conf.get("ENQUEUE_TASKS")


def cluster_name() -> str | None:
    """The django-q2 cluster our tasks go to; ``None``: the host's own."""
    return conf.get("Q_CLUSTER") or None


def enqueue_delivery(post_id: int | None = None, runners: int = 1) -> None:
    """Ask the cluster to deliver now; called once the post's row is committed.

    A post split into shards asks for as many runners as it has shards, up to
    the cluster's workers, so that they deliver it together.
    """
    if not tasks_enabled():
        return
    name = f"deliver post {post_id}" if post_id else "deliver due posts"
    try:
        from django_q.conf import Conf
        from django_q.tasks import async_task

        options = dict(TASK_OPTIONS)
        if Conf.SYNC:  # run here and now: a timeout would take over this process's SIGALRM
            del options["timeout"]
            runners = 1
        for _ in range(max(1, min(runners, Conf.WORKERS or 1))):
            async_task(
                TASK, task_name=name, group="listdelivery", cluster=cluster_name(), **options
            )
    except Exception as error:  # the broker is down or misconfigured: the sweep delivers it
        logger.warning(
            "Could not enqueue %r (%s: %s); the every-minute sweep will deliver it",
            name,
            type(error).__name__,
            without_url_passwords(str(error)),
        )


def schedule_table_exists(using: str = DEFAULT_DB_ALIAS) -> bool:
    if not apps.is_installed("django_q"):
        return False
    from django_q.models import Schedule

    return Schedule._meta.db_table in connections[using].introspection.table_names()


def create_sweep_schedule(using: str = DEFAULT_DB_ALIAS) -> Any:
    """The every-minute sweep, unless a schedule already runs :data:`TASK`; ``None`` then."""
    from django_q.models import Schedule

    if Schedule.objects.using(using).filter(func=TASK).exclude(repeats=0).exists():
        return None
    schedule = Schedule.objects.using(using).create(
        name=SWEEP_SCHEDULE,
        func=TASK,
        kwargs=repr({"q_options": SWEEP_OPTIONS}),
        schedule_type=Schedule.MINUTES,
        minutes=1,
        repeats=-1,
        next_run=timezone.now(),
        cluster=cluster_name(),
    )
    logger.info("Created the django-q2 schedule %r", SWEEP_SCHEDULE)
    return schedule


def create_sweep_schedule_once(
    using: str = DEFAULT_DB_ALIAS, plan: list | None = None, **kwargs: Any
) -> None:
    """A ``post_migrate`` receiver: the sweep, when the database gets its tables.

    ``plan`` lists the migrations this ``migrate`` applied; ``flush`` sends none
    (it emptied the database, as new). Any other ``migrate`` leaves the
    administrator's schedules alone.
    """
    if plan is not None and not any(
        (migration.app_label, migration.name) in FIRST_MIGRATIONS and not backwards
        for migration, backwards in plan
    ):
        return
    if schedule_table_exists(using):
        create_sweep_schedule(using)
