"""Individual delivery: one copy per recipient, VERP'd, personalized and decorated as the post asks.

With the setting ``XVERP``, recipients whose copy is the same for everyone (a VERP'd post
of a list without personalization) go in bulk chunks sent with ``XVERP=+=``, and the
server (Postfix) writes each one's VERP'd sender: the same address :func:`verp.encode`
writes, so bounces decode back to the member as before.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence

from .. import verp
from ..rules import is_permanent
from ..smtp import Outcome, Transaction
from .base import BaseDelivery, Post, Recipient
from .bulk import chunkify


def written_by_xverp(verp_format: str) -> bool:
    """Whether ``verp_format`` writes what Postfix's ``XVERP=+=`` writes: ``bounces+local=domain``."""
    written = verp.encode("bounces@lists.example", "local@example.org", verp_format)
    return written == "bounces+local=example.org@lists.example"


class IndividualDelivery(BaseDelivery):
    #: Whether the post being delivered may go with XVERP; decided in :meth:`deliver`.
    _xverp = False

    def deliver(
        self,
        post: Post,
        recipients: Sequence[Recipient],
        stop: threading.Event | None = None,
    ) -> list[Outcome]:
        # Decided here, before sending: the pool's threads pull transactions() while they send.
        self._xverp = self.may_use_xverp(post)
        return super().deliver(post, recipients, stop)

    def may_use_xverp(self, post: Post) -> bool:
        """The setting allows it, the post is VERP'd and not personalized, VERP_FORMAT is
        XVERP's, and the server offers XVERP (asked last: it may open a session)."""
        return (
            self.config["XVERP"]
            and post.verp
            and post.personalize == "none"
            and written_by_xverp(self.config["VERP_FORMAT"])
            and self.pool.offers("xverp", post.relays)
        )

    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        verp_format = self.config["VERP_FORMAT"]
        personal = post.personalize != "none" or post.decoration is not None
        together = []
        for recipient in recipients:
            sender = post.sender
            if post.verp:
                sender = verp.encode(post.sender, recipient.address, verp_format)
            message = post.personal_template.render(recipient) if personal else post.wire_message
            # Only a copy that is the bulk copy (a footer without member data, no one-click
            # link) and an address VERP can encode; one not ASCII stays alone, as in bulk.
            if (
                self._xverp
                and sender != post.sender
                and recipient.address.isascii()
                and message == post.bulk_message
            ):
                together.append(recipient.address)
                continue
            yield Transaction(sender, [recipient.address], message)
        for chunk in chunkify(together, self.config["MAX_RECIPIENTS"]):
            yield Transaction(post.sender, chunk, post.bulk_message, xverp=True)

    def follow_ups(self, post: Post, outcome: Outcome) -> list[Transaction]:
        """A VERP'd sender the server refuses (a local part too long, say) is that copy's
        problem: send the copy again from the list's plain bounces address.

        A chunk the server would not take with XVERP (no longer offered, or refused
        for good at MAIL) goes again as one VERP'd copy per recipient.
        """
        failure, sent = outcome.failure, outcome.transaction
        if sent.xverp:
            if failure is not None and (
                failure.stage == "xverp" or (failure.stage == "mail" and is_permanent(failure.code))
            ):
                verp_format = self.config["VERP_FORMAT"]
                return [
                    Transaction(verp.encode(post.sender, r, verp_format), [r], sent.message)
                    for r in sent.recipients
                ]
            again = super().follow_ups(post, outcome)
            return [dataclasses.replace(t, xverp=True) for t in again]
        if (
            failure is not None
            and failure.stage == "mail"
            and is_permanent(failure.code)
            and sent.sender != post.sender
        ):
            return [Transaction(post.sender, sent.recipients, sent.message)]
        return super().follow_ups(post, outcome)
