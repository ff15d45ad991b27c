"""Secrets out of what people read: configuration dumps, log lines, stored errors."""

from __future__ import annotations

import re
from typing import Any

SECRET_NAMES = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)
# Greedy up to the last "@" of the URL: a password may contain "@" itself.
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*:)\S+@", re.IGNORECASE)
MASK = "********"


def masked(name: Any, value: Any) -> Any:
    """``value`` with secrets masked, looking into dicts and lists (a broker's options)."""
    if SECRET_NAMES.search(str(name)) and value:
        return MASK
    if isinstance(value, dict):
        return {key: masked(key, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked("", item) for item in value)
    if isinstance(value, str):
        return without_url_passwords(value)
    return value


def without_url_passwords(text: str) -> str:
    return URL_PASSWORD.sub(rf"\g<scheme>{MASK}@", text)


def without(secret: str, text: str) -> str:
    """``text`` with every occurrence of ``secret`` masked."""
    return text.replace(secret, MASK) if secret else text
