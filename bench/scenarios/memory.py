"""Memory: the peak RSS of a fresh process that queues, and of one that delivers, a
personalized post to ``--memory-members`` members (100,000; 2,000 with ``--quick``), and to a
tenth of that, to see how memory grows with the list.

Each phase runs in a child process (``python -m bench.scenarios.memory``, this module), which
prints its figures as one JSON line. The delivering child uses the most of ``--connections``.

Target: under 150 MB, and not growing in step with the list.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import REPO_ROOT
from bench.checks import CorrectnessError, check_database
from bench.context import Bench
from bench.database import flush_tables, prepare_django
from bench.lists import PERSONALIZED_LIST, PERSONALIZED_SETTINGS, create_list, enqueue
from bench.report import Outcome, Row, single_row

TARGET_PEAK_MB = 150
NOISE_KB = 2048  # a rise below this is what the allocator already holds, not a trend
TAG = "BENCH-MEMORY "


def once(bench: Bench) -> Outcome:
    large = bench.options.memory_members
    sizes = [large, max(1, large // 10)]
    connections = max(bench.options.connections)
    results: dict[int, dict[str, Any]] = {}
    for n in sizes:
        results[n] = {}
        for phase in ("enqueue", "deliver"):
            bench.progress(f"memory: {phase} a personalized post to {n} members (fresh process)")
            if phase == "enqueue":
                flush_tables()
            before = bench.counts()
            with bench.stopwatch() as watch:
                report = child(bench, n, phase, connections)
            report["sink_cpu"] = watch.sink_cpu
            if phase == "deliver":
                bench.check_sink(before, n, n, f"memory, {n} members")
                check_database(1, n, f"memory, {n} members")
            results[n][phase] = report
    flush_tables()
    details: dict[str, Any] = {"sizes": sizes, "results": {str(n): r for n, r in results.items()}}
    rows = []
    for phase in ("deliver", "enqueue"):
        row, figures = judged_row(phase, results[large][phase], results[sizes[1]][phase], sizes)
        row.config = {"connections": connections, "phase": phase}
        if phase == "deliver":
            row.scenario = f"memory: deliver ({connections} conn)"
        details.update({f"{phase}_{key}": value for key, value in figures.items()})
        rows.append(row)
    return Outcome(rows=rows, details=details)


def judged_row(
    phase: str, big: dict[str, Any], little: dict[str, Any], sizes: list[int]
) -> tuple[Row, dict[str, Any]]:
    large, small = sizes
    peak_mb = big["peak_kb"] / 1024
    growth_big = big["peak_kb"] - big["before_kb"]
    growth_small = little["peak_kb"] - little["before_kb"]
    # Linear growth would make the rise above the start ten times the N/10 one.
    linear = growth_big >= (large / small) * max(growth_small, NOISE_KB)
    per_member = (big["peak_kb"] - little["peak_kb"]) * 1024 / max(large - small, 1)
    row = single_row(
        f"memory: {phase}",
        large,
        big["seconds"],
        big.get("transactions", 0),
        large,
        big["cpu_seconds"],
        big["sink_cpu"],
        target=f"<{TARGET_PEAK_MB} MB, sublinear",
        met=(
            f"{'yes' if peak_mb < TARGET_PEAK_MB and not linear else 'NO'} "
            f"({peak_mb:.0f} MB; +{growth_big / 1024:.0f} MB, "
            f"+{growth_small / 1024:.0f} MB at N/10)"
        ),
        note=(
            f"peak {peak_mb:.1f} MB from {big['before_kb'] / 1024:.1f} MB at the start; "
            f"N/10: peak {little['peak_kb'] / 1024:.1f} MB from "
            f"{little['before_kb'] / 1024:.1f} MB; {per_member:.0f} bytes per extra member"
        ),
    )
    return row, {"bytes_per_member": round(per_member), "linear": linear}


def child(bench: Bench, n: int, phase: str, connections: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.scenarios.memory",
        "--members",
        str(n),
        "--phase",
        phase,
        "--sink",
        f"{bench.sink.host}:{bench.sink.port}",
        "--connections",
        str(connections),
        "--scratch",
        str(bench.scratch),
        "--database-url",
        bench.database_url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in done.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    raise CorrectnessError(
        f"the memory child ({phase}, {n}) failed with status {done.returncode}:\n"
        f"{done.stderr[-3000:]}"
    )


# -- the child ---------------------------------------------------------------------------------


def memory_kb() -> dict[str, int]:
    """Peak and current RSS of this process, in KB.

    The peak is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is reported too, but on
    Linux it starts at the parent's peak (the kernel carries the pre-exec high-water mark of
    a forked child over into the new program), so in a child of a large process it says
    nothing about the child.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        usage //= 1024  # bytes there
    figures = {"ru_maxrss_kb": usage}
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        figures["peak_kb"] = figures["rss_kb"] = usage
        return figures
    for key, name in (("peak_kb", "VmHWM"), ("rss_kb", "VmRSS")):
        match = re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE)
        figures[key] = int(match[1]) if match else usage
    return figures


def main(argv: list[str] | None = None) -> int:
    """One phase of a personalized post to N members, in a fresh process; prints peak RSS."""
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.memory")
    parser.add_argument("--members", type=int, required=True)
    parser.add_argument("--phase", choices=("enqueue", "deliver"), required=True)
    parser.add_argument("--sink", required=True, metavar="HOST:PORT")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--database-url", required=True)
    options = parser.parse_args(argv)
    prepare_django(options.database_url, options.scratch, migrate=False)
    from django.test.utils import override_settings

    from listdelivery.models import MailingList, Personalization
    from listdelivery.runner import OutgoingRunner

    n = options.members
    host, _, port = options.sink.rpartition(":")
    config = {
        "SMTP_HOST": host,
        "SMTP_PORT": int(port),
        "SMTP_CONNECTIONS": options.connections,
        "ENQUEUE_TASKS": False,
        **PERSONALIZED_SETTINGS,
    }
    report: dict[str, Any] = {"phase": options.phase, "members": n, "pid": os.getpid()}
    with override_settings(LISTDELIVERY=config):
        if options.phase == "enqueue":
            start = memory_kb()
            mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
            report["after_members_kb"] = memory_kb()["peak_kb"]
            began, cpu = time.perf_counter(), time.process_time()
            enqueue(mlist, 1)
            report["seconds"] = time.perf_counter() - began
            report["cpu_seconds"] = time.process_time() - cpu
        else:
            MailingList.objects.get(address=PERSONALIZED_LIST)  # connect before measuring
            start = memory_kb()
            began, cpu = time.perf_counter(), time.process_time()
            summary = OutgoingRunner().run()
            report["seconds"] = time.perf_counter() - began
            report["cpu_seconds"] = time.process_time() - cpu
            report["transactions"] = summary.transactions
            report["recipients"] = summary.recipients
    end = memory_kb()
    report["before_kb"] = start["peak_kb"]
    report["peak_kb"] = end["peak_kb"]
    report["rss_after_kb"] = end["rss_kb"]
    report["ru_maxrss_before_kb"] = start["ru_maxrss_kb"]
    report["ru_maxrss_after_kb"] = end["ru_maxrss_kb"]
    print(TAG + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
