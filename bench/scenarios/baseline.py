"""The baseline: raw ``smtplib`` on one persistent connection, pre-rendered ~2 KB messages,
one RCPT each: the ceiling of one connection, against which every scenario is a ratio.

It is measured in rounds between the scenarios' (see :mod:`bench.rounds`); each round sends
``--baseline-messages`` messages (3,000; 1,000 with ``--quick``).
"""

from __future__ import annotations

import smtplib
import statistics

from bench.context import Bench
from bench.lists import member_address, post_bytes
from bench.report import Row, row_from_samples
from bench.timing import Sample

FULL_MESSAGES = 3_000
QUICK_MESSAGES = 1_000
WARM_UP_MESSAGES = 200
LABEL = "baseline (raw smtplib, 1 conn)"


class BaselineRounds:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.n = bench.size(bench.options.baseline_messages, QUICK_MESSAGES, FULL_MESSAGES)
        self.messages = rendered(self.n)
        self.samples: list[Sample] = []

    def warm_up(self) -> None:
        self.send(self.messages[:WARM_UP_MESSAGES])

    def measure(self) -> Sample:
        self.bench.progress(f"baseline round {len(self.samples) + 1}")
        sample = self.send(self.messages)
        self.samples.append(sample)
        return sample

    def send(self, messages: list[tuple[str, str, bytes]]) -> Sample:
        before = self.bench.counts()
        with self.bench.stopwatch() as watch:
            with smtplib.SMTP(self.bench.sink.host, self.bench.sink.port, timeout=60) as smtp:
                for sender, recipient, message in messages:
                    smtp.sendmail(sender, [recipient], message)
        self.bench.check_sink(before, len(messages), len(messages), "baseline")
        return watch.sample(len(messages), len(messages))

    def row(self) -> Row:
        rates = [sample.rate for sample in self.samples]
        middle = statistics.median(rates)
        row = row_from_samples(LABEL, self.n, self.samples, ratio=1.0)
        row.ratio_range = (min(rates) / middle, max(rates) / middle)
        row.note = "sendmail() of pre-rendered ~2 KB messages, one RCPT each; seconds: median round"
        return row


def rendered(n: int) -> list[tuple[str, str, bytes]]:
    """``(sender, recipient, message)``: the post addressed to each member, CRLF, ready to send."""
    template = post_bytes(0, "list@example.org").replace(b"\n", b"\r\n")
    head, _, body = template.partition(b"\r\n\r\n")
    head = head.replace(b"To: list@example.org", b"To: %s")
    return [
        (
            "list-bounces@example.org",
            member_address(i),
            head.replace(b"%s", f"Member {i} <{member_address(i)}>".encode()) + b"\r\n\r\n" + body,
        )
        for i in range(n)
    ]
