"""The SMTP sink the benchmark sends to, in a process of its own, and how to read its counters.

Postfix's ``smtp-sink`` when ``/usr/sbin/smtp-sink`` is installed (``--sink auto``), otherwise
the asyncio sink of :mod:`bench.sink`. Both advertise PIPELINING unless told not to.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import REPO_ROOT
from bench.checks import CorrectnessError
from bench.cpu import process_cpu_seconds

SMTP_SINK = Path("/usr/sbin/smtp-sink")


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

    def __init__(self, *, pipelining: bool = False, dump: Path | None = None) -> None:
        """``dump``: a file smtp-sink appends every message to, with its envelope (``-D``)."""
        super().__init__(pipelining=pipelining)
        self.dump = dump

    def start(self) -> PostfixSink:
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            self.port = probe.getsockname()[1]
        command = [str(SMTP_SINK), "-c"] + ([] if self.pipelining else ["-p"])
        if self.dump:
            self.dump.parent.chmod(0o777)  # smtp-sink started as root writes as nobody
            command += ["-D", str(self.dump)]
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


def start_sink(kind: str, *, pipelining: bool = False) -> Sink:
    if kind == "smtp-sink" or (kind == "auto" and SMTP_SINK.exists()):
        if not SMTP_SINK.exists():
            raise SystemExit(f"{SMTP_SINK} is not installed (Debian's postfix package has it).")
        return PostfixSink(pipelining=pipelining).start()
    return AsyncioSink(pipelining=pipelining).start()
