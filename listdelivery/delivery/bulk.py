"""Bulk delivery: one copy of the post, recipients grouped into chunks by domain."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ..smtp import Transaction
from .base import BaseDelivery, Post, Recipient

#: Mailman's buckets: addresses whose top-level domain maps to the same number share chunks.
CHUNKMAP = {"com": 1, "net": 2, "org": 2, "edu": 3, "us": 3, "ca": 3}


def chunkify(addresses: Iterable[str], max_recipients: int) -> list[list[str]]:
    """Mailman's chunking rule (``mta/bulk.py``), made deterministic.

    Duplicates are dropped; addresses are bucketed by top-level domain; buckets
    are taken largest first; chunks never mix buckets and hold at most
    ``max_recipients`` (``0`` or less: one chunk for everyone). Each chunk is
    sorted, as Mailman sorts RCPT TO.
    """
    unique = list(dict.fromkeys(addresses))
    if max_recipients <= 0:
        return [sorted(unique)] if unique else []
    buckets: dict[int, list[str]] = {}
    for address in unique:
        tld = address.partition("@")[2].split(".")[-1]
        buckets.setdefault(CHUNKMAP.get(tld, 0), []).append(address)
    chunks = []
    for bucket in sorted(buckets.values(), key=len, reverse=True):
        bucket.sort()
        chunks.extend(bucket[i : i + max_recipients] for i in range(0, len(bucket), max_recipients))
    return chunks


class BulkDelivery(BaseDelivery):
    @property
    def batch_size(self) -> int | None:
        per_transaction = self.config["MAX_RECIPIENTS"]
        if per_transaction <= 0:
            return None
        return self.config["CHECKPOINT_EVERY"] * per_transaction

    def transactions(self, post: Post, recipients: Sequence[Recipient]) -> Iterator[Transaction]:
        ascii_only, international = [], []
        for recipient in recipients:
            (ascii_only if recipient.address.isascii() else international).append(recipient.address)
        for chunk in chunkify(ascii_only, self.config["MAX_RECIPIENTS"]):
            yield Transaction(post.sender, chunk, post.bulk_message)
        # Alone, so that a server without SMTPUTF8 refuses only them, never a whole chunk.
        for address in sorted(set(international)):
            yield Transaction(post.sender, [address], post.bulk_message)
