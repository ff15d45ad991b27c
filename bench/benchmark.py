"""The delivery benchmark: ``python -m bench`` from the repository (``--quick`` for a CI run).

It starts its own SMTP sink in a separate process (Postfix's ``smtp-sink`` when
``/usr/sbin/smtp-sink`` is installed, otherwise the asyncio sink in
:mod:`bench.sink`), migrates a scratch SQLite database in a
temporary directory (``--database-url`` to use another, e.g. PostgreSQL: it
must hold no listdelivery rows, since every table is emptied between
repetitions) and measures, in one run:

1. **baseline**: raw ``smtplib``, one persistent connection, N pre-rendered
   messages of about 2 KB, one RCPT each: the ceiling of one connection;
2. **personalized**: one post to N members with ``full`` personalization and
   VERP, queued with ``to_outgoing`` and sent by ``OutgoingRunner().run()``,
   once per ``--connections`` value;
3. **bulk**: the same list without personalization, ``MAX_RECIPIENTS`` 10 and 500;
4. **many posts**: ``--posts`` posts to a 3-member list through ``deliver_pending``;
5. **memory**: peak RSS of a fresh process that queues, and of one that
   delivers, a personalized post to ``--memory-members`` members (and a tenth
   of that, to see how memory grows);
6. **dashboard**: the 30-day chart over millions of recipient rows (:mod:`bench.dashboard`);
7. **shaped**: traffic shaping against sinks that note when each message arrived
   (:mod:`bench.shaped`): time to the last recipient of a gmail/yahoo/outlook/other mix
   under the shipped destination pack, as a ratio to the least the limits allow; an
   ``SMTP_RATE`` set above the sink's limit (time, throttled share) and one set right
   (busiest second, mean rate), each with two runner processes;
8. **xverp**: a VERP'd post of a list without personalization through a private Postfix
   (:mod:`bench.xverp`), in chunks with XVERP against one copy per recipient (recipients/s).

For each: the median seconds over ``--repeat`` runs, messages (SMTP
transactions) per second, recipients per second and the ratio to the baseline
measured in the same run. Absolute times on a shared machine are noise; the
ratios are the figures to compare. Queuing is timed separately from delivery.
The sink advertises PIPELINING, as real MTAs do, so the SMTP layer sends MAIL,
RCPTs and DATA in one write (the smtplib baseline never pipelines);
``--no-sink-pipelining`` measures the one-command-at-a-time path. Compare runs
of the same setting only. After the timed runs it counts the database queries per post and per
personalized batch (``--profile`` also runs cProfile on the personalized
and many-posts scenarios). Results go to stdout as a table and to ``--json``
(default ``bench-results/latest.json``).

The exit status is 0 even when a target is missed (this is a report, not a
test) and 1 when a correctness check fails: the sink did not receive exactly
the expected messages and recipients, or a row did not end delivered.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import logging
import math
import os
import platform
import pstats
import re
import resource
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = Path("/usr/sbin/smtp-sink")

FULL_SIZE = {"members": 10_000, "posts": 1_000, "memory_members": 100_000, "repeat": 3}
QUICK_SIZE = {"members": 500, "posts": 50, "memory_members": 2_000, "repeat": 1}
SCENARIOS = (
    "baseline",
    "personalized",
    "bulk",
    "many",
    "memory",
    "dashboard",
    "shaped",
    "xverp",
)

PERSONALIZED_LIST = "personalized@bench.example.org"
BULK_LIST = "bulk@bench.example.org"
SMALL_LIST = "three@bench.example.org"
DOMAINS = ("example.com", "example.org", "example.net", "example.de")
CREATE_CHUNK = 5_000
MEMORY_TAG = "BENCH-MEMORY "

TARGET_PERSONALIZED = 1.5
AIM_PERSONALIZED = 2.0
TARGET_BULK = 0.8
TARGET_POSTS_PER_SECOND = 500
TARGET_PEAK_MB = 150
MEMORY_NOISE_KB = 2048

BODY_LINE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n"


class CorrectnessError(Exception):
    """The sink or the database disagrees with what the benchmark expected."""


# -- options ----------------------------------------------------------------


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure listdelivery's delivery throughput against a local SMTP sink.",
    )
    size = parser.add_argument_group("size (defaults: 10000 members, 1000 posts, 100000, 3)")
    size.add_argument("--members", type=int, help="list size of the personalized and bulk runs")
    size.add_argument("--posts", type=int, help="posts in the many-posts run")
    size.add_argument("--memory-members", type=int, help="list size of the memory run")
    size.add_argument("--repeat", type=int, help="repetitions; the median is reported")
    size.add_argument(
        "--quick",
        action="store_true",
        help="CI size: 500 members, 50 posts, 2000 memory members, 1 repetition "
        "(explicit size options still win)",
    )
    parser.add_argument(
        "--connections",
        type=_int_list,
        default=[1, 2, 4],
        help="SMTP_CONNECTIONS values for the personalized run (default 1,2,4); "
        "bulk and many posts use 1 and the largest",
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
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, of {', '.join(SCENARIOS)} "
        "(the baseline always runs)",
    )
    parser.add_argument(
        "--dashboard-rows",
        type=int,
        help="recipient rows under the dashboard's 30-day chart (default 5000000; --quick 100000)",
    )
    parser.add_argument(
        "--shaped-members",
        type=int,
        help="members of the shaped scenario's destination mix (default 1000; --quick 200)",
    )
    parser.add_argument(
        "--xverp-members",
        type=int,
        help="members of the xverp scenario's post (default 10000; --quick 1000)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run cProfile on one personalized (1 connection) and one many-posts run",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (database, logs)"
    )
    # Internal: the memory measurement runs in a fresh process.
    parser.add_argument("--_memory-child", type=int, dest="memory_child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--_memory-phase",
        dest="memory_phase",
        choices=("enqueue", "deliver"),
        default="deliver",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--_sink", dest="sink_address", help=argparse.SUPPRESS)
    parser.add_argument("--_connections", dest="child_connections", type=int, default=4,
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--_scratch", dest="scratch", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    sizes = QUICK_SIZE if options.quick else FULL_SIZE
    for key, value in sizes.items():
        if getattr(options, key) is None:
            setattr(options, key, value)
    for key in sizes:
        if getattr(options, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    options.only = {s.strip() for s in options.only.split(",") if s.strip()}
    unknown = options.only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios in --only: {', '.join(sorted(unknown))}")
    return options


# -- environment --------------------------------------------------------------


def prepare_django(database_url: str, scratch: Path, *, migrate: bool) -> None:
    """Point Django at the benchmark's database, set it up, and send logs to a file."""
    if (REPO_ROOT / "project" / "settings.py").exists() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ["DATABASE_URL"] = database_url
    os.environ["DEBUG"] = "False"  # DEBUG keeps every query in memory: not a production figure
    os.environ["CACHE_DIR"] = str(scratch / "cache")
    import django

    django.setup()
    from django.conf import settings

    settings.DEBUG = False
    _check_database(database_url)
    # The project logs to the console (Mailman's smtp.log lines, one per post): keep the cost of
    # formatting and writing them, as in production, but send them to a file.
    handler = logging.FileHandler(scratch / "listdelivery.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("listdelivery").handlers = [handler]
    if migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)


def _check_database(database_url: str) -> None:
    """Refuse to run if the settings module ignored DATABASE_URL (never touch a real database)."""
    import environ
    from django.db import connection

    wanted = environ.Env.db_url_config(database_url)
    actual = connection.settings_dict
    if str(actual["NAME"]) != str(wanted["NAME"]) or actual["ENGINE"] != wanted["ENGINE"]:
        raise SystemExit(
            f"The settings module {os.environ['DJANGO_SETTINGS_MODULE']} does not take its "
            f"database from DATABASE_URL (it uses {actual['NAME']!r}); refusing to run."
        )


def database_label() -> str:
    from django.db import connection

    name = connection.settings_dict["NAME"]
    version = ""
    if connection.vendor == "sqlite":
        import sqlite3

        version = f" {sqlite3.sqlite_version}"
    return f"{connection.vendor}{version} ({name})"


# -- the sink -------------------------------------------------------------------


class Sink:
    """A sink process and how to read its counters."""

    name = "?"
    counts_recipients = True

    def __init__(self, *, pipelining: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.pipelining = pipelining
        self.process: subprocess.Popen | None = None

    @property
    def label(self) -> str:
        return f"{self.name}, {'PIPELINING advertised' if self.pipelining else 'no PIPELINING'}"

    def counts(self) -> tuple[int, int | None]:
        raise NotImplementedError

    def cpu_seconds(self) -> float | None:
        """CPU time the sink process has used (Linux), to see how much of the machine it takes."""
        return process_cpu_seconds(self.process.pid) if self.process else None

    def wait_for(self, messages: int, timeout: float = 5.0) -> tuple[int, int | None]:
        """The counters once they reach ``messages`` (a sink may report with a short delay)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if counts[0] >= messages or time.monotonic() > deadline:
                return counts
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class AsyncioSink(Sink):
    name = "asyncio sink (bench.sink)"

    def start(self) -> AsyncioSink:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "bench.sink", "--host", self.host]
        command += ["--port", "0"] + (["--pipelining"] if self.pipelining else [])
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.process.stdout.readline().split()
        if len(line) != 3 or line[0] != "LISTENING":
            self.stop()
            raise SystemExit(f"The SMTP sink did not start (it said {line!r}).")
        self.port = int(line[2])
        return self

    def counts(self) -> tuple[int, int | None]:
        with smtplib.SMTP(self.host, self.port, timeout=10) as smtp:
            code, reply = smtp.docmd("XCOUNT")
        if code != 250:
            raise CorrectnessError(f"the sink answered XCOUNT with {code} {reply!r}")
        messages, recipients, *_ = (int(n) for n in reply.split())
        return messages, recipients


class PostfixSink(Sink):
    """Postfix's smtp-sink, whose ``-c`` counters say how many messages ended with ".".

    It does not count recipients, so only messages are checked against it.
    """

    name = f"Postfix smtp-sink ({SMTP_SINK})"
    counts_recipients = False

    def start(self) -> PostfixSink:
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            self.port = probe.getsockname()[1]
        command = [str(SMTP_SINK), "-c"] + ([] if self.pipelining else ["-p"])
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # required when started as root
        command += [f"{self.host}:{self.port}", "256"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._messages = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read_counters, daemon=True).start()
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    error = (
                        self.process.stderr.read().decode(errors="replace")
                        if self.process.poll() is not None
                        else ""
                    )
                    self.stop()
                    raise SystemExit(f"smtp-sink did not start: {error.strip()}") from None
                time.sleep(0.05)
        return self

    def _read_counters(self) -> None:
        pattern = re.compile(rb"mesg=(\d+)")
        pending = b""
        while True:
            chunk = self.process.stdout.read1(4096)
            if not chunk:
                return
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in records:
                match = pattern.search(record)
                if match:
                    with self._lock:
                        self._messages = int(match[1])

    def counts(self) -> tuple[int, int | None]:
        with self._lock:
            return self._messages, None


def process_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackgroundLoad:
    """How much CPU processes other than the benchmark's used while it ran (Linux)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        return busy, ours + (self.sink.cpu_seconds() or 0.0), time.monotonic()

    def background_cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, ours, wall = (b - a for a, b in zip(self.start, end, strict=True))
        return round(max(busy - ours, 0.0) / wall, 2) if wall > 0 else None


def start_sink(kind: str, *, pipelining: bool = False) -> Sink:
    if kind == "smtp-sink" or (kind == "auto" and SMTP_SINK.exists()):
        if not SMTP_SINK.exists():
            raise SystemExit(f"{SMTP_SINK} is not installed (Debian's postfix package has it).")
        return PostfixSink(pipelining=pipelining).start()
    return AsyncioSink(pipelining=pipelining).start()


# -- messages and data ------------------------------------------------------------


def post_bytes(number: int, list_address: str, size: int = 2048) -> bytes:
    """A plain-text post of about ``size`` bytes, LF line endings as the pipeline stores them."""
    headers = (
        "From: Anne Person <anne@example.org>\n"
        f"To: {list_address}\n"
        f"Subject: Benchmark post number {number}\n"
        f"Message-ID: <bench-{number}-{os.getpid()}@example.org>\n"
        "Date: Mon, 24 Nov 2025 08:00:00 +0000\n"
        "MIME-Version: 1.0\n"
        'Content-Type: text/plain; charset="us-ascii"\n'
        "Content-Transfer-Encoding: 7bit\n"
        f"List-Id: <{list_address.replace('@', '.')}>\n"
        "\n"
    )
    lines = max(1, (size - len(headers)) // len(BODY_LINE))
    return (headers + BODY_LINE * lines).encode()


def member_address(index: int) -> str:
    return f"member{index:06d}@{DOMAINS[index % len(DOMAINS)]}"


def member_name(index: int) -> str:
    # One in twenty names is not ASCII, so some To: lines are RFC 2047-encoded.
    return f"Zoë Müller {index}" if index % 20 == 0 else f"Member Number {index}"


#: The personalized runs carry a footer with member data and a one-click unsubscribe link,
#: as a real personalized list would: each copy gets its own footer and List-Unsubscribe.
PERSONAL_FOOTER = (
    "_______________________________________________\n"
    "$display_name mailing list -- $listname\n"
    "You receive this as $user_name_or_address <$user_address>.\n"
    "Unsubscribe: $unsubscribe_url\n"
)
UNSUBSCRIBE_BASE_URL = "https://lists.example.com"


def create_list(address: str, personalize: str, members: int):
    from listdelivery.models import MailingList, Member, Personalization

    footer = PERSONAL_FOOTER if personalize != Personalization.NONE else ""
    mlist = MailingList.objects.create(address=address, personalize=personalize, footer=footer)
    for start in range(0, members, CREATE_CHUNK):
        Member.objects.bulk_create(
            Member(mailing_list=mlist, address=member_address(i), display_name=member_name(i))
            for i in range(start, min(members, start + CREATE_CHUNK))
        )
    return mlist


def flush_tables() -> None:
    """Empty every listdelivery table (fast: no per-row cascade in Python).

    All of them in one flush: PostgreSQL truncates posts only together with the attempts
    that point at them, and each run starts with no hourly totals and no limits' state
    (tokens, learned rates, slots, quotas) left by the one before.
    """
    from django.apps import apps
    from django.core.management.color import no_style
    from django.db import connection

    models = apps.get_app_config("listdelivery").get_models()
    tables = [model._meta.db_table for model in models]
    statements = connection.ops.sql_flush(no_style(), tables, allow_cascade=False)
    connection.ops.execute_sql_flush(statements)


def ensure_empty_database() -> None:
    from listdelivery.models import MailingList, OutgoingMessage

    if MailingList.objects.exists() or OutgoingMessage.objects.exists():
        raise SystemExit(
            "The database given with --database-url holds mailing lists or posts; the benchmark "
            "deletes every listdelivery row between runs, so give it an empty scratch database."
        )


def enqueue(mlist, number: int) -> Any:
    """What Mailman's pipeline does: parse, fill in the recipients, queue."""
    from email import message_from_bytes

    from listdelivery.pipeline import member_recipients, to_outgoing

    msg = message_from_bytes(post_bytes(number, mlist.address))
    msgdata: dict[str, Any] = {}
    member_recipients(mlist, msg, msgdata)
    return to_outgoing(mlist, msg, msgdata, tolist=True)


def expected_bulk_transactions(members: int, max_recipients: int) -> int:
    """Independently of chunkify: one transaction per ``max_recipients`` per TLD bucket."""
    from listdelivery.delivery.bulk import CHUNKMAP

    buckets = Counter(CHUNKMAP.get(member_address(i).rsplit(".", 1)[1], 0) for i in range(members))
    return sum(math.ceil(size / max_recipients) for size in buckets.values())


# -- measurements -----------------------------------------------------------------


@dataclass
class Sample:
    """One timed delivery (or baseline pass)."""

    seconds: float
    transactions: int
    recipients: int
    posts: int = 1
    enqueue_seconds: float | None = None
    client_cpu: float | None = None  # CPU seconds of this process, all threads
    sink_cpu: float | None = None  # CPU seconds of the sink process
    ratio: float | None = None  # transactions/s over the same round's baseline
    recipient_ratio: float | None = None  # recipients/s over the same round's baseline

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds


class Stopwatch:
    """Wall time and CPU time (this process and the sink) around one timed section."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def __enter__(self) -> Stopwatch:
        times = os.times()
        self._cpu = times.user + times.system
        self._sink = self.sink.cpu_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.seconds = time.perf_counter() - self._wall
        times = os.times()
        self.client_cpu = times.user + times.system - self._cpu
        after = self.sink.cpu_seconds()
        self.sink_cpu = after - self._sink if after is not None and self._sink is not None else None


@dataclass
class Scenario:
    key: str
    label: str
    kind: str  # baseline, personalized, bulk, many
    n: int
    run: Callable[[], Sample]
    config: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Row:
    scenario: str
    n: int
    seconds: float
    messages: int
    recipients: int
    posts: int = 1
    samples: list[float] = field(default_factory=list)
    ratio: float | None = None
    recipient_ratio: float | None = None
    target: str = ""
    met: str = ""
    note: str = ""
    client_cpu_us: float | None = None  # per SMTP transaction
    sink_cpu_us: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

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
        for key in ("ratio", "recipient_ratio", "client_cpu_us", "sink_cpu_us"):
            if data[key] is not None:
                data[key] = round(data[key], 3 if "ratio" in key else 1)
        return data


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def scenario_row(scenario: Scenario) -> Row:
    samples = scenario.samples
    first = samples[0]
    per_transaction = [
        (s.client_cpu / s.transactions * 1e6 if s.client_cpu is not None else None) for s in samples
    ]
    sink_per_transaction = [
        (s.sink_cpu / s.transactions * 1e6 if s.sink_cpu is not None else None) for s in samples
    ]
    return Row(
        scenario=scenario.label,
        n=scenario.n,
        seconds=statistics.median(s.seconds for s in samples),
        messages=first.transactions,
        recipients=first.recipients,
        posts=first.posts,
        samples=[s.seconds for s in samples],
        ratio=_median([s.ratio for s in samples]),
        recipient_ratio=_median([s.recipient_ratio for s in samples]),
        client_cpu_us=_median(per_transaction),
        sink_cpu_us=_median(sink_per_transaction),
        config=dict(scenario.config),
    )


def enqueue_row(label: str, scenarios: list[Scenario]) -> Row:
    samples = [s for scenario in scenarios for s in scenario.samples]
    seconds = [s.enqueue_seconds for s in samples if s.enqueue_seconds is not None]
    first = samples[0]
    return Row(
        scenario=label,
        n=scenarios[0].n,
        seconds=statistics.median(seconds),
        messages=0,
        recipients=first.recipients,
        posts=first.posts,
        samples=seconds,
        note="member_recipients + to_outgoing: rows written, nothing sent",
    )


class Bench:
    def __init__(self, options: argparse.Namespace, sink: Sink, scratch: Path) -> None:
        self.options = options
        self.sink = sink
        self.scratch = scratch
        self.rows: list[Row] = []
        self.baseline: Row | None = None
        self.diagnostics: dict[str, Any] = {}
        self.memory: dict[str, Any] = {}
        self._baseline_messages: list[tuple[str, str, bytes]] = []

    def config(self, **values: Any) -> dict[str, Any]:
        return {
            "SMTP_HOST": self.sink.host,
            "SMTP_PORT": self.sink.port,
            "ENQUEUE_TASKS": False,  # the benchmark runs the runner itself, not a cluster
            **values,
        }

    def progress(self, text: str) -> None:
        print(f"  … {text}", file=sys.stderr, flush=True)

    # -- checks -------------------------------------------------------------

    def check_sink(
        self, before: tuple[int, int | None], messages: int, recipients: int, what: str
    ) -> None:
        after = self.sink.wait_for(before[0] + messages)
        got = after[0] - before[0]
        if got != messages:
            raise CorrectnessError(f"{what}: the sink received {got} messages, expected {messages}")
        if after[1] is not None and before[1] is not None:
            got = after[1] - before[1]
            if got != recipients:
                raise CorrectnessError(
                    f"{what}: the sink received {got} recipients, expected {recipients}"
                )

    def check_database(self, posts: int, recipients: int, what: str) -> None:
        from listdelivery.models import OutgoingMessage, OutgoingRecipient

        delivered = OutgoingMessage.objects.filter(status=OutgoingMessage.Status.DELIVERED).count()
        sent = OutgoingRecipient.objects.filter(status=OutgoingRecipient.Status.SENT).count()
        if delivered != posts or sent != recipients:
            raise CorrectnessError(
                f"{what}: {delivered} of {posts} posts delivered, "
                f"{sent} of {recipients} recipients sent"
            )

    @staticmethod
    def check_summary(summary, transactions: int, recipients: int, posts: int, what: str) -> None:
        if (summary.transactions, summary.recipients, summary.delivered) != (
            transactions,
            recipients,
            posts,
        ):
            raise CorrectnessError(
                f"{what}: the runner reported {summary}; expected {posts} delivered, "
                f"{recipients} recipients in {transactions} transactions"
            )

    # -- the scenarios, each one timed run ------------------------------------------------

    def scenarios(self) -> list[Scenario]:
        """Every timed scenario of this run, baseline first."""
        options = self.options
        n, posts = options.members, options.posts
        widest = max(options.connections)
        few = sorted({1, widest})
        found = [
            Scenario(
                "baseline",
                "baseline (raw smtplib, 1 conn)",
                "baseline",
                n,
                lambda: self.baseline_once(n),
            )
        ]
        if "personalized" in options.only:
            found += [
                Scenario(
                    f"personalized-{c}",
                    f"personalized, {c} conn",
                    "personalized",
                    n,
                    lambda c=c: self.personalized_once(n, c)[0],
                    {"connections": c},
                )
                for c in options.connections
            ]
        if "bulk" in options.only:
            found += [
                Scenario(
                    f"bulk-{mr}-{c}",
                    f"bulk, max_rcpt {mr}, {c} conn",
                    "bulk",
                    n,
                    lambda mr=mr, c=c: self.bulk_once(n, mr, c),
                    {"max_recipients": mr, "connections": c},
                )
                for mr in (10, 500)
                for c in few
            ]
        if "many" in options.only:
            found += [
                Scenario(
                    f"many-{c}",
                    f"many posts, {c} conn",
                    "many",
                    posts,
                    lambda c=c: self.many_once(posts, c),
                    {"connections": c},
                )
                for c in few
            ]
        return found

    def warm_up(self) -> None:
        """One small untimed pass of each kind: imports, connections, caches."""
        self.progress("warming up")
        options = self.options
        self.baseline_once(min(200, options.members))
        if "personalized" in options.only:
            self.personalized_once(min(options.members, 50), max(options.connections))
        if "bulk" in options.only:
            self.bulk_once(min(options.members, 50), 10, 1)
        if "many" in options.only:
            self.many_once(min(options.posts, 20), 1)

    def run_rounds(self) -> None:
        """Every scenario once per round, the baseline first: load that drifts hits all alike."""
        scenarios = self.scenarios()
        self.warm_up()
        for number in range(1, self.options.repeat + 1):
            baseline: Sample | None = None
            for scenario in scenarios:
                self.progress(f"round {number}/{self.options.repeat}: {scenario.label}")
                sample = scenario.run()
                if scenario.kind == "baseline":
                    baseline = sample
                sample.ratio = sample.rate / baseline.rate
                sample.recipient_ratio = sample.recipients / sample.seconds / baseline.rate
                scenario.samples.append(sample)
        self._rows_for(scenarios)

    def _rows_for(self, scenarios: list[Scenario]) -> None:
        kinds: dict[str, list[Scenario]] = {}
        for scenario in scenarios:
            kinds.setdefault(scenario.kind, []).append(scenario)
        for kind, group in kinds.items():
            for scenario in group:
                row = scenario_row(scenario)
                self._judge(kind, row)
                self.rows.append(row)
                if kind == "baseline":
                    self.baseline = row
            if kind != "baseline":
                self.rows.append(enqueue_row(f"  enqueue ({kind})", group))

    @staticmethod
    def _judge(kind: str, row: Row) -> None:
        connections = row.config.get("connections", 1)
        if kind == "baseline":
            row.note = "sendmail() of pre-rendered ~2 KB messages, one RCPT each"
        elif kind == "personalized":
            row.note = (
                "full personalization + VERP + a member footer and one-click unsubscribe: "
                "one transaction per member"
            )
            if connections > 1:
                row.target = f">={TARGET_PERSONALIZED}x (aim {AIM_PERSONALIZED}x)"
                row.met = _met(row.ratio, TARGET_PERSONALIZED, AIM_PERSONALIZED)
        elif kind == "bulk":
            row.note = "msgs/s = SMTP transactions/s; the target is on transactions"
            row.target = f">={TARGET_BULK}x txn/s"
            row.met = f"{_met(row.ratio, TARGET_BULK)} (rcpts/s {row.recipient_ratio:.2f}x)"
        elif kind == "many":
            row.note = "deliver_pending; one 3-RCPT transaction per post; N = posts"
            row.target = f">={TARGET_POSTS_PER_SECOND} posts/s"
            row.met = (
                f"{_met(row.posts_per_second, TARGET_POSTS_PER_SECOND)} "
                f"({row.posts_per_second:,.0f}/s)"
            )

    def ratio_to_baseline(self, row: Row) -> float | None:
        if not self.baseline or not self.baseline.messages_per_second:
            return None
        return row.messages_per_second / self.baseline.messages_per_second

    # -- 1. baseline ------------------------------------------------------------

    def baseline_once(self, n: int) -> Sample:
        if len(self._baseline_messages) < n:
            self._baseline_messages = _baseline_messages(n)
        messages = self._baseline_messages[:n]
        before = self.sink.counts()
        with Stopwatch(self.sink) as watch:
            with smtplib.SMTP(self.sink.host, self.sink.port, timeout=60) as smtp:
                for sender, recipient, message in messages:
                    smtp.sendmail(sender, [recipient], message)
        self.check_sink(before, n, n, "baseline")
        return _sample(watch, n, n)

    # -- 2. personalized ----------------------------------------------------------

    def personalized_once(self, n: int, connections: int) -> tuple[Sample, Any]:

        from listdelivery.models import Personalization

        flush_tables()
        mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
        config = self.config(
            SMTP_CONNECTIONS=connections,
            VERP_PERSONALIZED_DELIVERIES=True,
            UNSUBSCRIBE_BASE_URL=UNSUBSCRIBE_BASE_URL,
        )
        what = f"personalized, {n} members, {connections} connections"
        return self.deliver_one_post(mlist, config, n, n, what)

    # -- 3. bulk --------------------------------------------------------------------

    def bulk_once(self, n: int, max_recipients: int, connections: int) -> Sample:

        from listdelivery.models import Personalization

        flush_tables()
        mlist = create_list(BULK_LIST, Personalization.NONE, n)
        transactions = expected_bulk_transactions(n, max_recipients)
        config = self.config(SMTP_CONNECTIONS=connections, MAX_RECIPIENTS=max_recipients)
        what = f"bulk, {n} members, MAX_RECIPIENTS {max_recipients}, {connections} connections"
        return self.deliver_one_post(mlist, config, transactions, n, what)[0]

    def deliver_one_post(
        self, mlist: Any, config: dict[str, Any], transactions: int, n: int, what: str
    ) -> tuple[Sample, Any]:
        """Queue one post (timed apart), deliver it (timed) and check every count."""
        from django.test.utils import override_settings

        from listdelivery.runner import OutgoingRunner

        with override_settings(LISTDELIVERY=config):
            began = time.perf_counter()
            enqueue(mlist, 1)
            queued = time.perf_counter() - began
            before = self.sink.counts()
            with Stopwatch(self.sink) as watch:
                summary = OutgoingRunner().run()
        self.check_summary(summary, transactions, n, 1, what)
        self.check_sink(before, transactions, n, what)
        self.check_database(1, n, what)
        return _sample(watch, transactions, n, enqueue_seconds=queued), summary

    # -- 4. many posts ----------------------------------------------------------------

    def many_once(self, posts: int, connections: int) -> Sample:
        from django.core.management import call_command
        from django.test.utils import override_settings

        from listdelivery.models import Personalization

        flush_tables()
        mlist = create_list(SMALL_LIST, Personalization.NONE, 0)
        _three_members(mlist)
        config = self.config(SMTP_CONNECTIONS=connections)
        with override_settings(LISTDELIVERY=config):
            began = time.perf_counter()
            for number in range(posts):
                enqueue(mlist, number)
            queued = time.perf_counter() - began
            before = self.sink.counts()
            with Stopwatch(self.sink) as watch:
                call_command("deliver_pending", verbosity=0)
        what = f"many posts, {posts} posts, {connections} connections"
        self.check_sink(before, posts, 3 * posts, what)
        self.check_database(posts, 3 * posts, what)
        return _sample(watch, posts, 3 * posts, posts=posts, enqueue_seconds=queued)

    # -- 5. memory --------------------------------------------------------------------

    def run_memory(self) -> None:
        large = self.options.memory_members
        sizes = [large, max(1, large // 10)]
        results: dict[int, dict[str, Any]] = {}
        for n in sizes:
            results[n] = {}
            for phase in ("enqueue", "deliver"):
                self.progress(f"memory: {phase} a personalized post to {n} members (fresh process)")
                if phase == "enqueue":
                    flush_tables()
                before = self.sink.counts()
                report = self._memory_child(n, phase)
                if phase == "deliver":
                    self.check_sink(before, n, n, f"memory, {n} members")
                    self.check_database(1, n, f"memory, {n} members")
                results[n][phase] = report
        flush_tables()
        self.memory = {"sizes": sizes, "results": {str(n): r for n, r in results.items()}}
        small = sizes[1]
        for phase in ("deliver", "enqueue"):
            big, little = results[large][phase], results[small][phase]
            peak_mb = big["peak_kb"] / 1024
            growth_big = big["peak_kb"] - big["before_kb"]
            growth_small = little["peak_kb"] - little["before_kb"]
            # Linear growth would make the rise above the start ten times the N/10 one; a rise
            # below MEMORY_NOISE_KB is within what the allocator already holds, not a trend.
            linear = growth_big >= (large / small) * max(growth_small, MEMORY_NOISE_KB)
            per_member = (big["peak_kb"] - little["peak_kb"]) * 1024 / max(large - small, 1)
            row = Row(
                scenario=(
                    f"memory: deliver ({self.options.child_connections} conn)"
                    if phase == "deliver"
                    else "memory: enqueue"
                ),
                n=large,
                seconds=big["seconds"],
                messages=big.get("transactions", 0),
                recipients=large,
                samples=[big["seconds"]],
                config={"connections": self.options.child_connections, "phase": phase},
            )
            row.ratio = self.ratio_to_baseline(row) if phase == "deliver" else None
            row.target = f"<{TARGET_PEAK_MB} MB, sublinear"
            row.met = (
                f"{'yes' if peak_mb < TARGET_PEAK_MB and not linear else 'NO'} "
                f"({peak_mb:.0f} MB; +{growth_big / 1024:.0f} MB, "
                f"+{growth_small / 1024:.0f} MB at N/10)"
            )
            row.note = (
                f"peak {peak_mb:.1f} MB from {big['before_kb'] / 1024:.1f} MB at the start; "
                f"N/10: peak {little['peak_kb'] / 1024:.1f} MB from "
                f"{little['before_kb'] / 1024:.1f} MB; {per_member:.0f} bytes per extra member"
            )
            self.memory[f"{phase}_bytes_per_member"] = round(per_member)
            self.memory[f"{phase}_linear"] = linear
            self.rows.append(row)

    def _memory_child(self, n: int, phase: str) -> dict[str, Any]:
        command = [
            sys.executable,
            "-m",
            "bench",
            "--_memory-child",
            str(n),
            "--_memory-phase",
            phase,
            "--_sink",
            f"{self.sink.host}:{self.sink.port}",
            "--_connections",
            str(self.options.child_connections),
            "--_scratch",
            str(self.scratch),
            "--database-url",
            os.environ["DATABASE_URL"],
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.getcwd())
        for line in done.stdout.splitlines():
            if line.startswith(MEMORY_TAG):
                return json.loads(line[len(MEMORY_TAG) :])
        raise CorrectnessError(
            f"the memory child ({phase}, {n}) failed with status {done.returncode}:\n"
            f"{done.stderr[-3000:]}"
        )

    # -- diagnostics: queries and profiles ----------------------------------------------

    def run_query_counts(self) -> None:
        """Untimed: how many queries a post (many posts) and a batch (personalized) cost."""
        self.progress("counting database queries")
        if "many" in self.options.only:
            self._count_many_posts_queries()
        if "personalized" in self.options.only:
            self._count_personalized_queries()
        flush_tables()

    def _count_many_posts_queries(self) -> None:
        """Queries per post in deliver_pending (and to queue it)."""
        from django.core.management import call_command
        from django.db import connection
        from django.test.utils import CaptureQueriesContext, override_settings

        from listdelivery.models import Personalization

        posts = min(self.options.posts, 200)
        flush_tables()
        mlist = create_list(SMALL_LIST, Personalization.NONE, 0)
        _three_members(mlist)
        with override_settings(LISTDELIVERY=self.config()):
            with CaptureQueriesContext(connection) as queued:
                for number in range(posts):
                    enqueue(mlist, number)
            with CaptureQueriesContext(connection) as delivered:
                call_command("deliver_pending", verbosity=0)
        self.check_database(posts, 3 * posts, "query count, many posts")
        self.diagnostics["many_posts"] = {
            "posts": posts,
            "enqueue_queries": len(queued),
            "enqueue_queries_per_post": round(len(queued) / posts, 2),
            "deliver_queries": len(delivered),
            "deliver_queries_per_post": round(len(delivered) / posts, 2),
            "deliver_breakdown": _breakdown(delivered.captured_queries),
        }

    def _count_personalized_queries(self) -> None:
        """Queries per checkpoint batch of a personalized post."""
        from django.db import connection
        from django.test.utils import CaptureQueriesContext, override_settings

        from listdelivery.models import Personalization
        from listdelivery.runner import OutgoingRunner

        n = min(self.options.members, 2000)
        flush_tables()
        mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
        config = self.config(
            VERP_PERSONALIZED_DELIVERIES=True, UNSUBSCRIBE_BASE_URL=UNSUBSCRIBE_BASE_URL
        )
        with override_settings(LISTDELIVERY=config):
            from listdelivery import conf

            batch = conf.get("CHECKPOINT_EVERY")
            with CaptureQueriesContext(connection) as queued:
                enqueue(mlist, 1)
            with CaptureQueriesContext(connection) as delivered:
                summary = OutgoingRunner().run()
        self.check_summary(summary, n, n, 1, "query count, personalized")
        batches = math.ceil(n / batch)
        self.diagnostics["personalized"] = {
            "members": n,
            "checkpoint_every": batch,
            "batches": batches,
            "enqueue_queries": len(queued),
            "deliver_queries": len(delivered),
            "deliver_queries_per_batch": round(len(delivered) / batches, 2),
            "deliver_breakdown": _breakdown(delivered.captured_queries),
        }

    def run_profiles(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.diagnostics["profiles"] = {}
        jobs: list[tuple[str, Callable[[], Any]]] = []
        if "personalized" in self.options.only:
            jobs.append(("personalized", lambda: self.personalized_once(self.options.members, 1)))
        if "many" in self.options.only:
            jobs.append(("many_posts", lambda: self.many_once(self.options.posts, 1)))
        for name, job in jobs:
            self.progress(f"profiling {name} (1 connection, cProfile)")
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
            self.diagnostics["profiles"][name] = {"file": str(path), "top": stream.getvalue()}
        flush_tables()


def _three_members(mlist) -> None:
    from listdelivery.models import Member

    Member.objects.bulk_create(
        Member(
            mailing_list=mlist, address=f"{name.lower()}@example.com", display_name=f"{name} Person"
        )
        for name in ("Anne", "Bart", "Cris")
    )


def _sample(watch: Stopwatch, transactions: int, recipients: int, **extra: Any) -> Sample:
    return Sample(
        watch.seconds,
        transactions,
        recipients,
        client_cpu=watch.client_cpu,
        sink_cpu=watch.sink_cpu,
        **extra,
    )


def _baseline_messages(n: int) -> list[tuple[str, str, bytes]]:
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


def _breakdown(queries: list[dict[str, str]]) -> list[tuple[str, int]]:
    """Queries grouped by their first words and table, most frequent first."""
    kinds: Counter[str] = Counter()
    for query in queries:
        sql = query["sql"]
        table = re.search(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', sql, re.IGNORECASE)
        verb = sql.split(None, 1)[0].upper() if sql.strip() else "?"
        if verb == "SELECT" and "COUNT(" in sql.upper():
            verb = "SELECT COUNT"
        kinds[f"{verb} {table[1] if table else ''}".strip()] += 1
    return kinds.most_common()


def _met(value: float | None, target: float, aim: float | None = None) -> str:
    if value is None:
        return "?"
    if value < target:
        return "NO"
    if aim is not None and value >= aim:
        return "yes, aim met"
    return "yes"


# -- output -------------------------------------------------------------------------


def header_lines(meta: dict[str, Any]) -> list[str]:
    return [
        f"listdelivery benchmark, {meta['date']}",
        f"python {meta['python']}, Django {meta['django']}, {meta['platform']}",
        f"machine: {meta['cores']} cores (load average {meta['loadavg']})",
        f"sink: {meta['sink']}",
        f"database: {meta['database']}",
        f"sizes: {meta['members']} members, {meta['posts']} posts, "
        f"{meta['memory_members']} memory members; median of {meta['repeat']}; "
        f"connections {','.join(map(str, meta['connections']))}",
    ]


def render_table(rows: list[Row]) -> str:
    headers = ("scenario", "N", "seconds", "msgs/s", "rcpts/s", "ratio", "target", "met?")
    lines = [
        (
            row.scenario,
            f"{row.n:,}",
            f"{row.seconds:.3f}",
            f"{row.messages_per_second:,.0f}" if row.messages else "-",
            f"{row.recipients_per_second:,.0f}",
            f"{row.ratio:.2f}x" if row.ratio is not None else "-",
            row.target or "-",
            row.met or "-",
        )
        for row in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines, strict=True)]
    right = {1, 2, 3, 4, 5}

    def fmt(values) -> str:
        return "  ".join(
            str(v).rjust(w) if i in right else str(v).ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in lines)])


def render_cpu_table(rows: list[Row]) -> str:
    """Where the CPU goes per SMTP transaction: this process (all threads) and the sink."""
    headers = ("scenario", "client CPU us/msg", "sink CPU us/msg", "client+sink")
    lines = [
        (
            row.scenario,
            f"{row.client_cpu_us:,.0f}",
            f"{row.sink_cpu_us:,.0f}" if row.sink_cpu_us is not None else "-",
            f"{row.client_cpu_us + (row.sink_cpu_us or 0):,.0f}",
        )
        for row in rows
        if row.client_cpu_us is not None
    ]
    if not lines:
        return ""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines, strict=True)]

    def fmt(values) -> str:
        return "  ".join(
            str(v).ljust(w) if i == 0 else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in lines)])


def render_diagnostics(diagnostics: dict[str, Any]) -> str:
    out = []
    many = diagnostics.get("many_posts")
    if many:
        out.append(
            f"queries, many posts ({many['posts']} posts): "
            f"{many['deliver_queries_per_post']} per post delivered, "
            f"{many['enqueue_queries_per_post']} per post queued"
        )
        out.append("  " + ", ".join(f"{k} {v}" for k, v in many["deliver_breakdown"]))
    personalized = diagnostics.get("personalized")
    if personalized:
        out.append(
            f"queries, personalized ({personalized['members']} members, batches of "
            f"{personalized['checkpoint_every']}): {personalized['deliver_queries_per_batch']} "
            f"per batch ({personalized['deliver_queries']} in {personalized['batches']} batches); "
            f"{personalized['enqueue_queries']} to queue"
        )
        out.append("  " + ", ".join(f"{k} {v}" for k, v in personalized["deliver_breakdown"]))
    chart = diagnostics.get("dashboard")
    if chart:
        out.append(
            f"dashboard, 30-day chart over {chart['recipient_rows']:,} recipient rows: COUNT by "
            f"day {chart['old_ms']} ms, hourly totals {chart['new_ms']} ms ({chart['ratio']}x)"
        )
    shaped = diagnostics.get("shaped")
    if shaped:
        out.extend(render_shaped(shaped))
    xverp = diagnostics.get("xverp")
    if xverp:
        out.append(render_xverp(xverp))
    return "\n".join(out)


def render_xverp(xverp: dict[str, Any]) -> str:
    if "skipped" in xverp:
        return f"xverp: skipped, {xverp['skipped']}"
    copies = xverp["one_copy_each"]
    lines = [
        f"xverp, VERP'd post to {xverp['members']:,} members through Postfix, "
        f"{xverp['connections']} connections: one copy each {copies['recipients_per_second']:,.0f}"
        f" recipients/s ({copies['seconds']} s, {copies['transactions']:,} transactions); "
        f"target {xverp['target']}"
    ]
    for chunks in xverp["xverp"]:
        lines.append(
            f"  chunks of {chunks['max_recipients']} with XVERP: "
            f"{chunks['recipients_per_second']:,.0f}/s ({chunks['seconds']} s, "
            f"{chunks['transactions']:,} transactions), {chunks['ratio']}x: "
            f"{'yes' if chunks['met'] else 'NO'}"
        )
    lines.append(
        "  Postfix then delivered every copy in "
        + ", ".join(f"{r['postfix_delivery_seconds']} s" for r in [copies, *xverp["xverp"]])
    )
    return "\n".join(lines)


def render_shaped(shaped: dict[str, Any]) -> list[str]:
    mix, high, right = shaped["mix"], shaped["rate_too_high"], shaped["rate_right"]
    groups = ", ".join(
        f"{name} {group['members']:,} by {group['last_seconds']} s"
        + (f" (least {group['least_seconds']} s)" if group["least_seconds"] else "")
        for name, group in mix["groups"].items()
    )
    return [
        f"shaped, destination mix of {mix['members']:,} members with the shipped pack, 1 process: "
        f"last recipient after {mix['seconds']} s, {mix['ratio']}x the least the limits allow "
        f"({mix['least_seconds']} s)",
        f"  {groups}",
        f"shaped, SMTP_RATE {high['smtp_rate']} at a sink taking {high['sink_rate']}/s, "
        f"{high['members']:,} members, {high['processes']} processes: {high['seconds']} s "
        f"({high['ratio']}x the {high['least_seconds']} s the sink allows), "
        f"{high['throttled_share']:.1%} throttled ({high['throttled']}); target "
        f"{high['target']}: {'yes' if high['met'] else 'NO'}"
        + (f" ({high['deferred']} recipient(s) deferred to a retry)" if high["deferred"] else ""),
        f"shaped, SMTP_RATE {right['smtp_rate']}, {right['members']:,} members in 2 posts, "
        f"{right['processes']} processes: busiest second {right['busiest_second']}, mean "
        f"{right['mean_rate']}/s; target {right['target']}: {'yes' if right['met'] else 'NO'}"
        + ("" if right["processes_sent_together"] else " (the processes did not overlap)"),
    ]


# -- the memory child -----------------------------------------------------------------


def _memory_kb() -> dict[str, int]:
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


def memory_child(options: argparse.Namespace) -> int:
    """One phase of a personalized post to N members, in a fresh process; prints peak RSS."""
    scratch = Path(options.scratch or tempfile.gettempdir())
    prepare_django(options.database_url, scratch, migrate=False)
    from django.test.utils import override_settings

    from listdelivery.models import MailingList, Personalization
    from listdelivery.runner import OutgoingRunner

    n = options.memory_child
    host, _, port = options.sink_address.rpartition(":")
    config = {
        "SMTP_HOST": host,
        "SMTP_PORT": int(port),
        "SMTP_CONNECTIONS": options.child_connections,
        "VERP_PERSONALIZED_DELIVERIES": True,
        "UNSUBSCRIBE_BASE_URL": UNSUBSCRIBE_BASE_URL,
        "ENQUEUE_TASKS": False,
    }
    report: dict[str, Any] = {"phase": options.memory_phase, "members": n}
    with override_settings(LISTDELIVERY=config):
        if options.memory_phase == "enqueue":
            start = _memory_kb()
            mlist = create_list(PERSONALIZED_LIST, Personalization.FULL, n)
            report["after_members_kb"] = _memory_kb()["peak_kb"]
            began = time.perf_counter()
            enqueue(mlist, 1)
            report["seconds"] = time.perf_counter() - began
        else:
            MailingList.objects.get(address=PERSONALIZED_LIST)  # connect before measuring
            start = _memory_kb()
            began = time.perf_counter()
            summary = OutgoingRunner().run()
            report["seconds"] = time.perf_counter() - began
            report["transactions"] = summary.transactions
            report["recipients"] = summary.recipients
    end = _memory_kb()
    report["before_kb"] = start["peak_kb"]
    report["peak_kb"] = end["peak_kb"]
    report["rss_after_kb"] = end["rss_kb"]
    report["ru_maxrss_before_kb"] = start["ru_maxrss_kb"]
    report["ru_maxrss_after_kb"] = end["ru_maxrss_kb"]
    print(MEMORY_TAG + json.dumps(report), flush=True)
    return 0


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.memory_child:
        return memory_child(options)
    options.child_connections = max(options.connections)

    scratch = Path(tempfile.mkdtemp(prefix="listdelivery-bench-"))
    database_url = options.database_url or f"sqlite:///{scratch / 'bench.sqlite3'}"
    sink: Sink | None = None
    status = 0
    try:
        sink = start_sink(options.sink, pipelining=options.sink_pipelining)
        prepare_django(database_url, scratch, migrate=True)
        if options.database_url:
            ensure_empty_database()
        import django

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
            "repeat": options.repeat,
            "connections": options.connections,
            "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
        }
        print("\n".join(header_lines(meta)), flush=True)
        bench = Bench(options, sink, scratch)
        error = None
        began = time.perf_counter()
        load = BackgroundLoad(sink)
        try:
            bench.run_rounds()
            if "memory" in options.only:
                bench.run_memory()
            bench.run_query_counts()
            if "dashboard" in options.only:
                from bench import dashboard

                rows = options.dashboard_rows or (
                    dashboard.QUICK_ROWS if options.quick else dashboard.FULL_ROWS
                )
                bench.diagnostics["dashboard"] = dashboard.run(rows, bench.progress)
            if "shaped" in options.only:
                from bench import shaped

                members = options.shaped_members or (
                    shaped.QUICK_MEMBERS if options.quick else shaped.FULL_MEMBERS
                )
                rate_members = (
                    shaped.QUICK_RATE_MEMBERS if options.quick else shaped.FULL_RATE_MEMBERS
                )
                bench.diagnostics["shaped"] = shaped.run(members, rate_members, bench.progress)
            if "xverp" in options.only:
                from bench import xverp

                members = options.xverp_members or (
                    xverp.QUICK_MEMBERS if options.quick else xverp.FULL_MEMBERS
                )
                bench.diagnostics["xverp"] = xverp.run(members, bench.progress)
            if options.profile:
                bench.run_profiles(Path(options.json).parent)
        except CorrectnessError as failure:
            error = str(failure)
            status = 1
        meta["wall_seconds"] = round(time.perf_counter() - began, 1)
        meta["background_load"] = load.background_cores()
        meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print()
        print(render_table(bench.rows))
        print()
        print(render_cpu_table(bench.rows))
        print()
        if bench.diagnostics:
            print(render_diagnostics(bench.diagnostics))
        notes = [
            "ratio: msgs/s (SMTP transactions/s) over the baseline's in the same round; the "
            f"median of {options.repeat} rounds.",
            "enqueue rows: member_recipients + to_outgoing, timed apart from delivery.",
        ]
        if meta["background_load"] is not None:
            notes.append(
                f"other processes on this machine used {meta['background_load']:.2f} of its "
                f"{meta['cores']} cores on average during the run (load average at the end: "
                f"{meta['loadavg_end']}); more than ~0.2 makes the figures noisy."
            )
        print("\n".join(notes))
        for name, profile in bench.diagnostics.get("profiles", {}).items():
            print(f"\n== cProfile, {name} ({profile['file']})\n{profile['top']}")
        if error:
            print(f"\nCORRECTNESS CHECK FAILED: {error}", file=sys.stderr)
        result = {
            "meta": meta,
            "baseline_messages_per_second": (
                round(bench.baseline.messages_per_second, 1) if bench.baseline else None
            ),
            "results": [row.as_json() for row in bench.rows],
            "diagnostics": {k: v for k, v in bench.diagnostics.items() if k != "profiles"}
            | {
                "profiles": {k: v["file"] for k, v in bench.diagnostics.get("profiles", {}).items()}
            },
            "memory": bench.memory,
            "error": error,
        }
        path = Path(options.json)
        path.parent.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
