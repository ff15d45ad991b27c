"""One run of the benchmark: its options, sink, scratch directory and database, shared by
every scenario."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench import checks
from bench.sinks import Sink
from bench.timing import Stopwatch


class Bench:
    def __init__(
        self, options: argparse.Namespace, sink: Sink, scratch: Path, database_url: str
    ) -> None:
        self.options = options
        self.sink = sink
        self.scratch = scratch
        self.database_url = database_url

    def size(self, given: int | None, quick: int, full: int) -> int:
        """A scenario's size: the option if given, else its --quick or full default."""
        if given is not None:
            return given
        return quick if self.options.quick else full

    def config(self, **values: Any) -> dict[str, Any]:
        """``LISTDELIVERY`` for a run in this process: the sink, no django-q2 tasks, ``values``."""
        return {
            "SMTP_HOST": self.sink.host,
            "SMTP_PORT": self.sink.port,
            "ENQUEUE_TASKS": False,  # the benchmark runs the runner itself, not a cluster
            **values,
        }

    def stopwatch(self) -> Stopwatch:
        return Stopwatch(self.sink.cpu_seconds)

    def counts(self) -> tuple[int, int | None]:
        return self.sink.counts()

    def check_sink(
        self, before: tuple[int, int | None], messages: int, recipients: int, what: str
    ) -> None:
        checks.check_sink(self.sink, before, messages, recipients, what)

    @staticmethod
    def progress(text: str) -> None:
        print(f"  … {text}", file=sys.stderr, flush=True)
