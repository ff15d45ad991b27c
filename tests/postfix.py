"""A private Postfix instance for tests: Debian's Postfix on a free loopback port, delivering to Maildirs.

Each instance has its own configuration directory, queue, data directory,
Maildirs and log file in one temporary directory. It accepts mail only for its
virtual mailbox domain, refuses unknown users at RCPT (``550 5.1.1``), and
never relays: there is no ``smtp`` transport, and every other destination goes
to the ``error`` transport. Its SMTP limits are parameters, so a test can meet
the limits a real upstream MTA has (``smtpd_recipient_limit``, anvil rate and
connection limits, a tarpit, ``message_size_limit``)::

    with PostfixInstance(["anne@example.org"], smtpd_recipient_limit=5) as postfix:
        ...  # send to postfix.host / postfix.port
        assert postfix.wait_for_copies(1) == {"anne@example.org": 1}

Postfix's master must start as root; where it is not installed, or this
process is not root, or it does not start, :func:`start_or_skip` skips the test
with the reason.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import pytest

POSTFIX = "/usr/sbin/postfix"
POSTMAP = "/usr/sbin/postmap"
POSTSUPER = "/usr/sbin/postsuper"
MAIL_OWNER = "postfix"
DOMAIN = "example.org"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

# Services a virtual-mailbox-only instance needs; no smtp, local or pickup.
# chroot is off (column 5): the queue lives in a temporary directory.
MASTER_SERVICES = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixUnavailable(Exception):
    """Postfix is not installed here, or this instance could not start."""


def unavailable_reason() -> str | None:
    """Why a private Postfix cannot run on this machine, or None if it can."""
    if not os.path.exists(POSTFIX):
        return "Postfix is not installed (run .ci/postfix-setup)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (its master runs as root)"
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return f"the user {MAIL_OWNER!r} that Debian's postfix package creates does not exist"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostfixInstance:
    """A private Postfix: ``postfix -c DIR start`` with main.cf and master.cf written here.

    ``mailboxes`` are the addresses that exist (in :data:`DOMAIN`); every other
    address of that domain is refused at RCPT. Keyword arguments are main.cf
    parameters (``smtpd_recipient_limit=5``); :meth:`reconfigure` replaces both
    on a running instance, for the next test.
    """

    def __init__(self, mailboxes: Iterable[str] = (), **parameters: object) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="listdelivery-postfix-"))
        # The virtual delivery agent runs as an unprivileged user and must reach the Maildirs.
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.mail_dir = self.root / "mail"
        self.log_file = self.root / "maillog"
        self.mailboxes: set[str] = set()
        self.parameters = {k: str(v) for k, v in parameters.items()}
        self.running = False
        self._log_mark = 0  # where this test's part of the log begins
        self._write_configuration()
        self.add_mailboxes(mailboxes)

    # -- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the instance and remove its directory (configuration, queue, Maildirs, log)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self) -> None:
        check = self._postfix("check")
        if check.returncode != 0:
            raise PostfixUnavailable(f"postfix check failed: {check.stderr.strip()}")
        started = self._postfix("start")
        if started.returncode != 0:
            raise PostfixUnavailable(
                f"postfix start failed: {started.stderr.strip()}\n{self.log_tail()}"
            )
        self.running = True
        if not self._wait_for_banner(timeout=10):
            self.stop()
            raise PostfixUnavailable(
                f"postfix did not answer on port {self.port}\n{self.log_tail()}"
            )

    def stop(self) -> None:
        if not self.running:
            return
        self._postfix("stop")
        if not self._wait_for_master_exit(timeout=5):
            self._postfix("abort")
            self._wait_for_master_exit(timeout=5)
        self.running = False

    def reconfigure(self, mailboxes: Iterable[str], **parameters: object) -> None:
        """Start afresh for the next test: these mailboxes and main.cf parameters only, empty
        Maildirs and queue, a new log section; a running instance reloads and waits until
        every process of the old configuration (smtpd, anvil and its counters) has exited."""
        self.parameters = {k: str(v) for k, v in parameters.items()}
        self._write_main_cf()
        self.mailboxes = set()
        self.add_mailboxes(mailboxes)
        self.clear()
        if not self.running:
            return
        subprocess.run(
            [POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"], capture_output=True, check=True
        )
        old = self._children()
        result = self._postfix("reload")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        while any(_process_exists(pid) for pid in old):
            assert time.monotonic() < deadline, f"postfix did not reload\n{self.log_tail()}"
            time.sleep(0.02)
        self._log_mark = self._log_size()

    def add_mailboxes(self, addresses: Iterable[str]) -> None:
        """Let these addresses receive mail (each a Maildir), and rebuild the map."""
        self.mailboxes |= {a.lower() for a in addresses}
        table = self.config_dir / "vmailbox"
        lines = []
        for address in sorted(self.mailboxes):
            local, _, domain = address.partition("@")
            assert domain == DOMAIN, f"{address}: this instance only has mailboxes in {DOMAIN}"
            lines.append(f"{address} {domain}/{local}/\n")
        _write_settled(table, "".join(lines))
        result = subprocess.run(
            [POSTMAP, "-c", str(self.config_dir), f"hash:{table}"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr

    # -- what arrived --------------------------------------------------------------------

    def copies(self) -> Counter[str]:
        """How many messages each mailbox holds (the Maildirs' ``new`` and ``cur``)."""
        counts: Counter[str] = Counter()
        for box in (self.mail_dir / DOMAIN).glob("*"):
            files = [f for sub in ("new", "cur") for f in (box / sub).glob("*")]
            if files:
                counts[f"{box.name}@{DOMAIN}"] = len(files)
        return counts

    def messages(self, address: str) -> list[bytes]:
        local, _, domain = address.lower().partition("@")
        box = self.mail_dir / domain / local
        return [f.read_bytes() for sub in ("new", "cur") for f in sorted((box / sub).glob("*"))]

    def queue_size(self) -> int:
        """Messages accepted but not yet delivered (or deferred) by this instance."""
        return sum(
            1 for queue in QUEUES for _, _, files in os.walk(self.queue_dir / queue) for _ in files
        )

    def wait_for_copies(self, expected: int | None = None, timeout: float = 10) -> Counter[str]:
        """Wait until ``expected`` copies are in the Maildirs (all recipients together) and the
        queue is empty, or until ``timeout``; return the copies per recipient either way."""
        deadline = time.monotonic() + timeout
        while True:
            # The queue first: a message leaves it only once it is in its Maildir.
            queued = self.queue_size()
            counts = self.copies()
            reached = expected is None or sum(counts.values()) >= expected
            if (reached and queued == 0) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def clear(self) -> None:
        """Empty every Maildir (between the tests that share an instance)."""
        for box in (self.mail_dir / DOMAIN).glob("*"):
            for sub in ("new", "cur", "tmp"):
                for f in (box / sub).glob("*"):
                    f.unlink()

    def log(self) -> str:
        """This test's part of the Postfix log (since the last :meth:`reconfigure`)."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(self._log_mark)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_lines(self, *needles: str) -> list[str]:
        """The log lines that contain any of ``needles`` (for a failing test's message)."""
        return [line for line in self.log().splitlines() if any(n in line for n in needles)]

    # -- configuration -------------------------------------------------------------------

    def _write_configuration(self) -> None:
        self.config_dir.mkdir()
        self.queue_dir.mkdir()  # root's; `postfix check` makes its subdirectories
        self.mail_dir.mkdir()
        owner = self._mailbox_owner()
        os.chown(self.mail_dir, owner.pw_uid, owner.pw_gid)
        self._write_main_cf()
        _write_settled(
            self.config_dir / "master.cf",
            f"{self.host}:{self.port} inet n - n - - smtpd\n" + MASTER_SERVICES,
        )

    def _mailbox_owner(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            return pwd.getpwnam(MAIL_OWNER)

    def _write_main_cf(self) -> None:
        owner = self._mailbox_owner()
        refuse = "error:5.7.1 the test instance delivers nowhere else"
        base = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.root / "data",
            "mail_owner": MAIL_OWNER,
            "setgid_group": "postdrop" if _group_exists("postdrop") else MAIL_OWNER,
            "myhostname": "postfix-test.localdomain",
            "mydomain": "localdomain",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            # Never relay: only the virtual domain is a destination; nothing has an smtp transport.
            "relayhost": "",
            "relay_domains": "",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "default_transport": refuse,
            "relay_transport": refuse,
            "local_transport": refuse,
            "alias_maps": "",
            "alias_database": "",
            "notify_classes": "",
            "biff": "no",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_maps": f"hash:{self.config_dir / 'vmailbox'}",
            "virtual_mailbox_base": self.mail_dir,
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "virtual_minimum_uid": "1",
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.root,
            # Deliver at once: no flow-control pause, no delay warnings.
            "in_flow_delay": "0",
            "delay_warning_time": "0",
            # Loopback is not exempt from anvil's limits here (it is by default).
            "smtpd_client_event_limit_exceptions": "",
        }
        values = {**base, **self.parameters}
        _write_settled(
            self.config_dir / "main.cf",
            "".join(f"{key} = {value}\n" for key, value in values.items()),
        )

    # -- processes -----------------------------------------------------------------------

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), command],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _children(self) -> set[int]:
        """The processes the master started (smtpd, qmgr, anvil, …)."""
        master = self._master_pid()
        children = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # pid (comm) state ppid …; comm may contain spaces, so split after its ")".
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if master is not None and int(fields[1]) == master:
                children.add(int(stat.parent.name))
        return children

    def _wait_for_master_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._master_pid()
            if pid is None or not _process_exists(pid):
                return True
            time.sleep(0.05)
        return False

    def _wait_for_banner(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as client:
                    if client.recv(512).startswith(b"220"):
                        client.sendall(b"QUIT\r\n")
                        return True
            except OSError:
                time.sleep(0.05)
        return False


def _write_settled(path: Path, text: str) -> None:
    """Write a file dated a minute ago: Postfix waits while a configuration file is younger
    than a couple of seconds (it may still be being edited), which would slow every start."""
    path.write_text(text)
    past = time.time() - 60
    os.utime(path, (past, past))


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_or_skip(instance_factory) -> PostfixInstance:
    """Start a :class:`PostfixInstance` built by ``instance_factory``; skip the test if it cannot."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    instance = instance_factory()
    try:
        instance.start()
    except (PostfixUnavailable, OSError, subprocess.SubprocessError) as error:
        instance.close()
        pytest.skip(f"Postfix could not start: {error}")
    return instance
