"""Individual delivery: one copy per recipient, VERP'd, personalized and decorated as the post asks.

With the setting ``XVERP``, a VERP'd post whose copy is the same for everyone (a list
without personalization, no member data in its header or footer, no one-click link) goes
in bulk chunks sent with ``XVERP=+=``, and the server (Postfix) writes each recipient's
VERP'd sender: the same address :func:`verp.encode` writes, so bounces decode back to the
member as before.
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

#: A member and a non-member, whose copies show whether a post's copies differ at all.
_PROBES = (
    Recipient("probe@example.invalid", "Probe", member_id=0),
    Recipient("probe@example.invalid"),
)


def written_by_xverp(verp_format: str) -> bool:
    """Whether ``verp_format`` writes what Postfix's ``XVERP=+=`` writes: ``bounces+local=domain``."""
    written = verp.encode("bounces@lists.example", "local@example.org", verp_format)
    return written == "bounces+local=example.org@lists.example"


def one_copy_for_all(post: Post) -> bool:
    """Whether every recipient's copy of ``post`` is its bulk copy.

    A copy differs only where the prepared post has a slot for member data (a footer
    with ``$user_address``, a one-click link, a rewritten To:); without one, a probe's
    copy is the bulk copy, and so is everyone's.
    """
    if post.personalize != "none":
        return False
    if post.decoration is None:
        return True
    return all(post.personal_template.render(p) == post.bulk_message for p in _PROBES)


class IndividualDelivery(BaseDelivery):
    #: Whether the post being delivered may go with XVERP; decided in :meth:`deliver`.
    _xverp = False
    #: The last post asked about and the answer: asked once per post, not once per batch.
    _decided: tuple[Post, bool] | None = None

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
        """The setting allows it, the post is VERP'd, its copy is the same for everyone,
        VERP_FORMAT is XVERP's, and the server offers XVERP (asked last: it may open a session)."""
        if not (self.config["XVERP"] and post.verp):
            return False
        if self._decided is None or self._decided[0] is not post:
            self._decided = (
                post,
                written_by_xverp(self.config["VERP_FORMAT"])
                and one_copy_for_all(post)
                and self.pool.offers("xverp", post.relays),
            )
        return self._decided[1]

    def batch_size_for(self, post: Post) -> int | None:
        """Recipients between two checkpoints of ``post``: ``CHECKPOINT_EVERY`` transactions,
        which with XVERP are chunks of ``MAX_RECIPIENTS``, as in bulk delivery."""
        if not self.may_use_xverp(post):
            return self.batch_size
        per_transaction = self.config["MAX_RECIPIENTS"]
        if per_transaction <= 0:
            return None
        return self.config["CHECKPOINT_EVERY"] * per_transaction

    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        verp_format = self.config["VERP_FORMAT"]
        personal = post.personalize != "none" or post.decoration is not None
        together = []
        for recipient in recipients:
            sender = post.sender
            if post.verp:
                sender = verp.encode(post.sender, recipient.address, verp_format)
            # An address VERP can encode; one not ASCII goes alone, as in bulk delivery.
            if self._xverp and sender != post.sender and recipient.address.isascii():
                together.append(recipient.address)
                continue
            message = post.personal_template.render(recipient) if personal else post.wire_message
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
