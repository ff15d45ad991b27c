"""Individual delivery: one copy per recipient, VERP'd and personalized as the post asks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .. import verp
from ..personalize import MessageTemplate
from ..smtp import Transaction
from .base import BaseDelivery, Post, Recipient


class IndividualDelivery(BaseDelivery):
    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        verp_format = self.config["VERP_FORMAT"]
        template = MessageTemplate(post.wire_message) if post.personalize == "full" else None
        for recipient in recipients:
            sender = (
                verp.encode(post.sender, recipient.address, verp_format)
                if post.verp
                else post.sender
            )
            message = template.addressed_to(recipient) if template else post.wire_message
            yield Transaction(sender, [recipient.address], message)
