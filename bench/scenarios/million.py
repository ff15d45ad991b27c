"""Million: a personalized post to ``--million-members`` members (1,000,000; 100,000 with
``--quick``), measured by :mod:`bench.million` process by process (queuing, delivering, each
one's peak memory), every member checked to get exactly one copy.

Only ``--only million`` runs it. Where ``bench/million.py`` is not there, it is skipped and
says so. Its sink must tell recipients apart: the run's own when it counts them (the asyncio
sink), else an ``smtp-sink`` of its own that writes every copy to a file, read back afterwards.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.context import Bench
from bench.report import Outcome, Row, single_row
from bench.sinks import PostfixSink

FULL_MEMBERS = 1_000_000
QUICK_MEMBERS = 100_000
TARGET_PEAK_MB = 150


def once(bench: Bench) -> Outcome:
    try:
        million = importlib.import_module("bench.million")
    except ModuleNotFoundError as error:
        if error.name != "bench.million":
            raise
        reason = "bench/million.py is not there"
        bench.progress(f"million: skipped, {reason}")
        return Outcome(details={"skipped": reason}, lines=[f"million: skipped, {reason}"])
    members = bench.size(bench.options.million_members, QUICK_MEMBERS, FULL_MEMBERS)
    scratch = bench.scratch / "million"
    bench.progress(f"million: a personalized post to {members:,} members")
    if bench.sink.counts_recipients:
        figures = million.measure(
            members, bench.sink.host, bench.sink.port, bench.options.database_url, scratch
        )
    else:
        # Not in the scratch directory: smtp-sink started as root writes as nobody, who may
        # not enter it.
        folder = Path(tempfile.mkdtemp(prefix="listdelivery-million-sink-"))
        sink = PostfixSink(pipelining=bench.sink.pipelining, dump=folder / "dump").start()
        try:
            figures = million.measure(
                members,
                sink.host,
                sink.port,
                bench.options.database_url,
                scratch,
                sink_dump=sink.dump,
            )
        finally:
            sink.stop()
            shutil.rmtree(folder, ignore_errors=True)
    problems = figures.get("problems") or []
    return Outcome(
        rows=rows(figures),
        details=figures,
        lines=[line(figures)],
        error=f"million: {'; '.join(problems)}" if problems else None,
    )


def rows(figures: dict[str, Any]) -> list[Row]:
    members = figures["members"]
    found = []
    for phase, messages in (("enqueue", 0), ("deliver", figures.get("transactions", members))):
        peak = figures.get(f"{phase}_peak_mb")
        found.append(
            single_row(
                f"million: {phase}",
                members,
                figures[f"{phase}_seconds"],
                messages,
                members,
                target=f"<{TARGET_PEAK_MB} MB",
                met=f"{'yes' if peak is not None and peak < TARGET_PEAK_MB else 'NO'} ({peak} MB)",
                note=f"peak RSS of the {phase} process",
            )
        )
    return found


def line(figures: dict[str, Any]) -> str:
    shown = ", ".join(
        f"{key} {value}" for key, value in figures.items() if key not in ("members", "problems")
    )
    return f"million, {figures['members']:,} members: {shown}"
