"""The SMTP layer: sessions to the upstream server, kept open and used in parallel.

It talks and reports; it does not decide. Every transaction comes back as an
:class:`Outcome` saying which recipients the server refused at RCPT and, if
the transaction as a whole failed, at which stage and with which reply. The
runner decides what that means for the post.
"""

from __future__ import annotations

import itertools
import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Mailman's synthetic code for a failure with no SMTP reply (refused or dropped connection).
NO_REPLY = 444
#: Stages at which a failure concerns the session, not the transaction: stop sending.
SESSION_STAGES = frozenset({"connect", "tls", "auth"})
_BARE_LF = re.compile(rb"(?<!\r)\n")
#: Reuse an idle session only after a NOOP says it is still alive.
IDLE_CHECK_SECONDS = 10.0


@dataclass(frozen=True)
class Transaction:
    """One MAIL FROM / RCPT TO… / DATA exchange."""

    sender: str
    recipients: list[str]
    message: bytes


@dataclass(frozen=True)
class Failure:
    """Why a whole transaction failed: the stage, and the server's reply (or ``NO_REPLY``)."""

    stage: str
    code: int
    text: str

    @property
    def concerns_session(self) -> bool:
        return self.stage in SESSION_STAGES


@dataclass
class Outcome:
    transaction: Transaction
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    failure: Failure | None = None

    @property
    def accepted(self) -> list[str]:
        if self.failure:
            return []
        return [r for r in self.transaction.recipients if r not in self.refused]


def _text(reply: Any) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


def _dot_stuffed(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, ended by ``CRLF.CRLF``."""
    if message.count(b"\n") != message.count(b"\r\n"):
        message = _BARE_LF.sub(b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    message = message.replace(b"\r\n.", b"\r\n..")
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"


def _needs_smtputf8(transaction: Transaction) -> bool:
    return not (transaction.sender.isascii() and all(r.isascii() for r in transaction.recipients))


class Connection:
    """One SMTP session, opened on first use and reopened as needed."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.smtp: smtplib.SMTP | None = None
        self.transactions_in_session = 0
        self.last_used = 0.0
        self.opened = 0

    def send(self, transaction: Transaction) -> Outcome:
        limit = self.config["MAX_SESSIONS_PER_CONNECTION"]
        if self.smtp is not None and limit > 0 and self.transactions_in_session >= limit:
            self.close()
        if self.smtp is not None and not self._alive():
            self.close()
        reused = self.smtp is not None
        outcome = self._send_once(transaction)
        if reused and outcome.failure and outcome.failure.stage == "mail" and self.smtp is None:
            # The server dropped an idle session between two posts: not a delivery failure.
            outcome = self._send_once(transaction)
        return outcome

    def close(self) -> None:
        smtp, self.smtp = self.smtp, None
        self.transactions_in_session = 0
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _alive(self) -> bool:
        if time.monotonic() - self.last_used < IDLE_CHECK_SECONDS:
            return True
        try:
            return self.smtp.noop()[0] == 250
        except (smtplib.SMTPException, OSError):
            return False

    def _open(self) -> Failure | None:
        config = self.config
        host, port = config["SMTP_HOST"], config["SMTP_PORT"]
        timeout = config["SMTP_TIMEOUT"].total_seconds()
        mode = config["SMTP_SECURE_MODE"].lower()
        stage = "connect"
        try:
            if mode == "smtps":
                smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=self._tls_context())
            else:
                smtp = smtplib.SMTP(host, port, timeout=timeout)
            self.smtp = smtp
            smtp.ehlo_or_helo_if_needed()
            if mode == "starttls":
                stage = "tls"
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if config["SMTP_USER"] and config["SMTP_PASSWORD"]:
                stage = "auth"
                smtp.login(config["SMTP_USER"], config["SMTP_PASSWORD"])
        except smtplib.SMTPNotSupportedError as error:
            self.close()
            return Failure(stage, 530, f"the server does not support it: {error}")
        except smtplib.SMTPResponseException as error:
            self.close()
            return Failure(stage, error.smtp_code, _text(error.smtp_error))
        except (smtplib.SMTPException, OSError) as error:
            self.close()
            if isinstance(error, ssl.SSLError) or stage == "tls":
                stage = "tls"
            return Failure(stage, NO_REPLY, str(error) or type(error).__name__)
        self.opened += 1
        logger.debug("Connected to %s:%s", host, port)
        return None

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.config["SMTP_VERIFY_CERT"]:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif not self.config["SMTP_VERIFY_HOSTNAME"]:
            context.check_hostname = False
        return context

    def _send_once(self, transaction: Transaction) -> Outcome:
        if self.smtp is None:
            failure = self._open()
            if failure:
                return Outcome(transaction, failure=failure)
        smtp = self.smtp
        options = []
        if _needs_smtputf8(transaction):
            if not smtp.has_extn("smtputf8"):
                return Outcome(
                    transaction,
                    failure=Failure(
                        "smtputf8",
                        553,
                        "the SMTP server does not support SMTPUTF8, "
                        "which a non-ASCII address needs",
                    ),
                )
            options.append("SMTPUTF8")
        if smtp.has_extn("8bitmime") and not transaction.message.isascii():
            options.append("BODY=8BITMIME")
        envelope = [
            f"MAIL FROM:<{transaction.sender}>" + "".join(f" {o}" for o in options),
            *(f"RCPT TO:<{recipient}>" for recipient in transaction.recipients),
            "DATA",
        ]
        stage = "mail"
        try:
            replies = self._exchange(envelope, pipelining=smtp.has_extn("pipelining"))
            code, reply = replies[0]
            if code != 250:
                self._abandon(replies, len(envelope))
                return Outcome(transaction, failure=Failure("mail", code, _text(reply)))
            stage = "rcpt"
            refused = {
                recipient: (code, _text(reply))
                for recipient, (code, reply) in zip(
                    transaction.recipients, replies[1:], strict=False
                )
                if code not in (250, 251)
            }
            if len(refused) == len(transaction.recipients):
                self._abandon(replies, len(envelope))
                return Outcome(transaction, refused=refused)
            stage = "data"
            code, reply = replies[-1]
            if code == 354:
                smtp.sock.sendall(_dot_stuffed(transaction.message))
                code, reply = smtp.getreply()
            if code != 250:
                self._reset()
                return Outcome(transaction, failure=Failure("data", code, _text(reply)))
        except (smtplib.SMTPException, OSError) as error:
            self.close()
            return Outcome(
                transaction,
                failure=Failure(stage, NO_REPLY, str(error) or type(error).__name__),
            )
        self.transactions_in_session += 1
        self.last_used = time.monotonic()
        return Outcome(transaction, refused=refused)

    def _exchange(self, commands: list[str], *, pipelining: bool) -> list[tuple[int, bytes]]:
        """MAIL, RCPTs and DATA: in one write where the server offers PIPELINING (RFC 2920).

        Without it, one command at a time, stopping where the next makes no sense.
        """
        smtp = self.smtp
        if pipelining:
            smtp.sock.sendall(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
            return [smtp.getreply() for _ in commands]
        replies = []
        for index, command in enumerate(commands):
            if index == len(commands) - 1 and not any(c in (250, 251) for c, _ in replies[1:]):
                break  # DATA without an accepted recipient
            smtp.sock.sendall(command.encode("utf-8") + b"\r\n")
            replies.append(smtp.getreply())
            if index == 0 and replies[0][0] != 250:
                break
        return replies

    def _abandon(self, replies: list[tuple[int, bytes]], sent: int) -> None:
        """End a transaction that will not carry the message, then RSET."""
        if len(replies) == sent and replies[-1][0] == 354:
            self.smtp.sock.sendall(b".\r\n")  # DATA was accepted anyway: send an empty message end
            self.smtp.getreply()
        self._reset()

    def _reset(self) -> None:
        """RSET after a failed transaction, so the next one starts clean; reopen if that fails."""
        try:
            self.smtp.rset()
        except (smtplib.SMTPException, OSError, AttributeError):
            self.close()
        self.last_used = time.monotonic()


class SMTPPool:
    """``SMTP_CONNECTIONS`` sessions, kept open across posts, sending side by side.

    Use it as a context manager (or call :meth:`close`) so sessions end with QUIT.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.connections = [Connection(config) for _ in range(config["SMTP_CONNECTIONS"])]
        self._executor: ThreadPoolExecutor | None = None

    def __enter__(self) -> SMTPPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def opened(self) -> int:
        """How many times a session was opened (a reconnect counts again)."""
        return sum(c.opened for c in self.connections)

    def send_all(self, transactions: Iterable[Transaction]) -> list[Outcome]:
        """Send every transaction; stop early when the session itself fails (down, TLS, AUTH).

        Transactions are pulled from the iterable as connections become free,
        so a generator of per-recipient copies never has more than one copy
        per connection in memory. Transactions not attempted are not in the result.
        """
        source = iter(transactions)
        head = list(itertools.islice(source, 2))
        source = itertools.chain(head, source)
        if len(self.connections) == 1 or len(head) < 2:
            # One transaction (a small bulk post) is not worth a thread hand-off.
            return self._drain(self.connections[0], source, threading.Lock(), threading.Event())
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=len(self.connections), thread_name_prefix="listdelivery-smtp"
            )
        lock, stop = threading.Lock(), threading.Event()
        futures = [
            self._executor.submit(self._drain, connection, source, lock, stop)
            for connection in self.connections
        ]
        return [outcome for future in futures for outcome in future.result()]

    @staticmethod
    def _drain(
        connection: Connection,
        source: Iterator[Transaction],
        lock: threading.Lock,
        stop: threading.Event,
    ) -> list[Outcome]:
        outcomes = []
        while not stop.is_set():
            with lock:
                transaction = next(source, None)
            if transaction is None:
                break
            outcome = connection.send(transaction)
            outcomes.append(outcome)
            if outcome.failure and outcome.failure.concerns_session:
                stop.set()
        return outcomes

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
