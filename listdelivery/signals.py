"""Signals a host site connects to, to keep its own tables in step with delivery.

Each is sent once the change it reports is committed, with ``send_robust``: a
receiver that raises is logged and never disturbs delivery. Every signal
passes keyword arguments only.

``member_unsubscribed``
    sender ``Member``; ``member``, ``mailing_list``, ``how`` (``"one-click"``).
``member_disabled_by_bounces``
    sender ``Member``; ``member``, ``mailing_list``, ``bounce_score`` (the score
    that reached the threshold).
``post_delivered``
    sender ``OutgoingMessage``; ``post``, ``mailing_list`` (``None`` if deleted).
``post_failed``
    sender ``OutgoingMessage``; ``post``, ``mailing_list``, ``reason``.
``post_discarded``
    sender ``OutgoingMessage``; ``post``, ``mailing_list``, ``reason``
    (``"discarded by <user>"`` for the admin action).
``post_held``
    sender ``OutgoingMessage``; ``post``, ``mailing_list``, ``reason``, and
    ``needs_admin``: ``True`` when it waits for an administrator's **Retry
    now**, ``False`` when it is retried by itself.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.dispatch import Signal

logger = logging.getLogger(__name__)

member_unsubscribed = Signal()
member_disabled_by_bounces = Signal()
post_delivered = Signal()
post_failed = Signal()
post_discarded = Signal()
post_held = Signal()


def send_on_commit(signal: Signal, sender: type, **arguments: Any) -> None:
    """Send ``signal`` when the current transaction commits (at once outside one)."""
    if not signal.has_listeners(sender):
        return

    def send() -> None:
        for receiver, result in signal.send_robust(sender, **arguments):
            if isinstance(result, Exception):
                logger.error(
                    "A receiver of a listdelivery signal failed: %r raised %s: %s",
                    receiver,
                    type(result).__name__,
                    result,
                )

    transaction.on_commit(send)
