"""``manage.py sweep_schedule``: create the every-minute sweep again, if no schedule runs it."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS

from listdelivery.tasks import TASK, create_sweep_schedule, schedule_table_exists


class Command(BaseCommand):
    help = (
        f"Create the django-q2 schedule that runs {TASK} every minute, unless a schedule "
        "already runs it (migrate creates it only once, so a deleted one stays deleted)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS)

    def handle(self, *args: Any, database: str, verbosity: int, **options: Any) -> None:
        if not apps.is_installed("django_q"):
            raise CommandError("django_q is not in INSTALLED_APPS: there is no scheduler.")
        if not schedule_table_exists(database):
            raise CommandError("django-q2's tables do not exist yet: run manage.py migrate.")
        from django_q.models import Schedule

        created = create_sweep_schedule(database)
        if created is not None:
            message = f"Created the schedule {created.name!r}: {TASK} every minute."
        else:
            existing = Schedule.objects.using(database).filter(func=TASK).exclude(repeats=0)
            names = ", ".join(repr(s.name or s.pk) for s in existing)
            message = f"Nothing to do: a schedule already runs {TASK} ({names})."
        if verbosity >= 1:
            self.stdout.write(message)
