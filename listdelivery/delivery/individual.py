"""Individual delivery: one copy per recipient, VERP'd, personalized and decorated as the post asks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .. import verp
from ..rules import is_permanent
from ..smtp import Outcome, Transaction
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

    def follow_ups(self, post: Post, outcome: Outcome) -> list[Transaction]:
        """A VERP'd sender the server refuses (a local part too long, say) is that copy's
        problem: send the copy again from the list's plain bounces address."""
        failure, sent = outcome.failure, outcome.transaction
        if (
            failure is not None
            and failure.stage == "mail"
            and is_permanent(failure.code)
            and sent.sender != post.sender
        ):
            return [Transaction(post.sender, sent.recipients, sent.message)]
        return super().follow_ups(post, outcome)
