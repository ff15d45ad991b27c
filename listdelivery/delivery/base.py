"""The base of every delivery module.

A delivery module turns one post and a batch of recipients into SMTP
transactions and hands them to the SMTP layer. It never touches the database
(the runner gives it everything it needs in :class:`Post`) and never opens a
socket (the :class:`~listdelivery.smtp.SMTPPool` does).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..decorate import Decoration
from ..personalize import PersonalTemplate
from ..rules import resend_now
from ..smtp import Outcome, SMTPPool, Transaction

#: Rounds of transactions sent again at once (too many recipients, a hang-up after progress).
FOLLOW_UP_ROUNDS = 5


@dataclass(frozen=True)
class Recipient:
    address: str
    display_name: str = ""
    member_id: int | None = None


@dataclass(frozen=True)
class Post:
    """One post as the delivery modules see it: the runner builds it once per attempt."""

    message: bytes
    sender: str
    message_id: str = ""
    verp: bool = False
    personalize: str = "none"
    list_address: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    decoration: Decoration | None = None
    relays: tuple[str, ...] = ()  # the relays this post may go through (empty: all)

    @cached_property
    def wire_message(self) -> bytes:
        """The post with CRLF line endings, as SMTP requires; made once per post."""
        return _BARE_LF.sub(b"\r\n", self.message)

    @cached_property
    def bulk_message(self) -> bytes:
        """The one copy of a bulk post: decorated once, without member data."""
        if self.decoration is None:
            return self.wire_message
        return self.decoration.apply(self.wire_message, personal=False)

    @cached_property
    def personal_template(self) -> PersonalTemplate:
        """Prepared once per post; each recipient's copy is spliced from it."""
        return PersonalTemplate(
            self.wire_message, self.decoration, rewrite_to=self.personalize == "full"
        )


_BARE_LF = re.compile(rb"(?<!\r)\n")


class BaseDelivery:
    """Subclasses say how recipients group into transactions; the base sends them."""

    def __init__(self, pool: SMTPPool, config: dict[str, Any]) -> None:
        self.pool = pool
        self.config = config

    @property
    def batch_size(self) -> int | None:
        """How many recipients the runner hands over between two checkpoints (``None``: all)."""
        return self.config["CHECKPOINT_EVERY"]

    def batch_size_for(self, post: Post) -> int | None:
        """:attr:`batch_size` for this post (a module may send some posts in bigger transactions)."""
        return self.batch_size

    def deliver(
        self,
        post: Post,
        recipients: Sequence[Recipient],
        stop: threading.Event | None = None,
    ) -> list[Outcome]:
        """Send the post to ``recipients``; stop taking new transactions once ``stop`` is set.

        Some replies ask for another transaction at once rather than a retry
        later (see :meth:`follow_ups`): those are sent straight away, and the
        outcomes returned say, for each recipient, the last thing the server said.
        """
        outcomes = self.pool.send_all(
            self.transactions(post, recipients), stop=stop, relays=post.relays
        )
        final: list[Outcome] = []
        for round_number in range(FOLLOW_UP_ROUNDS + 1):
            again: list[Transaction] = []
            for outcome in outcomes:
                extra = self.follow_ups(post, outcome) if round_number < FOLLOW_UP_ROUNDS else []
                if extra:
                    outcome = _without(outcome, {r for t in extra for r in t.recipients})
                if outcome is not None:
                    final.append(outcome)
                again += extra
            if not again or (stop is not None and stop.is_set()):
                break  # recipients of transactions not sent stay open
            outcomes = self.pool.send_all(again, stop=stop, relays=post.relays)
        return final

    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        raise NotImplementedError

    def follow_ups(self, post: Post, outcome: Outcome) -> list[Transaction]:
        """Transactions to send at once for some recipients of ``outcome``.

        By default those the server refused as "too many recipients", in
        transactions no larger than it accepted, and those it never answered
        before hanging up after some final answers.
        """
        again = resend_now(outcome)
        if not again:
            return []
        sent = outcome.transaction
        size = len(sent.recipients) - len(outcome.refused) if not outcome.failure else 0
        size = size or len(again)
        return [
            Transaction(sent.sender, again[start : start + size], sent.message)
            for start in range(0, len(again), size)
        ]


def _without(outcome: Outcome, resent: Iterable[str]) -> Outcome | None:
    """``outcome`` without the recipients sent again; ``None`` if none is left."""
    resent = set(resent)
    sent = outcome.transaction
    recipients = [r for r in sent.recipients if r not in resent]
    if not recipients:
        return None
    refused = {a: reply for a, reply in outcome.refused.items() if a not in resent}
    failure = outcome.failure
    if failure is not None and all(r in refused for r in recipients):
        failure = None  # everyone left has a final answer; the failure is the resent ones'
    return Outcome(Transaction(sent.sender, recipients, sent.message), refused, failure)
