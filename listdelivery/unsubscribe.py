"""RFC 8058 one-click unsubscribe: a signed token per member, and the view that honours it.

The token carries the list and the member, is signed with the site's
``SECRET_KEY`` (Django's ``salted_hmac``) and expires after
``UNSUBSCRIBE_TOKEN_MAX_AGE``. A POST with a good token disables the
member's delivery (by the member), with no login and no CSRF token, as RFC
8058 requires; a replayed token changes nothing and still answers 200. A GET
(a person clicking the link) shows a button that makes the same POST.
"""

from __future__ import annotations

import base64
import time

from django.conf import settings
from django.core import signing
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.crypto import constant_time_compare, salted_hmac
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from . import conf
from .models import DeliveryStatus, Member

SALT = "listdelivery.unsubscribe"


def make_token(list_pk: int, member_pk: int, issued: int | None = None) -> str:
    """``list.member.time.mac``: short, URL-safe, and cheap enough to make for every copy.

    The MAC is Django's ``salted_hmac`` (SHA-256, keyed by ``SECRET_KEY``) over the rest.
    """
    issued = int(time.time()) if issued is None else issued
    value = ".".join(signing.b62_encode(n) for n in (list_pk, member_pk, issued))
    return f"{value}.{_mac(value, settings.SECRET_KEY)}"


def read_token(token: str) -> tuple[int, int]:
    """``(list pk, member pk)``; raises ``signing.BadSignature`` (or its ``SignatureExpired``)."""
    value, _, mac = token.rpartition(".")
    keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    if not value or not any(constant_time_compare(mac, _mac(value, key)) for key in keys):
        raise signing.BadSignature("the unsubscribe token's signature does not match")
    try:
        list_pk, member_pk, issued = (signing.b62_decode(part) for part in value.split("."))
    except ValueError:
        raise signing.BadSignature("the unsubscribe token is malformed") from None
    if time.time() - issued > conf.get("UNSUBSCRIBE_TOKEN_MAX_AGE").total_seconds():
        raise signing.SignatureExpired("the unsubscribe token has expired")
    return list_pk, member_pk


def _mac(value: str, key: str) -> str:
    digest = salted_hmac(SALT, value, secret=key, algorithm="sha256").digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


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
    Member.objects.filter(pk=member.pk, delivery_status=DeliveryStatus.ENABLED).update(
        delivery_status=DeliveryStatus.BY_USER
    )
    return _page(request, "done", member=member)


def _page(
    request: HttpRequest, state: str, status: int = 200, member: Member | None = None
) -> HttpResponse:
    return render(
        request, "listdelivery/unsubscribe.html", {"state": state, "member": member}, status=status
    )
