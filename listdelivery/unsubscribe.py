"""RFC 8058 one-click unsubscribe: the view that honours a member's signed token.

The token carries the list and the member, is signed with the site's
``SECRET_KEY`` (Django's ``salted_hmac``) and expires after
``UNSUBSCRIBE_TOKEN_MAX_AGE``. A POST with a good token disables the
member's delivery (by the member), with no login and no CSRF token, as RFC
8058 requires; a replayed token changes nothing and still answers 200. A GET
(a person clicking the link) shows a button that makes the same POST.
"""

from __future__ import annotations

from django.core import signing
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from . import signals
from .models import DeliveryStatus, Member
from .tokens import read_token


@csrf_exempt
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    try:
        list_pk, member_pk = read_token(token)
    except signing.SignatureExpired:
        return _page(request, "expired", status=400)
    except (signing.BadSignature, ValueError, TypeError):
        return _page(request, "invalid", status=400)
    member = (
        Member.objects.select_related("mailing_list")
        .filter(pk=member_pk, mailing_list_id=list_pk)
        .first()
    )
    if member is None:
        return _page(request, "gone", status=404)
    if request.method == "GET":
        return _page(request, "confirm", member=member)
    changed = Member.objects.filter(pk=member.pk, delivery_status=DeliveryStatus.ENABLED).update(
        delivery_status=DeliveryStatus.BY_USER, disabled_at=timezone.now()
    )
    if changed:
        member.delivery_status = DeliveryStatus.BY_USER
        signals.send_on_commit(
            signals.member_unsubscribed,
            Member,
            member=member,
            mailing_list=member.mailing_list,
            how="one-click",
        )
    return _page(request, "done", member=member)


def _page(
    request: HttpRequest, state: str, status: int = 200, member: Member | None = None
) -> HttpResponse:
    return render(
        request, "listdelivery/unsubscribe.html", {"state": state, "member": member}, status=status
    )
