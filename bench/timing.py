"""One timed section of a scenario: its wall time, the CPU it cost, and what it sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.cpu import own_cpu_seconds


class Stopwatch:
    """Wall time, the client's CPU time and the sink's around one timed section.

    The client is this process and the child processes it waited for in the section;
    ``sink_cpu`` reads the sink's CPU seconds (``None``: not known).
    """

    def __init__(self, sink_cpu: Callable[[], float | None]) -> None:
        self._read_sink = sink_cpu

    def __enter__(self) -> Stopwatch:
        self._cpu = own_cpu_seconds()
        self._sink = self._read_sink()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.client_cpu = own_cpu_seconds() - self._cpu
        after = self._read_sink()
        self.sink_cpu = after - self._sink if after is not None and self._sink is not None else None

    def sample(self, transactions: int, recipients: int, **extra: Any) -> Sample:
        return Sample(
            self.seconds,
            transactions,
            recipients,
            client_cpu=self.client_cpu,
            sink_cpu=self.sink_cpu,
            **extra,
        )


@dataclass
class Sample:
    """One timed delivery (or baseline round)."""

    seconds: float
    transactions: int  # SMTP transactions: the messages the sink took
    recipients: int
    posts: int = 1
    enqueue_seconds: float | None = None  # queuing, timed apart from delivery
    client_cpu: float | None = None  # CPU seconds of the sending process(es), all threads
    sink_cpu: float | None = None  # CPU seconds of the sink
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """SMTP transactions a second."""
        return self.transactions / self.seconds if self.seconds else 0.0
