"""One post queued (timed apart) and delivered by ``OutgoingRunner().run()`` in this process
(timed), then checked: the runner's summary, the sink's counters and the rows."""

from __future__ import annotations

import time
from typing import Any

from bench.checks import check_database, check_summary
from bench.context import Bench
from bench.lists import enqueue
from bench.timing import Sample


def deliver_one_post(
    bench: Bench, mlist: Any, config: dict[str, Any], transactions: int, n: int, what: str
) -> Sample:
    from django.test.utils import override_settings

    from listdelivery.runner import OutgoingRunner

    with override_settings(LISTDELIVERY=config):
        began = time.perf_counter()
        enqueue(mlist, 1)
        queued = time.perf_counter() - began
        before = bench.counts()
        with bench.stopwatch() as watch:
            summary = OutgoingRunner().run()
    check_summary(summary, transactions, n, 1, what)
    bench.check_sink(before, transactions, n, what)
    check_database(1, n, what)
    return watch.sample(transactions, n, enqueue_seconds=queued)
