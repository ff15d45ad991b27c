"""Signed one-click unsubscribe tokens: made per copy at delivery, read by the view.

No database and no request: the delivery modules can make them without
reaching past their layer.
"""

from __future__ import annotations

import base64
import hmac
import time
from functools import lru_cache

from django.conf import settings
from django.core import signing
from django.utils.crypto import constant_time_compare, salted_hmac

from . import conf

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
    mac = _keyed(key).copy()
    mac.update(value.encode())
    return base64.urlsafe_b64encode(mac.digest()[:18]).decode()


@lru_cache(maxsize=4)
def _keyed(key: str) -> hmac.HMAC:
    """Django's ``salted_hmac`` keyed once per secret: deriving its key is half the cost."""
    return salted_hmac(SALT, b"", secret=key, algorithm="sha256")
