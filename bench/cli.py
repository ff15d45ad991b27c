"""``python -m bench``: the command line, and one run from start to report.

It starts its own SMTP sink in a separate process (:mod:`bench.sinks`), migrates a scratch
SQLite database in a temporary directory (``--database-url`` for another, e.g. PostgreSQL:
it must hold no listdelivery rows, since every table is emptied between runs), runs the
chosen scenarios (:mod:`bench.scenarios`) in rounds with the baseline between them
(:mod:`bench.rounds`), prints the table (:mod:`bench.report`) and writes the same figures to
``--json`` (default ``bench-results/latest.json``).

The exit status is 0 even when a target is missed (this is a report, not a test) and 1 when
a correctness check fails: the sink did not receive exactly the expected messages and
recipients, or a row did not end delivered.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import scenarios
from bench.checks import CorrectnessError
from bench.context import Bench
from bench.cpu import BackgroundLoad
from bench.database import database_label, ensure_empty_database, prepare_django
from bench.report import header_lines, notes, render_table, result_json
from bench.rounds import Rounds
from bench.sinks import start_sink

FULL_SIZE = {"members": 10_000, "posts": 1_000, "memory_members": 100_000, "repeat": 3}
QUICK_SIZE = {"members": 500, "posts": 50, "memory_members": 2_000, "repeat": 1}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("connections must be whole numbers of at least 1")
    return values


def _names() -> str:
    return "\n".join(
        f"  {name}: {scenario.summary}" + ("" if scenario.by_default else " (only when named)")
        for name, scenario in scenarios.SCENARIOS.items()
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure listdelivery's delivery throughput against a local SMTP sink.",
        epilog="scenarios (--only), besides the baseline, which always runs:\n" + _names(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_argument_group("size (defaults: 10000 members, 1000 posts, 100000, 3)")
    size.add_argument("--members", type=int, help="list size of the personalized and bulk runs")
    size.add_argument("--posts", type=int, help="posts in the posts run")
    size.add_argument("--memory-members", type=int, help="list size of the memory run")
    size.add_argument("--repeat", type=int, help="rounds; the median is reported")
    size.add_argument(
        "--quick",
        action="store_true",
        help="CI size: 500 members, 50 posts, 2000 memory members, 1 round, and the smaller "
        "size of every other scenario (explicit size options still win)",
    )
    size.add_argument(
        "--baseline-messages",
        type=int,
        help="messages in each baseline round (default 3000; --quick 1000)",
    )
    size.add_argument(
        "--parallel-members",
        type=int,
        help="members of the parallel scenario's post (default 20000; --quick 2000)",
    )
    size.add_argument(
        "--dashboard-rows",
        type=int,
        help="recipient rows under the dashboard's 30-day chart (default 5000000; --quick 100000)",
    )
    size.add_argument(
        "--shaped-members",
        type=int,
        help="members of the shaped scenario's destination mix (default 1000; --quick 200)",
    )
    size.add_argument(
        "--xverp-members",
        type=int,
        help="members of the xverp scenario's post (default 10000; --quick 1000)",
    )
    size.add_argument(
        "--million-members",
        type=int,
        help="members of the million scenario's post (default 1000000; --quick 100000)",
    )
    parser.add_argument(
        "--connections",
        type=_int_list,
        default=[1, 2, 4],
        help="SMTP_CONNECTIONS values for the personalized run (default 1,2,4); "
        "bulk and posts use 1 and the largest, memory the largest",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        help="SHARD_SIZE of the parallel scenario's post, where listdelivery has that setting "
        "(default: an eighth of its members)",
    )
    parser.add_argument(
        "--parallel-connections",
        type=int,
        default=1,
        help="SMTP_CONNECTIONS of each runner process of the parallel scenario (default 1, "
        "listdelivery's own default)",
    )
    parser.add_argument(
        "--json",
        default="bench-results/latest.json",
        metavar="PATH",
        help="where the same figures go as JSON (default bench-results/latest.json)",
    )
    parser.add_argument(
        "--database-url",
        help="run on this database instead of a scratch SQLite file; "
        "it must hold no listdelivery rows (they are deleted between runs)",
    )
    parser.add_argument(
        "--sink",
        choices=("auto", "smtp-sink", "asyncio"),
        default="auto",
        help="auto: Postfix's smtp-sink if installed, else the asyncio sink",
    )
    parser.add_argument(
        "--sink-pipelining",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the sink advertise PIPELINING (RFC 2920), as Postfix and Exim do; "
        "--no-sink-pipelining measures the one-command-at-a-time path",
    )
    parser.add_argument(
        "--only",
        help="comma-separated scenarios to run (default: all but those only run when named)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run cProfile on one personalized (1 connection) and one posts run",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (database, logs)"
    )
    options = parser.parse_args(argv)
    sizes = QUICK_SIZE if options.quick else FULL_SIZE
    for key, value in sizes.items():
        if getattr(options, key) is None:
            setattr(options, key, value)
    for key in (
        *sizes,
        "baseline_messages",
        "parallel_members",
        "parallel_connections",
        "shard_size",
    ):
        value = getattr(options, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    options.only = selected(parser, options.only)
    return options


def selected(parser: argparse.ArgumentParser, only: str | None) -> list[str]:
    """The scenarios to run, in the registry's order."""
    if only is None:
        return [name for name, scenario in scenarios.SCENARIOS.items() if scenario.by_default]
    names = {scenarios.ALIASES.get(n.strip(), n.strip()) for n in only.split(",") if n.strip()}
    names.discard("baseline")  # it always runs
    unknown = names - set(scenarios.SCENARIOS)
    if unknown:
        parser.error(
            f"unknown scenarios in --only: {', '.join(sorted(unknown))} "
            f"(known: baseline, {', '.join(scenarios.SCENARIOS)})"
        )
    return [name for name in scenarios.SCENARIOS if name in names]


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="listdelivery-bench-"))
    database_url = options.database_url or f"sqlite:///{scratch / 'bench.sqlite3'}"
    sink = None
    status = 0
    try:
        sink = start_sink(options.sink, pipelining=options.sink_pipelining)
        prepare_django(database_url, scratch, migrate=True)
        if options.database_url:
            ensure_empty_database()
        import django

        bench = Bench(options, sink, scratch, database_url)
        rounds = Rounds(bench, {name: scenarios.load(name) for name in options.only})
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "django": django.get_version(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "sink": sink.label,
            "sink_pipelining": sink.pipelining,
            "database": database_label(),
            "members": options.members,
            "posts": options.posts,
            "memory_members": options.memory_members,
            "baseline_messages": rounds.baseline.n,
            "repeat": options.repeat,
            "connections": options.connections,
            "scenarios": options.only,
            "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
        }
        print("\n".join(header_lines(meta)), flush=True)
        error = None
        began = time.perf_counter()
        load = BackgroundLoad(sink.cpu_seconds)
        try:
            rounds.run()
        except CorrectnessError as failure:
            error = str(failure)
            status = 1
        meta["wall_seconds"] = round(time.perf_counter() - began, 1)
        meta["background_load"] = load.background_cores()
        meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        rows, baseline = rounds.rows(), rounds.spread()
        print()
        print(render_table(rows))
        if baseline.rates:
            print(baseline.describe())
        print()
        print("\n".join([*rounds.lines(), *notes(meta), *rounds.profile_lines()]))
        if error:
            print(f"\nCORRECTNESS CHECK FAILED: {error}", file=sys.stderr)
        path = Path(options.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        result = result_json(meta, baseline, rows, rounds.details(), error)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path} (total {meta['wall_seconds']} s)")
    finally:
        if sink:
            sink.stop()
        if options.keep:
            print(f"scratch directory kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return status
