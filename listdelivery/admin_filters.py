"""Change-list filters the health banner links to: overdue, stalled, server trouble, disabled today.

Each takes its choices from code, never from a query over the table, so a
change list stays a handful of queries however many rows it has.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import health, rules


class HealthFilter(admin.SimpleListFilter):
    """Posts that need looking at, as the health banner counts them."""

    title = _("health")
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("due", _("Due now, no runner on it")),
            ("overdue", _("Overdue: due and not picked up")),
            ("stalled", _("Stalled: its runner stopped")),
            ("needs_admin", _("Held until an administrator acts")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        now = timezone.now()
        if self.value() == "due":
            return queryset.filter(health.due_q(now))
        if self.value() == "overdue":
            _, interval, _next_run, _catch_up = health.sweep_state(now)
            return queryset.filter(health.overdue_q(now, interval))
        if self.value() == "stalled":
            return queryset.filter(health.stalled_q(now))
        if self.value() == "needs_admin":
            return queryset.filter(health.needs_admin_q())
        return None


class ProblemFilter(admin.SimpleListFilter):
    """Posts held or delayed by one kind of server trouble (``rules.PROBLEMS``)."""

    title = _("server trouble")
    parameter_name = "problem"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(kind, kind) for kind in rules.PROBLEMS]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        kind = self.value()
        if kind not in rules.PROBLEMS:
            return None
        troubled = queryset.filter(health.troubled_q())
        if kind == "server":  # a hold from before problems had kinds is the server's
            return troubled.filter(problem__in=("server", ""))
        return troubled.filter(problem=kind)


class DisabledFilter(admin.SimpleListFilter):
    """Members whose delivery was disabled today or lately (in the site's time zone)."""

    title = _("delivery disabled")
    parameter_name = "disabled"
    DAYS = {"today": 0, "7days": 6, "30days": 29}

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("today", _("Today")),
            ("7days", _("In the past 7 days")),
            ("30days", _("In the past 30 days")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        days = self.DAYS.get(self.value() or "")
        if days is None:
            return None
        since = health.start_of_today(timezone.now()) - timedelta(days=days)
        return queryset.filter(disabled_at__gte=since)
