"""django-q2's ``qinfo``, with secrets masked in ``--config``.

django-q2 prints every configuration value there, the ``SECRET_KEY`` and a
Redis URL's password included. listdelivery sits before ``django_q`` in
``INSTALLED_APPS``, so this command is the one ``manage.py qinfo`` runs.
"""

from __future__ import annotations

from typing import Any

from django_q.conf import Conf
from django_q.management.commands.qinfo import Command as QInfoCommand

from listdelivery.redact import masked

NOT_SETTINGS = {"IDLE", "STOPPING", "STARTING", "WORKING", "STOPPED", "SIGNAL_NAMES"}


def mask(name: str, value: Any) -> str:
    return str(masked(name, value))


class Command(QInfoCommand):
    def handle(self, *args: Any, **options: Any) -> None:
        if not options.get("config") or options.get("ids"):
            return super().handle(*args, **options)
        self.stdout.write("Configuration (secrets masked by listdelivery):")
        names = (a for a in dir(Conf) if a.isupper() and a not in NOT_SETTINGS)
        for name in sorted(names):
            value = getattr(Conf, name)
            if value is not None and not callable(value):
                self.stdout.write(f"{name}: {mask(name, value)}")
