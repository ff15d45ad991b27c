"""Runner processes started together on the benchmark's database, as separate machines would be.

Each worker (``python -m bench.workers``, this module) sets Django up from the environment
(``DATABASE_URL`` and ``LISTDELIVERY_*`` variables, read by the project's settings), connects,
says ``READY`` and waits; when every worker is ready they are all told ``GO`` at once, and each
runs ``OutgoingRunner().run()`` once and prints its summary, its seconds and the CPU it used
as one JSON line. So the time measured is delivery alone, not Python's and Django's start-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench import REPO_ROOT
from bench.checks import CorrectnessError

TAG = "BENCH-WORKER "
START_TIMEOUT = 120.0


def environment(scratch: Path, settings: dict[str, Any]) -> dict[str, str]:
    """This process's environment (``DATABASE_URL`` and ``CACHE_DIR``: the benchmark's), with
    ``settings`` as ``LISTDELIVERY_<KEY>`` variables."""
    return {
        **os.environ,
        "BENCH_SCRATCH": str(scratch),
        **{f"LISTDELIVERY_{key}": str(value) for key, value in settings.items()},
    }


class Workers:
    """``count`` worker processes, started and ready; :meth:`go` runs them all at once."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.processes: list[tuple[subprocess.Popen, IO[bytes]]] = []
        command = [sys.executable, "-m", "bench.workers"]
        for _ in range(count):
            # Their errors go to files: a full pipe would stop a worker while we wait on another.
            errors = tempfile.TemporaryFile()
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            self.processes.append((process, errors))
        for process, errors in self.processes:
            line = process.stdout.readline().strip()
            if line != "READY":
                self.kill()
                raise CorrectnessError(f"a worker did not start: {_said(process, errors, line)}")

    def go(self) -> list[dict[str, Any]]:
        """Start every worker; once all have ended, what each reported."""
        for process, _ in self.processes:
            process.stdin.write("GO\n")
            process.stdin.flush()
        reports = []
        for process, errors in self.processes:
            output, _ = process.communicate()
            found = [line for line in output.splitlines() if line.startswith(TAG)]
            if process.returncode != 0 or not found:
                raise CorrectnessError(
                    f"a worker ended with status {process.returncode}: "
                    + _said(process, errors, output)
                )
            reports.append(json.loads(found[-1][len(TAG) :]))
        return reports

    def kill(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@dataclasses.dataclass
class Together:
    """What :func:`deliver_together` saw."""

    reports: list[dict[str, Any]]  # what each worker said
    sample: Any  # from GO to the last worker's end, with the CPU of delivery alone
    sink_before: tuple[int, int | None]  # the sink's counts before GO
    wall_seconds: float  # GO to the last worker's exit


def deliver_together(bench: Any, processes: int, settings: dict[str, Any]) -> Together:
    """``processes`` workers with ``settings`` delivering what is queued, all at once.

    The sample's time is from GO to the last worker's end of delivery, and its CPU
    the workers' delivery alone: their start-up and exit are not what is measured.
    """
    workers = Workers(processes, environment(bench.scratch, settings))
    before = bench.counts()
    try:
        with bench.stopwatch() as watch:
            reports = workers.go()
    finally:
        workers.kill()
    total = added_up(reports)
    sample = watch.sample(total.transactions, total.recipients)
    sample.seconds = max(report["seconds"] for report in reports)
    sample.client_cpu = sum(report["cpu_seconds"] for report in reports)
    return Together(reports, sample, before, watch.seconds)


def _said(process: subprocess.Popen, errors: IO[bytes], output: str) -> str:
    errors.seek(0)
    return (output + errors.read().decode(errors="replace"))[-3000:]


def added_up(reports: list[dict[str, Any]]) -> Any:
    """The workers' summaries added up, as one runner's would read."""
    from types import SimpleNamespace

    keys = reports[0]["summary"].keys()
    return SimpleNamespace(**{key: sum(r["summary"][key] for r in reports) for key in keys})


# -- the worker ---------------------------------------------------------------------------------


def main() -> int:
    from bench.database import prepare_django

    prepare_django(os.environ["DATABASE_URL"], Path(os.environ["BENCH_SCRATCH"]), migrate=False)
    from django.db import connection

    from listdelivery.runner import OutgoingRunner

    connection.ensure_connection()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 2
    cpu, began = time.process_time(), time.perf_counter()
    summary = OutgoingRunner().run()
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu
    report = {
        "pid": os.getpid(),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "summary": {
            key: value
            for key, value in dataclasses.asdict(summary).items()
            if isinstance(value, int)
        },
    }
    print(TAG + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
