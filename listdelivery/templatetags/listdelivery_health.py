"""``{% load listdelivery_health %}{% delivery_health as health %}``: the health facts for a template.

``health`` is ``None`` for a user who may not see delivery (no view or change
permission on lists or posts), so the banner costs them no query; otherwise a
:class:`listdelivery.health.Health` whose links are only those the user may open.
Then ``{% include "listdelivery/admin/health_banner.html" %}`` shows it.
"""

from __future__ import annotations

from typing import Any

from django import template
from django.utils.html import conditional_escape, format_html

from listdelivery import dashboard, health

register = template.Library()


@register.simple_tag(takes_context=True)
def delivery_health(context: template.Context) -> health.Health | None:
    request = context.get("request")
    user: Any = getattr(request, "user", None) or context.get("user")
    if user is None or not dashboard.can_view(user):
        return None
    return health.report().for_user(user)


@register.filter
def linked(value: Any, url: str) -> str:
    """``{{ count|linked:url }}``: the value as a link to ``url``, or as it is without one."""
    if not url:
        return conditional_escape(value)
    return format_html('<a href="{}">{}</a>', url, value)
