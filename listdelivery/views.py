"""The health endpoint: 200 when delivery is healthy, 503 when not, for a load balancer or a monitor.

Open without login, so it says only counts, times and the cluster's state:
nothing that names a host, a list, a member or a server reply, and no setting.
A staff user who may see the dashboard gets the rest (the runner's name, the
problems with their remedy and an example error with the SMTP password masked,
the admin links).
"""

from __future__ import annotations

import logging

from django.contrib.auth.decorators import login_not_required
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from . import dashboard, health

logger = logging.getLogger(__name__)


@login_not_required  # a load balancer has no session, even under LoginRequiredMiddleware
@never_cache
@require_safe
def health_check(request: HttpRequest) -> JsonResponse:
    try:
        facts = health.report()
    except DatabaseError as error:  # the database is what delivery runs on: not healthy
        logger.error("Health check could not read the database: %s", type(error).__name__)
        return JsonResponse({"ok": False, "reasons": ["database"]}, status=503)
    user = request.user if hasattr(request, "user") else None
    detail = bool(user and user.is_active and user.is_staff and dashboard.can_view(user))
    if detail:
        facts = facts.for_user(user)
    return JsonResponse(facts.as_dict(detail=detail), status=200 if facts.ok else 503)
