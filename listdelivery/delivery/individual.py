"""Individual delivery: one copy per recipient, VERP'd, personalized and decorated as the post asks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .. import verp
from ..smtp import Transaction
from .base import BaseDelivery, Post, Recipient


class IndividualDelivery(BaseDelivery):
    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        verp_format = self.config["VERP_FORMAT"]
        personal = post.personalize != "none" or post.decoration is not None
        for recipient in recipients:
            sender = post.sender
            if post.verp:
                sender = verp.encode(post.sender, recipient.address, verp_format)
            message = post.personal_template.render(recipient) if personal else post.wire_message
            yield Transaction(sender, [recipient.address], message)
