"""The base of every delivery module.

A delivery module turns one post and a batch of recipients into SMTP
transactions and hands them to the SMTP layer. It never touches the database
(the runner gives it everything it needs in :class:`Post`) and never opens a
socket (the :class:`~listdelivery.smtp.SMTPPool` does).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..decorate import Decoration
from ..personalize import PersonalTemplate
from ..smtp import Outcome, SMTPPool, Transaction


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

    def deliver(self, post: Post, recipients: Sequence[Recipient]) -> list[Outcome]:
        return self.pool.send_all(self.transactions(post, recipients))

    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        raise NotImplementedError
