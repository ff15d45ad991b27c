"""A personalized post to a million members, measured process by process.

``python -m bench.million --members 1000000`` makes a scratch SQLite database (or
uses ``--database-url``, which must hold no listdelivery posts), a list whose
posts are personalized as a real one's are (``personalize`` full, VERP, a footer
with member data, the one-click unsubscribe link) and its members. It queues one
post in a fresh process and delivers it in another (or ``--runners`` at once),
each process's peak resident memory read from the kernel as it exits (``wait4``),
checks that the sink received every member exactly once and that every recipient
is marked sent, and prints the figures; :func:`measure` returns them.

The SMTP sink is Postfix's ``smtp-sink`` when installed, writing every
transaction to a dump file that is read back afterwards: each copy's recipient,
VERP'd sender and personal text are checked. Without it, :mod:`bench.sink`
runs, and its counters are compared with the recipient count.

This module imports nothing from the rest of ``bench`` but :mod:`bench.sink`'s
command line, and Django only in the child processes.

Measured on the 2-core development machine (other test runs beside it), SQLite,
1,000,000 members, ``--runners 2``: the list made in 24 s; the enqueue 20 s at
56 MB peak (303 MB and 100 s before the members were streamed); the delivery
535 s (1,869 recipients/s) at 55 MB peak per runner; every copy checked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = Path("/usr/sbin/smtp-sink")
TARGET_MB = 150
REPORT_TAG = "MILLION-REPORT "
CREATE_CHUNK = 10_000

LIST_ADDRESS = "million@lists.example.com"
BOUNCES = "million-bounces@lists.example.com"
DOMAINS = ("example.com", "example.net", "example.org", "mail.example", "example.de")
UNSUBSCRIBE_BASE_URL = "https://lists.example.com"
#: A real personalized list's footer: each copy names its member and carries its own link.
FOOTER = (
    "_______________________________________________\n"
    "$display_name mailing list -- $listname\n"
    "You receive this as $user_name_or_address <$user_address>.\n"
    "Unsubscribe: $unsubscribe_url\n"
)
POST = (
    "From: Anne Person <anne@example.org>\n"
    f"To: {LIST_ADDRESS}\n"
    "Subject: One post to a million members\n"
    "Message-ID: <million-{stamp}@example.org>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n" + "A line of the post, as long as an ordinary line of a letter is.\n" * 24
)
_MEMBER = re.compile(rb"^m(\d+)@")


def member_address(index: int) -> str:
    return f"m{index:07d}@{DOMAINS[index % len(DOMAINS)]}"


def member_name(index: int) -> str:
    # One in twenty names is not ASCII: its To: is RFC 2047-encoded, its footer quoted-printable.
    return f"Zoë Müller {index}" if index % 20 == 0 else f"Member Number {index}"


def verp_sender(address: str) -> str:
    local, domain = BOUNCES.split("@")
    recipient_local, recipient_domain = address.split("@")
    return f"{local}+{recipient_local}={recipient_domain}@{domain}"


# -- the parent: processes, sink, checks ------------------------------------------------


@dataclass
class Phase:
    """One child process (or several at once) as the parent saw it."""

    seconds: float
    peak_kb: int  # the largest ru_maxrss of its processes
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        return self.reports[0]


def measure(
    members: int,
    sink_host: str,
    sink_port: int,
    database_url: str | None,
    scratch: Path,
    *,
    sink_dump: Path | None = None,
    connections: int = 4,
    runners: int = 1,
) -> dict[str, Any]:
    """Create the list, queue the post, deliver it; return the figures and what was wrong.

    ``sink_dump`` is the file a Postfix ``smtp-sink -D`` appends to: when given, every
    copy is checked in it; otherwise the sink must answer ``XCOUNT`` (:mod:`bench.sink`).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{scratch / 'million.sqlite3'}"
    environment = child_environment(database_url, sink_host, sink_port, connections)
    dump_offset = sink_dump.stat().st_size if sink_dump and sink_dump.exists() else 0
    counts_before = None if sink_dump else sink_counts(sink_host, sink_port)

    say(f"creating the list and {members:,} members")
    create = run_children("create", members, environment, scratch)
    say(f"  {create.seconds:.1f} s; queueing the post in a fresh process")
    enqueue = run_children("enqueue", members, environment, scratch)
    say(f"  {enqueue.seconds:.1f} s, peak {enqueue.peak_kb / 1024:.1f} MB; delivering")
    deliver = run_children("deliver", members, environment, scratch, copies=runners)
    say(f"  {deliver.seconds:.1f} s, peak {deliver.peak_kb / 1024:.1f} MB; checking")
    check = run_children("check", members, environment, scratch).report
    if sink_dump:
        received = read_dump(sink_dump, dump_offset, members)
    else:
        after = sink_counts(sink_host, sink_port)
        received = {
            "messages": after[0] - counts_before[0],
            "recipients": after[1] - counts_before[1],
        }

    queued = enqueue.report
    figures: dict[str, Any] = {
        "members": members,
        "database": database_url.split(":", 1)[0],
        "connections": connections,
        "runners": runners,
        "create_seconds": round(create.seconds, 1),
        "create_peak_mb": mb(create.peak_kb),
        "enqueue_seconds": round(queued["seconds"], 2),
        "enqueue_peak_mb": mb(enqueue.peak_kb),
        "enqueue_start_mb": mb(queued["start_kb"]),
        "deliver_seconds": round(deliver.seconds, 1),
        "deliver_peak_mb": mb(deliver.peak_kb),
        "deliver_start_mb": mb(min(report["start_kb"] for report in deliver.reports)),
        "recipients_per_second": round(members / deliver.seconds, 1),
        "transactions": sum(report["transactions"] for report in deliver.reports),
        "post_status": check["post_status"],
        "recipient_statuses": check["statuses"],
        "distinct_recipients": check["distinct"],
        "sink": received,
    }
    figures["problems"] = problems(figures, queued)
    if create.report["members"] != members:
        figures["problems"].insert(0, f"{create.report['members']:,} members were created")
    figures["within_target"] = (
        max(figures["create_peak_mb"], figures["enqueue_peak_mb"], figures["deliver_peak_mb"])
        < TARGET_MB
    )
    return figures


def problems(figures: dict[str, Any], queued: dict[str, Any]) -> list[str]:
    """What says the post did not reach every member exactly once, in words."""
    members, found = figures["members"], []
    if queued["recipients"] != members:
        found.append(f"{queued['recipients']:,} recipients queued for {members:,} members")
    if figures["post_status"] != "delivered":
        found.append(f"the post is {figures['post_status']}, not delivered")
    if figures["recipient_statuses"] != {"sent": members}:
        found.append(f"recipients by status: {figures['recipient_statuses']}")
    if figures["distinct_recipients"] != members:
        found.append(f"{figures['distinct_recipients']:,} distinct recipient addresses")
    sink = figures["sink"]
    if sink["recipients"] != members:
        found.append(f"the sink received {sink['recipients']:,} recipients, not {members:,}")
    for key in ("missing", "twice", "strangers", "not_verp", "not_personal", "no_one_click"):
        if sink.get(key):
            found.append(f"the sink's copies: {key.replace('_', ' ')}: {sink[key]:,}")
    if "messages" in sink and sink["messages"] != members:
        found.append(f"the sink received {sink['messages']:,} copies, not {members:,}")
    return found


def child_environment(database_url: str, host: str, port: int, connections: int) -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        DJANGO_SETTINGS_MODULE="project.settings",
        DATABASE_URL=database_url,
        DEBUG="False",  # DEBUG keeps every query in memory: not a production figure
        LISTDELIVERY_SMTP_HOST=host,
        LISTDELIVERY_SMTP_PORT=str(port),
        LISTDELIVERY_SMTP_CONNECTIONS=str(connections),
        LISTDELIVERY_VERP_PERSONALIZED_DELIVERIES="yes",
        LISTDELIVERY_UNSUBSCRIBE_BASE_URL=UNSUBSCRIBE_BASE_URL,
        LISTDELIVERY_ENQUEUE_TASKS="no",  # the benchmark runs the runner itself
    )
    return environment


def run_children(
    phase: str, members: int, environment: dict[str, str], scratch: Path, copies: int = 1
) -> Phase:
    """Run ``copies`` fresh processes of ``phase`` at once; their time and largest peak RSS."""
    command = [sys.executable, "-m", "bench.million", "--_phase", phase, "--members", str(members)]
    began = time.perf_counter()
    running = []
    for number in range(copies):
        log = scratch / f"{phase}-{number}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, env=environment, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT
            )
        running.append((process, log))
    peak_kb, reports = 0, []
    for process, log in running:
        # wait4 gives this child's own peak RSS; Popen.wait would not.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        peak_kb = max(peak_kb, usage.ru_maxrss)
        text = log.read_text(errors="replace")
        found = [line for line in text.splitlines() if line.startswith(REPORT_TAG)]
        if process.returncode or not found:
            raise SystemExit(
                f"The {phase} process failed (status {process.returncode}):\n{text[-3000:]}"
            )
        reports.append(json.loads(found[-1][len(REPORT_TAG) :]))
    return Phase(time.perf_counter() - began, peak_kb, reports)


def sink_counts(host: str, port: int) -> tuple[int, int]:
    """Messages and recipients :mod:`bench.sink` has taken since it started."""
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        code, reply = smtp.docmd("XCOUNT")
    if code != 250:
        raise SystemExit(f"The sink at {host}:{port} does not count (XCOUNT: {code} {reply!r}).")
    messages, recipients, *_ = (int(n) for n in reply.split())
    return messages, recipients


def read_dump(path: Path, offset: int, members: int) -> dict[str, int]:
    """Every copy in smtp-sink's dump from ``offset``: who got one, how many times, and whether
    it was theirs (the VERP'd sender of its recipient, the recipient's address in the copy at
    least twice, To: and footer, and a one-click List-Unsubscribe)."""
    settled(path)
    if not path.exists():
        raise SystemExit(f"The sink wrote no dump at {path}: it cannot be checked.")
    copies = bytearray(members)  # copies per member, up to 255
    tally = dict.fromkeys(
        ("messages", "recipients", "strangers", "not_verp", "not_personal", "no_one_click"), 0
    )
    message: dict[str, Any] | None = None

    def close(message: dict[str, Any] | None) -> None:
        if message is None:
            return
        tally["messages"] += 1
        recipients = message["recipients"]
        tally["recipients"] += len(recipients)
        for address in recipients:
            match = _MEMBER.match(address)
            index = int(match[1]) if match else -1
            if 0 <= index < members and address == member_address(index).encode():
                copies[index] = min(copies[index] + 1, 255)
            else:
                tally["strangers"] += 1
        if len(recipients) != 1 or message["sender"] != verp_sender(recipients[0].decode()):
            tally["not_verp"] += 1
        if message["mentions"] < 2:
            tally["not_personal"] += 1
        if not message["one_click"]:
            tally["no_one_click"] += 1

    with path.open("rb") as dump:
        dump.seek(offset)
        for line in dump:
            if line.startswith(b"X-Client-Addr:"):
                close(message)
                message = {"recipients": [], "sender": "", "mentions": 0, "one_click": False}
            elif message is None:
                continue
            elif line.startswith(b"X-Rcpt-Args:"):
                message["recipients"].append(_angle(line))
                message["needle"] = message["recipients"][0]
            elif line.startswith(b"X-Mail-Args:"):
                message["sender"] = _angle(line).decode()
            elif line.startswith(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"):
                message["one_click"] = True
            elif message.get("needle") and message["needle"] in line:
                message["mentions"] += 1
    close(message)
    tally["missing"] = copies.count(0)
    tally["twice"] = members - tally["missing"] - copies.count(1)
    return tally


def _angle(line: bytes) -> bytes:
    return line.split(b":", 1)[1].strip().split(b" ", 1)[0].strip(b"<>")


def settled(path: Path) -> None:
    """Wait until the sink has written everything: the dump stops growing for a second."""
    size = -1
    while size != (size := path.stat().st_size if path.exists() else 0):
        time.sleep(1.0)


class OwnSink:
    """A sink process for this run: Postfix's smtp-sink with a dump, or bench.sink."""

    def __init__(self, scratch: Path, kind: str = "auto") -> None:
        self.host = "127.0.0.1"
        self.dump: Path | None = None
        use_postfix = kind == "smtp-sink" or (kind == "auto" and SMTP_SINK.exists())
        if use_postfix:
            self.port = free_port(self.host)
            folder = scratch / "sink"
            folder.mkdir(exist_ok=True)
            if os.geteuid() == 0:  # smtp-sink started as root writes as nobody
                folder.chmod(0o777)
                scratch.chmod(scratch.stat().st_mode | 0o011)
            self.dump = folder / "dump"
            command = [str(SMTP_SINK), "-D", str(self.dump)]
            if os.geteuid() == 0:
                command += ["-u", "nobody"]
            command += [f"{self.host}:{self.port}", "256"]
            self.name = f"Postfix smtp-sink, every copy written to {self.dump}"
            self.process = subprocess.Popen(command, stderr=subprocess.PIPE)
            wait_for_port(self.host, self.port, self.process)
        else:
            self.name = "bench.sink (counts only)"
            environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
            command = [sys.executable, "-m", "bench.sink", "--host", self.host, "--port", "0"]
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, text=True, env=environment
            )
            words = self.process.stdout.readline().split()
            if len(words) != 3 or words[0] != "LISTENING":
                self.stop()
                raise SystemExit(f"The SMTP sink did not start (it said {words!r}).")
            self.port = int(words[2])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for_port(host: str, port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                error = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise SystemExit(f"smtp-sink did not start: {error.strip()}") from None
            time.sleep(0.05)


def mb(kilobytes: int) -> float:
    return round(kilobytes / 1024, 1)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def print_figures(figures: dict[str, Any], sink_name: str) -> None:
    ok = "yes" if figures["within_target"] else "NO"
    print(f"A personalized post to {figures['members']:,} members ({figures['database']}):")
    print(f"  sink: {sink_name}")
    print(f"  create the list: {figures['create_seconds']} s, peak {figures['create_peak_mb']} MB")
    print(
        f"  enqueue:  {figures['enqueue_seconds']} s, peak {figures['enqueue_peak_mb']} MB "
        f"(the process held {figures['enqueue_start_mb']} MB before it began)"
    )
    print(
        f"  deliver:  {figures['deliver_seconds']} s, peak {figures['deliver_peak_mb']} MB "
        f"(from {figures['deliver_start_mb']} MB), {figures['recipients_per_second']:,} "
        f"recipients/s, {figures['transactions']:,} SMTP transactions, "
        f"{figures['connections']} connections, {figures['runners']} runner process(es)"
    )
    print(f"  every process under {TARGET_MB} MB: {ok}")
    print(f"  sink: {figures['sink']}")
    if figures["problems"]:
        print("  NOT CORRECT:\n    " + "\n    ".join(figures["problems"]))
    else:
        print("  correct: every member got one copy of their own, every recipient is sent")
    print(json.dumps(figures))


# -- the children: one phase each, with Django ---------------------------------------------


def peak_kb() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if match:
        return int(match[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(phase: str, members: int) -> dict[str, Any]:
    import django

    django.setup()
    return {"create": create, "enqueue": enqueue, "deliver": deliver, "check": check}[phase](
        members
    )


def create(members: int) -> dict[str, Any]:
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.utils import timezone

    from listdelivery.models import (
        DeliveryStatus,
        MailingList,
        Member,
        OutgoingMessage,
        Personalization,
    )

    call_command("migrate", verbosity=0)
    if (
        MailingList.objects.filter(address=LIST_ADDRESS).exists()
        or OutgoingMessage.objects.exists()
    ):
        raise SystemExit(
            "The database holds posts or the list already: give an empty scratch database."
        )
    mlist = MailingList.objects.create(
        address=LIST_ADDRESS,
        display_name="Million",
        personalize=Personalization.FULL,
        footer=FOOTER,
    )
    # Plain INSERTs: bulk_create takes minutes for a million members, this seconds.
    columns = ("mailing_list_id", "address", "display_name", "delivery_status", "bounce_score")
    columns += ("created_at",)
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(Member._meta.db_table),
        ", ".join(map(quote, columns)),
        ", ".join(["%s"] * len(columns)),
    )
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    for start in range(0, members, CREATE_CHUNK):
        values = [
            (mlist.pk, member_address(i), member_name(i), DeliveryStatus.ENABLED, 0, now)
            for i in range(start, min(members, start + CREATE_CHUNK))
        ]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(sql, values)
    return {"list": mlist.pk, "members": Member.objects.filter(mailing_list=mlist).count()}


def enqueue(members: int) -> dict[str, Any]:
    from email import message_from_string

    from listdelivery.models import MailingList
    from listdelivery.pipeline import member_recipients, to_outgoing

    mlist = MailingList.objects.get(address=LIST_ADDRESS)
    start = peak_kb()
    began = time.perf_counter()
    msg = message_from_string(POST.format(stamp=time.time_ns()))
    msgdata: dict[str, Any] = {}
    member_recipients(mlist, msg, msgdata)
    row = to_outgoing(mlist, msg, msgdata, tolist=True)
    return {
        "seconds": time.perf_counter() - began,
        "recipients": row.recipient_count,
        "start_kb": start,
        "peak_kb": peak_kb(),
    }


def deliver(members: int) -> dict[str, Any]:
    from listdelivery.models import MailingList
    from listdelivery.runner import OutgoingRunner

    MailingList.objects.exists()  # connected before the start is read
    start = peak_kb()
    summary = OutgoingRunner().run()
    return {
        "seconds": summary.seconds,
        "posts": summary.posts,
        "recipients": summary.recipients,
        "transactions": summary.transactions,
        "start_kb": start,
        "peak_kb": peak_kb(),
    }


def check(members: int) -> dict[str, Any]:
    from django.db.models import Count
    from django.db.models.functions import Lower

    from listdelivery.models import OutgoingMessage, OutgoingRecipient

    # The post is the list's first row; shards of it, if any, come after.
    row = OutgoingMessage.objects.filter(mailing_list__address=LIST_ADDRESS).order_by("pk")[0]
    recipients = OutgoingRecipient.objects.filter(message=row)
    statuses = dict(recipients.values_list("status").annotate(n=Count("id")).order_by())
    distinct = recipients.aggregate(n=Count(Lower("address"), distinct=True))["n"]
    return {"post_status": row.status, "statuses": statuses, "distinct": distinct}


# -- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--sink-host", help="an SMTP sink already running (with --sink-port)")
    parser.add_argument("--sink-port", type=int)
    parser.add_argument("--sink-dump", type=Path, help="that sink's smtp-sink -D file, if any")
    parser.add_argument("--sink", choices=("auto", "smtp-sink", "asyncio"), default="auto")
    parser.add_argument("--database-url", help="default: a SQLite file in the scratch directory")
    parser.add_argument("--scratch", type=Path, help="default: a temporary directory, removed")
    parser.add_argument("--connections", type=int, default=4, help="SMTP_CONNECTIONS")
    parser.add_argument("--runners", type=int, default=1, help="delivery processes at once")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--_phase", dest="phase", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.phase:
        print(REPORT_TAG + json.dumps(child(options.phase, options.members)), flush=True)
        return 0
    if options.members < 1:
        parser.error("--members must be at least 1")
    if (options.sink_host is None) != (options.sink_port is None):
        parser.error("give --sink-host and --sink-port together")
    scratch = options.scratch or Path(tempfile.mkdtemp(prefix="listdelivery-million-"))
    scratch.mkdir(parents=True, exist_ok=True)
    sink = None
    try:
        if options.sink_host is None:
            sink = OwnSink(scratch, options.sink)
            host, port, dump, name = sink.host, sink.port, sink.dump, sink.name
        else:
            host, port, dump = options.sink_host, options.sink_port, options.sink_dump
            name = f"{host}:{port}" + (f", dump {dump}" if dump else "")
        figures = measure(
            options.members,
            host,
            port,
            options.database_url,
            scratch,
            sink_dump=dump,
            connections=options.connections,
            runners=options.runners,
        )
    finally:
        if sink:
            sink.stop()
        if options.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print_figures(figures, name)
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
