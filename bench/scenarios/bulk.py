"""Bulk: the personalized scenario's post to a list without personalization, in chunks of
``MAX_RECIPIENTS`` 10 and 500, on one connection and on the most of ``--connections``.

Target: at least 0.8 times the baseline's SMTP transactions a second (recipients a second
are printed beside it: a transaction carries up to ``MAX_RECIPIENTS`` of them).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from bench.context import Bench
from bench.database import flush_tables
from bench.deliver import deliver_one_post
from bench.lists import BULK_LIST, create_list, member_address
from bench.report import Row, met
from bench.rounds import Timed
from bench.timing import Sample

TARGET = 0.8
CHUNKS = (10, 500)


def timed(bench: Bench) -> list[Timed]:
    n = bench.options.members
    return [
        Timed(
            f"bulk, max_rcpt {chunk}, {c} conn",
            n,
            lambda chunk=chunk, c=c: once_with(bench, n, chunk, c),
            {"max_recipients": chunk, "connections": c},
            judge=judge,
        )
        for chunk in CHUNKS
        for c in sorted({1, max(bench.options.connections)})
    ]


def judge(row: Row) -> None:
    row.note = "msgs/s = SMTP transactions/s; the target is on transactions"
    row.target = f">={TARGET}x txn/s"
    recipients = row.ratio * row.recipients / row.messages if row.ratio is not None else None
    row.met = met(row.ratio, TARGET) + (
        f" (rcpts/s {recipients:.2f}x)" if recipients is not None else ""
    )


def once_with(bench: Bench, n: int, max_recipients: int, connections: int) -> Sample:
    from listdelivery.models import Personalization

    flush_tables()
    mlist = create_list(BULK_LIST, Personalization.NONE, n)
    config = bench.config(SMTP_CONNECTIONS=connections, MAX_RECIPIENTS=max_recipients)
    transactions = expected_transactions(n, max_recipients, shard_size(config))
    what = f"bulk, {n} members, MAX_RECIPIENTS {max_recipients}, {connections} connections"
    return deliver_one_post(bench, mlist, config, transactions, n, what)


def shard_size(config: dict[str, Any]) -> int:
    """The recipients of a shard under ``config``; 0 where listdelivery does not shard posts."""
    from django.test.utils import override_settings

    from listdelivery import conf

    if "SHARD_SIZE" not in conf.DEFAULTS:
        return 0
    with override_settings(LISTDELIVERY=config):
        return conf.get("SHARD_SIZE")


def expected_transactions(members: int, max_recipients: int, shard_size: int = 0) -> int:
    """Independently of chunkify: one transaction per ``max_recipients`` per TLD bucket, in
    each shard (consecutive members, ``shard_size`` of them) where the post is split."""
    from listdelivery.delivery.bulk import CHUNKMAP

    size = shard_size if shard_size and members > shard_size else members
    total = 0
    for start in range(0, members, size):
        buckets = Counter(
            CHUNKMAP.get(member_address(i).rsplit(".", 1)[1], 0)
            for i in range(start, min(members, start + size))
        )
        total += sum(math.ceil(count / max_recipients) for count in buckets.values())
    return total


def warm_up(bench: Bench) -> None:
    once_with(bench, min(bench.options.members, 50), CHUNKS[0], 1)
