"""The benchmark's report: a row per scenario, its ratio to the baseline, the table and the JSON."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.timing import Sample


@dataclass
class Row:
    """One line of the table: the median of a scenario's samples and how it fares."""

    scenario: str
    n: int
    seconds: float
    messages: int  # SMTP transactions; 0 where the scenario sends nothing (queuing, a chart)
    recipients: int
    posts: int = 1
    samples: list[float] = field(default_factory=list)
    ratio: float | None = None  # msgs/s over the baseline's median msgs/s in the same run
    ratio_range: tuple[float, float] | None = None  # over the baseline's fastest, slowest round
    client_cpu_ms: float | None = None  # per message, of the sending process(es)
    sink_cpu_ms: float | None = None  # per message, of the sink
    target: str = ""
    met: str = ""
    note: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    against_baseline: bool = True  # False: set by limits or another server, no ratio

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def recipients_per_second(self) -> float:
        return self.recipients / self.seconds if self.seconds else 0.0

    @property
    def posts_per_second(self) -> float:
        return self.posts / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["messages_per_second"] = round(self.messages_per_second, 1)
        data["recipients_per_second"] = round(self.recipients_per_second, 1)
        data["posts_per_second"] = round(self.posts_per_second, 1)
        data["seconds"] = round(self.seconds, 4)
        data["samples"] = [round(s, 4) for s in self.samples]
        if self.ratio is not None:
            data["ratio"] = round(self.ratio, 3)
        if self.ratio_range is not None:
            data["ratio_range"] = [round(r, 3) for r in self.ratio_range]
        for key in ("client_cpu_ms", "sink_cpu_ms"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


@dataclass
class Outcome:
    """What a scenario measured once in a run: rows for the table, figures, lines to print."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    error: str | None = None  # a failed correctness check, reported after what was measured


@dataclass
class Baseline:
    """The baseline's rounds of this run, interleaved with the scenarios': their spread."""

    rates: list[float]  # messages a second, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def as_json(self) -> dict[str, Any]:
        return {
            "rounds": len(self.rates),
            "min": round(min(self.rates), 1),
            "median": round(self.median, 1),
            "max": round(max(self.rates), 1),
            "messages_per_second": [round(rate, 1) for rate in self.rates],
        }

    def describe(self) -> str:
        return (
            f"baseline over {len(self.rates)} rounds between the scenarios': "
            f"min {min(self.rates):,.0f}, median {self.median:,.0f}, "
            f"max {max(self.rates):,.0f} msgs/s"
        )


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_message_ms(cpu: float | None, sample: Sample) -> float | None:
    if cpu is None or not sample.transactions:
        return None
    return cpu / sample.transactions * 1000


def row_from_samples(label: str, n: int, samples: list[Sample], **fields: Any) -> Row:
    """The median over ``samples`` (one per round) of a scenario that sent the same each time."""
    first = samples[0]
    return Row(
        scenario=label,
        n=n,
        seconds=statistics.median(s.seconds for s in samples),
        messages=first.transactions,
        recipients=first.recipients,
        posts=first.posts,
        samples=[s.seconds for s in samples],
        client_cpu_ms=median([per_message_ms(s.client_cpu, s) for s in samples]),
        sink_cpu_ms=median([per_message_ms(s.sink_cpu, s) for s in samples]),
        **fields,
    )


def single_row(
    label: str,
    n: int,
    seconds: float,
    messages: int,
    recipients: int,
    client_cpu: float | None = None,
    sink_cpu: float | None = None,
    **fields: Any,
) -> Row:
    """The row of a scenario measured once a run, from its seconds and CPU seconds."""
    sample = Sample(seconds, messages, recipients)
    return Row(
        scenario=label,
        n=n,
        seconds=seconds,
        messages=messages,
        recipients=recipients,
        samples=[seconds],
        client_cpu_ms=per_message_ms(client_cpu, sample),
        sink_cpu_ms=per_message_ms(sink_cpu, sample),
        **fields,
    )


def enqueue_row(label: str, n: int, samples: list[Sample]) -> Row | None:
    """Queuing, timed apart from delivery: the median over every sample that timed it."""
    seconds = [s.enqueue_seconds for s in samples if s.enqueue_seconds is not None]
    if not seconds:
        return None
    return Row(
        scenario=f"  enqueue ({label})",
        n=n,
        seconds=statistics.median(seconds),
        messages=0,
        recipients=samples[0].recipients,
        posts=samples[0].posts,
        samples=seconds,
        note="member_recipients + to_outgoing: rows written, nothing sent",
    )


def set_ratio(row: Row, baseline: Baseline) -> None:
    """The row's msgs/s over the baseline's median, and over its slowest and fastest rounds."""
    if not row.messages or not row.against_baseline or not baseline.rates:
        return
    rate = row.messages_per_second
    row.ratio = rate / baseline.median
    row.ratio_range = (rate / max(baseline.rates), rate / min(baseline.rates))


def met(value: float | None, target: float, aim: float | None = None) -> str:
    if value is None:
        return "?"
    if value < target:
        return "NO"
    if aim is not None and value >= aim:
        return "yes, aim met"
    return "yes"


# -- output --------------------------------------------------------------------------------


def header_lines(meta: dict[str, Any]) -> list[str]:
    return [
        f"listdelivery benchmark, {meta['date']}",
        f"python {meta['python']}, Django {meta['django']}, {meta['platform']}",
        f"machine: {meta['cores']} cores (load average {meta['loadavg']})",
        f"sink: {meta['sink']}",
        f"database: {meta['database']}",
        f"sizes: {meta['members']} members, {meta['posts']} posts, baseline "
        f"{meta['baseline_messages']} messages a round; median of {meta['repeat']}; "
        f"connections {','.join(map(str, meta['connections']))}",
        f"scenarios: {', '.join(meta['scenarios'])}",
    ]


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def render_table(rows: list[Row]) -> str:
    headers = (
        "scenario",
        "N",
        "seconds",
        "msgs/s",
        "rcpts/s",
        "ratio",
        "(spread)",
        "client ms/msg",
        "sink ms/msg",
        "target",
        "met?",
    )
    lines = [
        (
            row.scenario,
            f"{row.n:,}",
            f"{row.seconds:.3f}",
            f"{row.messages_per_second:,.0f}" if row.messages else "-",
            f"{row.recipients_per_second:,.0f}" if row.recipients else "-",
            f"{row.ratio:.2f}x" if row.ratio is not None else "-",
            f"{row.ratio_range[0]:.2f}-{row.ratio_range[1]:.2f}" if row.ratio_range else "",
            _ms(row.client_cpu_ms),
            _ms(row.sink_cpu_ms),
            row.target or "-",
            row.met or "-",
        )
        for row in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines, strict=True)]
    right = {1, 2, 3, 4, 5, 7, 8}

    def fmt(values: tuple[str, ...]) -> str:
        return "  ".join(
            str(v).rjust(w) if i in right else str(v).ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in lines)])


def notes(meta: dict[str, Any]) -> list[str]:
    found = [
        "ratio: msgs/s (SMTP transactions/s) over the baseline's median msgs/s in this run; "
        f"(spread): over its fastest and slowest round; seconds: the median of {meta['repeat']} "
        "round(s).",
        "client ms/msg: CPU of the sending process(es) per SMTP transaction; sink ms/msg: the "
        "sink's.",
        "enqueue rows: member_recipients + to_outgoing, timed apart from delivery.",
    ]
    if meta.get("background_load") is not None:
        found.append(
            f"other processes on this machine used {meta['background_load']:.2f} of its "
            f"{meta['cores']} cores on average during the run (load average at the end: "
            f"{meta['loadavg_end']}); more than ~0.2 makes the figures noisy."
        )
    return found


def result_json(
    meta: dict[str, Any],
    baseline: Baseline | None,
    rows: list[Row],
    details: dict[str, Any],
    error: str | None,
) -> dict[str, Any]:
    return {
        "meta": meta,
        "baseline": baseline.as_json() if baseline and baseline.rates else None,
        "baseline_messages_per_second": (
            round(baseline.median, 1) if baseline and baseline.rates else None
        ),
        "results": [row.as_json() for row in rows],
        "diagnostics": details,
        "error": error,
    }
