"""``LISTDELIVERY`` from ``LISTDELIVERY_<KEY>`` environment variables, for a site's settings file.

```python
from listdelivery.environment import listdelivery_from_environment

LISTDELIVERY = listdelivery_from_environment(defaults={"SMTP_HOST": "mail.example.org"})
```

Every listdelivery setting can come from a variable named after it; each value is converted
to its setting's type (whole numbers, yes/no, durations such as ``5d``, ``15m`` or ``30s``,
text), and one that cannot be converted stops start-up with an error naming the variable:
``LISTDELIVERY_MAX_RECIPIENTS='ten' is not a whole number``. A variable with the prefix that
names no setting is passed on as text, so that the system check ``listdelivery.W001`` points
out the typo.

Variables are read through django-environ: ``environ.Env.read_env()`` in the settings file
fills them from a ``.env`` file, and an ``environ.FileAwareEnv()`` passed as ``env`` reads
``LISTDELIVERY_SMTP_PASSWORD_FILE`` (a secret mounted as a file). Values are taken literally:
django-environ's ``$OTHER_VARIABLE`` references are not expanded, because ``VERP_FORMAT``
starts with ``$`` and a password may.

Importing this module touches no model and no app: only the parsers of ``listdelivery.conf``,
which work before Django's settings are configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured
from environ.fileaware_mapping import FileAwareMapping

from .conf import DEFAULTS, SECRET_KEYS, normalize

__all__ = ["SettingsFromEnvironment", "listdelivery_from_environment"]


class SettingsFromEnvironment(dict):
    """The ``LISTDELIVERY`` dict, with the keys whose values came from the environment.

    The admin's delivery dashboard reads ``from_environment`` for its "comes from" column.
    """

    from_environment: frozenset[str] = frozenset()


def listdelivery_from_environment(
    defaults: Mapping[str, Any] | None = None,
    prefix: str = "LISTDELIVERY_",
    env: environ.Env | Mapping[str, str] | None = None,
) -> SettingsFromEnvironment:
    """``defaults`` with every ``<prefix><KEY>`` variable over it, converted to the key's type.

    ``env`` is where the variables are read: a django-environ ``Env`` (by default
    ``environ.Env()``, that is ``os.environ``) or any mapping of names to text.
    """
    variables = _variables(env)
    settings = SettingsFromEnvironment(defaults or {})
    found = []
    for name in _names(variables, prefix):
        key = name[len(prefix) :]
        raw = variables[name]
        if isinstance(variables, FileAwareMapping):
            raw = raw.removesuffix("\n")  # a secret file written by echo ends in a newline
        settings[key] = _converted(name, key, raw)
        found.append(key)
    settings.from_environment = frozenset(found)
    return settings


def _variables(env: environ.Env | Mapping[str, str] | None) -> Mapping[str, str]:
    if env is None:
        env = environ.Env()
    if isinstance(env, environ.Env):
        return env.ENVIRON
    return env


def _names(variables: Mapping[str, str], prefix: str) -> list[str]:
    """The variables to read: one per setting, and any other with the prefix (a typo)."""
    names = [prefix + key for key in DEFAULTS if prefix + key in variables]
    if prefix:
        files = isinstance(variables, FileAwareMapping)
        names += sorted(
            name
            for name in list(variables)
            if name.startswith(prefix)
            and name[len(prefix) :] not in DEFAULTS
            and not (files and name.endswith("_FILE") and name[len(prefix) : -5] in DEFAULTS)
        )
    return names


def _converted(name: str, key: str, raw: str) -> Any:
    if key not in DEFAULTS:
        return raw
    try:
        return normalize(key, raw)
    except ValueError as error:
        reason = getattr(error, "reason", str(error))
        if key in SECRET_KEYS:
            raise ImproperlyConfigured(f"{name} {reason}") from None
        raise ImproperlyConfigured(f"{name}={raw!r} {reason}") from None
