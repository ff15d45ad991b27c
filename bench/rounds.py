"""What runs when: a warm-up, ``--repeat`` rounds of the timed scenarios with a round of the
baseline before each, the once-a-run scenarios (a baseline round before each too), a last
baseline round, then the untimed diagnostics (query counts, ``--profile``).

The baseline swings with the CPU's power states (2,500 to 6,000 msgs/s on the 2-core
machine this was written on), so it is measured between the scenarios, not once: every
ratio is to the median of the run's baseline rounds, and the report shows their spread.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.checks import CorrectnessError
from bench.context import Bench
from bench.database import flush_tables
from bench.report import Baseline, Outcome, Row, enqueue_row, row_from_samples, set_ratio
from bench.scenarios.baseline import BaselineRounds
from bench.timing import Sample


@dataclass
class Timed:
    """A measurement taken once a round; ``judge`` sets its row's target once ratios are known."""

    label: str
    n: int
    run: Callable[[], Sample]
    config: dict[str, Any] = field(default_factory=dict)
    judge: Callable[[Row], None] | None = None
    samples: list[Sample] = field(default_factory=list)


class Rounds:
    def __init__(self, bench: Bench, scenarios: dict[str, ModuleType]) -> None:
        self.bench = bench
        self.scenarios = scenarios
        self.baseline = BaselineRounds(bench)
        self.timed: dict[str, list[Timed]] = {
            name: module.timed(bench) for name, module in scenarios.items() if _has(module, "timed")
        }
        self.outcomes: dict[str, Outcome] = {}
        self.profiles: dict[str, dict[str, str]] = {}

    def run(self) -> None:
        self.warm_up()
        for number in range(1, self.bench.options.repeat + 1):
            for entries in self.timed.values():
                for entry in entries:
                    self.baseline.measure()
                    self.bench.progress(
                        f"round {number}/{self.bench.options.repeat}: {entry.label}"
                    )
                    entry.samples.append(entry.run())
        for name, module in self.scenarios.items():
            if _has(module, "once"):
                self.baseline.measure()
                outcome = self.outcomes[name] = module.once(self.bench)
                if outcome.error:
                    raise CorrectnessError(outcome.error)
        self.baseline.measure()
        self.diagnose()

    def warm_up(self) -> None:
        """One small untimed pass of each kind: imports, connections, caches."""
        self.bench.progress("warming up")
        self.baseline.warm_up()
        for module in self.scenarios.values():
            if _has(module, "warm_up"):
                module.warm_up(self.bench)

    def diagnose(self) -> None:
        """Untimed: database queries per post or batch; cProfile with ``--profile``."""
        for name, module in self.scenarios.items():
            if _has(module, "queries"):
                self.bench.progress(f"counting database queries: {name}")
                self.outcomes[f"queries: {name}"] = module.queries(self.bench)
        if self.bench.options.profile:
            directory = Path(self.bench.options.json).parent
            for name, module in self.scenarios.items():
                if _has(module, "profiled"):
                    self.bench.progress(f"profiling {name} (cProfile)")
                    self.profiles[name] = profile(name, module.profiled(self.bench), directory)
        flush_tables()

    # -- what was measured, also after a failed check ----------------------------------------

    def spread(self) -> Baseline:
        return Baseline([sample.rate for sample in self.baseline.samples])

    def rows(self) -> list[Row]:
        baseline = self.spread()
        rows = [self.baseline.row()] if self.baseline.samples else []
        for name, entries in self.timed.items():
            measured = [entry for entry in entries if entry.samples]
            for entry in measured:
                row = row_from_samples(
                    entry.label, entry.n, entry.samples, config=dict(entry.config)
                )
                set_ratio(row, baseline)
                if entry.judge:
                    entry.judge(row)
                rows.append(row)
            if measured:
                queued = enqueue_row(name, measured[0].n, [s for e in measured for s in e.samples])
                rows += [queued] if queued else []
        for outcome in self.outcomes.values():
            for row in outcome.rows:
                set_ratio(row, baseline)
                rows.append(row)
        return rows

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            name: [
                {"label": entry.label, "samples": [s.details for s in entry.samples]}
                for entry in entries
                if any(s.details for s in entry.samples)
            ]
            for name, entries in self.timed.items()
        }
        found = {name: value for name, value in found.items() if value}
        found.update({name: o.details for name, o in self.outcomes.items() if o.details})
        if self.profiles:
            found["profiles"] = {name: p["file"] for name, p in self.profiles.items()}
        return found

    def lines(self) -> list[str]:
        return [line for outcome in self.outcomes.values() for line in outcome.lines]

    def profile_lines(self) -> list[str]:
        return [
            f"\n== cProfile, {name} ({p['file']})\n{p['top']}" for name, p in self.profiles.items()
        ]


def profile(name: str, job: Callable[[], Any], directory: Path) -> dict[str, str]:
    """Run ``job`` under cProfile; the profile's file, and its top functions as text."""
    directory.mkdir(parents=True, exist_ok=True)
    profiler = cProfile.Profile()
    profiler.enable()
    job()
    profiler.disable()
    path = directory / f"profile-{name}.prof"
    profiler.dump_stats(path)
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return {"file": str(path), "top": stream.getvalue()}


def _has(module: ModuleType, hook: str) -> bool:
    return callable(getattr(module, hook, None))
