"""The SMTP layer: sessions to the upstream server, kept open and used in parallel.

It talks and reports; it does not decide. Every transaction comes back as an
:class:`Outcome` saying which recipients the server refused at RCPT and, if
the transaction as a whole failed, at which stage and with which reply. The
runner decides what that means for the post.

A failure with no SMTP reply (a refused, dropped or silent connection) or
with a reply whose code cannot be read has the code ``None`` and a text that
says so ("no reply: …", "unreadable reply: …"): no code is made up.
"""

from __future__ import annotations

import base64
import collections
import heapq
import itertools
import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .relays import Relay
from .shaping import MAX_THROTTLES, Shaper
from .wire import wire_safe

logger = logging.getLogger(__name__)

#: Stages at which a failure concerns the session, not the transaction: stop sending.
SESSION_STAGES = frozenset({"connect", "tls", "auth"})
#: Transactions with at most this many recipients send DATA without waiting for the RCPT replies.
PIPELINE_DATA_UP_TO = 10
#: Reuse an idle session only after a NOOP says it is still alive.
IDLE_CHECK_SECONDS = 10.0
#: What smtplib reports for a reply whose code it could not read.
UNREADABLE = -1
#: A reply code as RFC 5321 §4.2 allows it.
_REPLY_CODE = re.compile(rb"[2-5][0-5][0-9]")
#: Longer reply lines are not read (smtplib's limit).
_MAX_REPLY_LINE = 8192
#: The server ends the session after this reply (RFC 5321 §3.8): send nothing more.
CLOSING = 421


@dataclass(frozen=True)
class Transaction:
    """One MAIL FROM / RCPT TO… / DATA exchange."""

    sender: str
    recipients: list[str]
    message: bytes
    #: Ask the server for ``XVERP=+=`` (Postfix): it gives each recipient's copy the sender
    #: ``bounces+local=domain@…``. A session whose server does not offer XVERP sends nothing
    #: and fails the transaction at the stage "xverp".
    xverp: bool = False


#: Postfix's XVERP with these delimiters writes ``bounces+local=domain@…``, our default VERP.
XVERP_OPTION = "XVERP=+="


@dataclass(frozen=True)
class Failure:
    """Why a whole transaction failed: the stage, and the server's reply.

    ``code`` is ``None`` when there was no reply or its code could not be read;
    ``text`` then starts with "no reply: " or "unreadable reply: ".
    """

    stage: str
    code: int | None
    text: str
    #: For the stage "limited" (never sent: a rate, quota or cap is far away): seconds to wait.
    retry_after: float | None = None

    @property
    def concerns_session(self) -> bool:
        return self.stage in SESSION_STAGES


@dataclass
class Outcome:
    """What became of a transaction.

    ``refused`` holds every RCPT reply other than 250/251 that was read, also
    when the transaction failed afterwards.
    """

    transaction: Transaction
    refused: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    failure: Failure | None = None

    @property
    def accepted(self) -> list[str]:
        if self.failure:
            return []
        return [r for r in self.transaction.recipients if r not in self.refused]

    @property
    def undelivered(self) -> list[str]:
        """After a failure, the recipients neither accepted nor refused: to be sent again."""
        if not self.failure:
            return []
        return [r for r in self.transaction.recipients if r not in self.refused]


class _SafeReplies:
    """smtplib's ``getreply`` that keeps an unreadable reply whole and lets socket errors through.

    smtplib turns ``4x1 try later`` into ``(-1, b"try later")`` and any socket
    error into "Connection unexpectedly closed"; a person reading the failure
    needs the reply as sent and the real cause.
    """

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None:
            self.file = self.sock.makefile("rb")
        lines = []
        while True:
            try:
                line = self.file.readline(_MAX_REPLY_LINE + 1)
            except OSError:
                self.close()
                raise
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("the server closed the connection")
            if len(line) > _MAX_REPLY_LINE:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    "the server sent a reply line too long to read"
                )
            code = line[:3]
            if not _REPLY_CODE.fullmatch(code) or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                return UNREADABLE, line.strip(b" \t\r\n")
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                return int(code), b"\n".join(lines)


class _PlainSMTP(_SafeReplies, smtplib.SMTP):
    pass


class _SecureSMTP(_SafeReplies, smtplib.SMTP_SSL):
    pass


def _text(reply: Any) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


def _code(code: int) -> int | None:
    return None if code == UNREADABLE else code


def _reply_text(code: int, reply: Any) -> str:
    text = _text(reply)
    return f"unreadable reply: {text}" if code == UNREADABLE else text


def _dot_stuffed(message: bytes) -> bytes:
    """The DATA payload of a message with CRLF line ends: leading dots doubled, ``CRLF.CRLF``."""
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _commands(transaction: Transaction, mail: str, pipelining: bool) -> list[str]:
    """MAIL, the RCPTs and, for a few recipients where the server pipelines, DATA.

    A few recipients (a personal copy, a default bulk chunk): DATA goes in the
    same write. Many: the client waits for the RCPT replies first, so that a chunk
    of unknown users does not cost the server a DATA error too, nor us its
    tarpit (RFC 2920 §3.1).
    """
    commands = [mail, *(f"RCPT TO:<{r}>" for r in transaction.recipients)]
    if pipelining and len(transaction.recipients) <= PIPELINE_DATA_UP_TO:
        commands.append("DATA")
    return commands


def _wire(commands: list[str]) -> bytes:
    return b"".join(c.encode("utf-8") + b"\r\n" for c in commands)


@dataclass(frozen=True)
class _Ahead:
    """A transaction taken while the one before it was being sent (:meth:`Connection.send`)."""

    transaction: Transaction
    mail: str = ""
    message: bytes = b""
    written: bool = False  # its commands followed the message before it


def _needs_smtputf8(transaction: Transaction) -> bool:
    return not (transaction.sender.isascii() and all(r.isascii() for r in transaction.recipients))


def _b64(text: str) -> str:
    # surrogatepass: a password read with surrogateescape still encodes, and no
    # UnicodeEncodeError (whose text quotes the password) can be raised.
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


def _log_in(smtp: smtplib.SMTP, user: str, password: str) -> None:
    """AUTH PLAIN or LOGIN with UTF-8 credentials (RFC 4616); smtplib's login sends ASCII only."""
    mechanisms = smtp.esmtp_features.get("auth", "").upper().split()
    if "PLAIN" in mechanisms:
        code, reply = smtp.docmd("AUTH", "PLAIN " + _b64(f"\0{user}\0{password}"))
    elif "LOGIN" in mechanisms:
        code, reply = smtp.docmd("AUTH", "LOGIN " + _b64(user))
        if code == 334:
            code, reply = smtp.docmd(_b64(password))
    else:
        raise smtplib.SMTPNotSupportedError("the server offers neither AUTH PLAIN nor AUTH LOGIN")
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


@dataclass(frozen=True)
class _Features:
    """What the server's EHLO reply offers, read once per session."""

    pipelining: bool
    eight_bit_mime: bool
    smtputf8: bool
    size: bool
    size_limit: int  # 0: SIZE offered without a limit, or not offered
    extensions: frozenset[str] = frozenset()  # every keyword offered, lower case

    def offers(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    @classmethod
    def of(cls, smtp: smtplib.SMTP) -> _Features:
        size = smtp.has_extn("size")
        try:
            size_limit = int(smtp.esmtp_features.get("size", "") or 0)
        except ValueError:
            size_limit = 0
        return cls(
            pipelining=smtp.has_extn("pipelining"),
            eight_bit_mime=smtp.has_extn("8bitmime"),
            smtputf8=smtp.has_extn("smtputf8"),
            size=size,
            size_limit=size_limit,
            extensions=frozenset(smtp.esmtp_features),
        )


class Connection:
    """One SMTP session, opened on first use and reopened as needed."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.smtp: smtplib.SMTP | None = None
        self.features: _Features | None = None
        self.transactions_in_session = 0
        self.last_used = 0.0
        self.opened = 0
        #: The next transaction, taken while the last one's message was being sent: its
        #: commands went in the same write where ``_Ahead.written`` says so.
        self._ahead: _Ahead | None = None

    def send(
        self, transaction: Transaction, following: Callable[[], Transaction | None] | None = None
    ) -> Outcome:
        """Send ``transaction``; with ``following`` (where the server offers PIPELINING), take
        the next transaction while this one's message goes, and write its commands after the
        message, in the same write (RFC 2920 §3.1): one round trip a transaction, not two.

        The one taken is :meth:`ahead`'s until it is sent, which must be next.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.written and self.smtp is not None:
            assert ahead.transaction is transaction, "the transaction taken ahead goes next"
            outcome = self._send_prepared(transaction, ahead.mail, ahead.message, following, True)
            if outcome.failure and outcome.failure.stage == "mail" and self.smtp is None:
                # The session ended under the commands written ahead: nothing of this
                # transaction was accepted, so it goes on a new session, as after an idle drop.
                outcome = self._send_once(transaction, following)
            return outcome
        limit = self.config["MAX_SESSIONS_PER_CONNECTION"]
        if self.smtp is not None and limit > 0 and self.transactions_in_session >= limit:
            self.close()
        if self.smtp is not None and not self._alive():
            self.close()
        reused = self.smtp is not None
        outcome = self._send_once(transaction, following)
        if reused and outcome.failure and outcome.failure.stage == "mail" and self.smtp is None:
            # The server dropped an idle session between two posts: not a delivery failure.
            outcome = self._send_once(transaction, following)
        return outcome

    def ahead(self) -> Transaction | None:
        """The transaction taken ahead by the last :meth:`send`, to send next; ``None``: none."""
        return self._ahead.transaction if self._ahead is not None else None

    def offers(self, extension: str) -> bool:
        """Whether the server's EHLO offers ``extension``; opens the session to ask if needed.

        ``False`` when no session can be opened: then sending will meet the same failure.
        """
        if self.smtp is None and self._open() is not None:
            return False
        return self.features.offers(extension)

    def close(self) -> None:
        smtp, self.smtp = self.smtp, None
        self.features = None
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

    def _no_reply(self, error: Exception) -> str:
        """Why no reply came, in words, with the exception's type for whoever debugs it."""
        if isinstance(error, smtplib.SMTPServerDisconnected) and isinstance(
            error.__context__, OSError
        ):
            error = error.__context__  # smtplib's "Server not connected" hides the cause
        if isinstance(error, TimeoutError):
            seconds = self.config["SMTP_TIMEOUT"].total_seconds()
            what = f"nothing within {seconds:g} seconds"
        elif isinstance(error, ConnectionRefusedError):
            what = "connection refused"
        elif isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            what = "connection dropped"
        else:
            what = str(error) or "connection failed"
        return f"no reply: {what} ({type(error).__name__})"

    def _open(self) -> Failure | None:
        config = self.config
        host, port = config["SMTP_HOST"], config["SMTP_PORT"]
        timeout = config["SMTP_TIMEOUT"].total_seconds()
        mode = config["SMTP_SECURE_MODE"].lower()
        user, password = config["SMTP_USER"], config["SMTP_PASSWORD"]
        name = config["SMTP_EHLO_NAME"] or None
        stage = "connect"
        try:
            if mode == "smtps":
                smtp = _SecureSMTP(
                    host, port, local_hostname=name, timeout=timeout, context=self._tls_context()
                )
            else:
                smtp = _PlainSMTP(host, port, local_hostname=name, timeout=timeout)
            self.smtp = smtp
            smtp.ehlo_or_helo_if_needed()
            if mode == "starttls":
                stage = "tls"
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if user and password:
                stage = "auth"
                _log_in(smtp, user, password)
        except smtplib.SMTPNotSupportedError as error:
            self.close()
            return Failure(stage, None, f"no reply: {error} ({type(error).__name__})")
        except smtplib.SMTPResponseException as error:
            self.close()
            text = _reply_text(error.smtp_code, error.smtp_error)
            return Failure(stage, _code(error.smtp_code), text)
        except (smtplib.SMTPException, OSError) as error:
            self.close()
            if isinstance(error, ssl.SSLError):
                stage = "tls"
            return Failure(stage, None, self._no_reply(error))
        except UnicodeError as error:
            # Its text would quote the offending value, which may be a credential.
            self.close()
            return Failure(
                stage, None, f"no reply: could not encode a command ({type(error).__name__})"
            )
        self.features = _Features.of(smtp)
        self.opened += 1
        logger.debug("Connected to %s:%s", host, port)
        return None

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.config.get("SMTP_CA_FILE") or None)
        if not self.config["SMTP_VERIFY_CERT"]:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif not self.config["SMTP_VERIFY_HOSTNAME"]:
            context.check_hostname = False
        return context

    def _send_once(
        self, transaction: Transaction, following: Callable[[], Transaction | None] | None = None
    ) -> Outcome:
        if self.smtp is None:
            failure = self._open()
            if failure:
                return Outcome(transaction, failure=failure)
        prepared = self._prepare(transaction)
        if isinstance(prepared, Outcome):
            return prepared
        return self._send_prepared(transaction, *prepared, following)

    def _prepare(self, transaction: Transaction) -> tuple[str, bytes] | Outcome:
        """The MAIL FROM command and the message as sent on this session, or why it cannot go."""
        features = self.features
        options = []
        if _needs_smtputf8(transaction):
            if not features.smtputf8:
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
        if transaction.xverp:
            if not features.offers("xverp"):
                # Sent without it, every copy would carry the plain sender: no VERP.
                return Outcome(
                    transaction,
                    failure=Failure("xverp", 555, "5.5.4 the SMTP server does not offer XVERP"),
                )
            options.append(XVERP_OPTION)
        message = wire_safe(transaction.message, eight_bit_ok=features.eight_bit_mime)
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        if features.size:
            if features.size_limit and len(message) > features.size_limit:
                return Outcome(
                    transaction,
                    failure=Failure(
                        "size",
                        552,
                        f"5.3.4 message of {len(message)} octets exceeds "
                        f"the server's limit of {features.size_limit}",
                    ),
                )
            options.append(f"SIZE={len(message)}")
        if features.eight_bit_mime and not message.isascii():
            options.append("BODY=8BITMIME")
        return f"MAIL FROM:<{transaction.sender}>" + "".join(f" {o}" for o in options), message

    def _send_prepared(
        self,
        transaction: Transaction,
        mail: str,
        message: bytes,
        following: Callable[[], Transaction | None] | None,
        sent_ahead: bool = False,
    ) -> Outcome:
        if not sent_ahead:
            self.transactions_in_session += 1
        replies: list[tuple[int, bytes]] = []
        try:
            return self._transact(transaction, mail, message, replies, following, sent_ahead)
        except (smtplib.SMTPException, OSError) as error:
            self.close()
            if replies and replies[0][0] != 250:
                code, reply = replies[0]
                failure = Failure("mail", _code(code), _reply_text(code, reply))
                return Outcome(transaction, failure=failure)
            return Outcome(
                transaction,
                refused=_refusals(transaction, replies),
                failure=Failure(_stage(len(replies), transaction), None, self._no_reply(error)),
            )

    def _transact(
        self,
        transaction: Transaction,
        mail: str,
        message: bytes,
        replies: list[tuple[int, bytes]],
        following: Callable[[], Transaction | None] | None,
        written: bool,
    ) -> Outcome:
        """MAIL, RCPTs and DATA (already ``written`` after the last message, where so);
        ``replies`` holds what was read, should the connection fail."""
        recipients = transaction.recipients
        pipelining = self.features.pipelining
        commands = _commands(transaction, mail, pipelining)
        data_pipelined = commands[-1] == "DATA"
        self._exchange(commands, pipelining, replies, written)
        refused = _refusals(transaction, replies)
        code, reply = replies[-1]
        if code == CLOSING:
            self.close()
            stage = _stage(len(replies) - 1, transaction)
            return Outcome(transaction, refused=refused, failure=Failure(stage, code, _text(reply)))
        code, reply = replies[0]
        if code != 250:
            self._abandon(replies, len(commands))
            return Outcome(
                transaction, failure=Failure("mail", _code(code), _reply_text(code, reply))
            )
        if len(refused) == len(recipients):
            self._abandon(replies, len(commands))
            return Outcome(transaction, refused=refused)
        if not data_pipelined:
            self._exchange(["DATA"], pipelining, replies)
        code, reply = replies[-1]
        if code == 354:
            payload = _dot_stuffed(message)
            ahead = self._take_ahead(following)
            if ahead is not None and ahead.written:
                payload += _wire(_commands(ahead.transaction, ahead.mail, pipelining))
            self.smtp.sock.sendall(payload)
            code, reply = self.smtp.getreply()
        if code != 250:
            if (
                self._ahead is not None
                and self._ahead.written
                and code not in (UNREADABLE, CLOSING)
            ):
                self.last_used = time.monotonic()  # the final reply ended the transaction: no RSET
            else:
                self._end_failed(code)
            return Outcome(
                transaction,
                refused=refused,
                failure=Failure("data", _code(code), _reply_text(code, reply)),
            )
        self.last_used = time.monotonic()
        return Outcome(transaction, refused=refused)

    def _take_ahead(self, following: Callable[[], Transaction | None] | None) -> _Ahead | None:
        """The next transaction, if there is one and its commands may follow this message."""
        if following is None or not self.features.pipelining:
            return None
        limit = self.config["MAX_SESSIONS_PER_CONNECTION"]
        if limit > 0 and self.transactions_in_session >= limit:
            return None  # it opens a new session
        transaction = following()
        if transaction is None:
            return None
        prepared = self._prepare(transaction)
        if isinstance(prepared, Outcome):  # it cannot go on this session: sent, and failed, alone
            self._ahead = _Ahead(transaction)
        else:
            self.transactions_in_session += 1
            self._ahead = _Ahead(transaction, *prepared, written=True)
        return self._ahead

    def _exchange(
        self,
        commands: list[str],
        pipelining: bool,
        replies: list[tuple[int, bytes]],
        written: bool = False,
    ) -> None:
        """Send ``commands`` (unless ``written`` already) and add their replies to ``replies``.

        In one write where the server offers PIPELINING (RFC 2920); without it,
        one at a time, stopping after a refused MAIL FROM. Reading stops at a
        421: the server is closing the session.
        """
        smtp = self.smtp
        if pipelining and not written:
            smtp.sock.sendall(_wire(commands))
        for command in commands:
            if not pipelining:
                smtp.sock.sendall(command.encode("utf-8") + b"\r\n")
            replies.append(smtp.getreply())
            code = replies[-1][0]
            if code == CLOSING or (not pipelining and len(replies) == 1 and code != 250):
                return

    def _abandon(self, replies: list[tuple[int, bytes]], sent: int) -> None:
        """End a transaction that will not carry the message, then RSET."""
        if len(replies) == sent and replies[-1][0] == 354:
            self.smtp.sock.sendall(b".\r\n")  # DATA was accepted anyway: send an empty message end
            self.smtp.getreply()
        self._end_failed(replies[0][0])

    def _end_failed(self, code: int) -> None:
        """After a failed transaction: RSET so the next one starts clean, or close the session
        where its state is unknown (an unreadable reply) or the server is leaving (421)."""
        if code in (UNREADABLE, CLOSING):
            self.close()
            return
        try:
            self.smtp.rset()
        except (smtplib.SMTPException, OSError, AttributeError):
            self.close()
        self.last_used = time.monotonic()


def _refusals(
    transaction: Transaction, replies: list[tuple[int, bytes]]
) -> dict[str, tuple[int | None, str]]:
    """The RCPT replies read that were not 250/251, by recipient.

    None after a refused MAIL FROM: the server then refuses every RCPT for that reason alone.
    """
    if not replies or replies[0][0] != 250:
        return {}
    rcpt_replies = replies[1 : 1 + len(transaction.recipients)]
    return {
        recipient: (_code(code), _reply_text(code, reply))
        for recipient, (code, reply) in zip(transaction.recipients, rcpt_replies, strict=False)
        if code not in (250, 251)
    }


def _stage(reply_index: int, transaction: Transaction) -> str:
    """The stage whose reply is the ``reply_index``-th of a transaction."""
    if reply_index == 0:
        return "mail"
    return "rcpt" if reply_index <= len(transaction.recipients) else "data"


class _Work:
    """The transactions of one ``send_all``, shared by the pool's connections.

    A connection that cannot open a session hands its transaction back and
    leaves, as long as another connection is still at work to send it.
    """

    def __init__(
        self,
        source: Iterator[Transaction],
        workers: int,
        stop: threading.Event | None,
        max_wait: float = 0.0,
    ) -> None:
        self._source = source
        self._handed_back: collections.deque[Transaction] = collections.deque()
        self._lock = threading.Lock()
        self._working = workers
        self._stop = stop
        self._halted = False
        # Transactions waiting for a limit: (ready at, sequence, transaction), soonest first.
        self._parked: list[tuple[float, int, Transaction]] = []
        self._sequence = itertools.count()
        self._exhausted = False
        self._max_wait = max_wait
        self._throttles: collections.Counter[int] = collections.Counter()
        self._woken = threading.Event()

    def take(self) -> Transaction | None:
        """The next transaction, or None: then the caller has left.

        Parked transactions go first once their wait is over; while the source
        has more and few are parked, new ones are taken meanwhile, so a slow
        destination does not hold up the rest.
        """
        while True:
            with self._lock:
                transaction, wait = self._next()
                if transaction is not None or wait is None:
                    if transaction is None:
                        self._working -= 1
                    return transaction
            stop = self._stop if self._stop is not None else self._woken
            stop.wait(min(wait, 0.5))

    def _next(self) -> tuple[Transaction | None, float | None]:
        """A transaction, or how long until one may be ready (``None``: never)."""
        if self._halted or (self._stop is not None and self._stop.is_set()):
            return None, None
        if self._handed_back:
            return self._handed_back.popleft(), None
        now = time.monotonic()
        if self._parked and self._parked[0][0] <= now:
            return heapq.heappop(self._parked)[2], None
        if not self._exhausted and len(self._parked) < PARK_LIMIT:
            transaction = next(self._source, None)
            if transaction is not None:
                return transaction, None
            self._exhausted = True
        if self._parked:
            return None, self._parked[0][0] - now
        return None, None

    def park(self, transaction: Transaction, wait: float) -> bool:
        """Send ``transaction`` after ``wait`` seconds; ``False`` if that is too far: stop."""
        with self._lock:
            if wait > self._max_wait:
                self._halted = True
                return False
            heapq.heappush(
                self._parked, (time.monotonic() + wait, next(self._sequence), transaction)
            )
            return True

    def leave(self, transaction: Transaction) -> bool:
        """Stop working, giving ``transaction`` to the others; ``False`` if none is left."""
        with self._lock:
            if self._working <= 1:
                return False
            self._working -= 1
            self._handed_back.append(transaction)
            return True

    def throttled(self, transaction: Transaction) -> int:
        """Count one more "slow down" for ``transaction``; how many it has had."""
        with self._lock:
            self._throttles[id(transaction)] += 1
            return self._throttles[id(transaction)]

    def halt(self) -> None:
        with self._lock:
            self._halted = True

    def hand_back(self, transaction: Transaction) -> bool:
        """Leave, giving ``transaction`` to another connection; False if none is left.

        Then the caller's failure is the pool's: nothing more is taken.
        """
        with self._lock:
            self._working -= 1
            if self._working == 0:
                self._halted = True
                return False
            self._handed_back.append(transaction)
            return True


#: Transactions waiting for a limit at most, per ``send_all``; then the pool waits for them.
PARK_LIMIT = 500


class _Session:
    """A worker's connection to one relay, with its place under the relay's session cap."""

    def __init__(self, relay: Relay, config: dict[str, Any]) -> None:
        self.relay = relay
        self.connection = Connection({**config, **relay.smtp})
        self.slot: Any = None
        self.failure: Failure | None = None  # the last that concerned the session


class SMTPPool:
    """``SMTP_CONNECTIONS`` sessions, kept open across posts, sending side by side.

    With traffic shaping (several relays, or limits: see :mod:`listdelivery.shaping`)
    each of the ``SMTP_CONNECTIONS`` workers keeps a session per relay it uses,
    and every transaction waits for its relay's and destinations' limits.
    Use it as a context manager (or call :meth:`close`) so sessions end with QUIT.
    """

    def __init__(self, config: dict[str, Any], shaper: Shaper | None = None) -> None:
        self.config = config
        self.connections = [Connection(config) for _ in range(config["SMTP_CONNECTIONS"])]
        self.shaper = shaper if shaper is not None else Shaper(config)
        self._sessions: dict[tuple[int, str], _Session] = {}
        self._holder = f"{id(self):x}"
        self._executor: ThreadPoolExecutor | None = None

    def __enter__(self) -> SMTPPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def opened(self) -> int:
        """How many times a session was opened (a reconnect counts again)."""
        shaped = sum(s.connection.opened for s in self._sessions.values())
        return sum(c.opened for c in self.connections) + shaped

    def offers(self, extension: str, relays: Iterable[str] = ()) -> bool:
        """Whether the server offers the EHLO ``extension`` (``"xverp"``); with traffic shaping,
        whether every relay of ``relays`` (empty: all) that is not resting does.

        Asked between two :meth:`send_all`, never during one: it opens a session where none is
        open (within a relay's session cap), which the next transactions then use. ``False``
        when a session cannot be opened.
        """
        if not self.shaper.active:
            connection = next((c for c in self.connections if c.smtp is not None), None)
            return (connection or self.connections[0]).offers(extension)
        names = set(relays)
        allowed = [r for r in self.shaper.relays if not names or r.name in names]
        asked = [r for r in allowed or self.shaper.relays if not self.shaper.resting(r)]
        for relay in asked:
            session = self._session(0, relay)
            if session.connection.smtp is None:
                if session.slot is None and not self.shaper.paused_for(relay):
                    session.slot = self.shaper.open_session(relay, self._holder)
                if session.slot is None:  # the relay's sessions are all taken, or paused
                    return False
            if not session.connection.offers(extension):
                if session.connection.smtp is None:
                    self._let_go(session)
                return False
        return bool(asked)

    def send_all(
        self,
        transactions: Iterable[Transaction],
        stop: threading.Event | None = None,
        relays: Iterable[str] = (),
    ) -> list[Outcome]:
        """Send every transaction, until ``stop`` is set or no connection can open a session.

        Transactions are pulled from the iterable as connections become free,
        so a generator of per-recipient copies never has more than one copy
        per connection in memory. A connection that cannot open a session
        (refused, ``421`` greeting, TLS, AUTH) while others can hands its
        transaction back and sends nothing more in this call; when none can,
        the last one's failure is in the result and sending stops.
        Transactions not attempted are not in the result.

        With traffic shaping, ``relays`` names the relays these transactions may
        use (empty: all). A transaction whose limit is further away than
        ``LIMIT_WAIT`` comes back with the failure stage "limited" and the
        seconds to wait, and nothing more is sent in this call.
        """
        if self.shaper.active:
            return self._send_shaped(iter(transactions), stop, set(relays))
        source = iter(transactions)
        head = list(itertools.islice(source, 2))
        source = itertools.chain(head, source)
        work = _Work(source, len(self.connections), stop)
        if len(self.connections) == 1 or len(head) < 2:
            # Not worth a thread hand-off: one connection after the other, open sessions first.
            ordered = sorted(self.connections, key=lambda c: c.smtp is None)
            return [outcome for c in ordered for outcome in self._drain(c, work)]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=len(self.connections), thread_name_prefix="listdelivery-smtp"
            )
        futures = [
            self._executor.submit(self._drain, connection, work) for connection in self.connections
        ]
        return [outcome for future in futures for outcome in future.result()]

    @staticmethod
    def _drain(connection: Connection, work: _Work) -> list[Outcome]:
        """Send what ``work`` gives until it gives nothing; each message's write carries the
        commands of the transaction after it (:meth:`Connection.send`)."""
        outcomes = []
        exhausted = False

        def following() -> Transaction | None:
            nonlocal exhausted
            transaction = work.take()
            exhausted = transaction is None  # work.take said so once: not asked again
            return transaction

        transaction = following()
        while transaction is not None:
            outcome = connection.send(transaction, following)
            if outcome.failure and outcome.failure.concerns_session:
                if not work.hand_back(transaction):
                    outcomes.append(outcome)
                break
            outcomes.append(outcome)
            transaction = connection.ahead()
            if transaction is None and not exhausted:
                transaction = following()
        return outcomes

    # -- with traffic shaping -----------------------------------------------------------

    def _send_shaped(
        self, source: Iterator[Transaction], stop: threading.Event | None, names: set[str]
    ) -> list[Outcome]:
        allowed = [r for r in self.shaper.relays if not names or r.name in names]
        allowed = allowed or self.shaper.relays
        workers = len(self.connections)
        work = _Work(source, workers, stop, self.shaper.max_wait)
        if workers == 1:
            return self._drain_shaped(0, work, allowed)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="listdelivery-smtp"
            )
        futures = [
            self._executor.submit(self._drain_in_thread, worker, work, allowed)
            for worker in range(workers)
        ]
        return [outcome for future in futures for outcome in future.result()]

    def _drain_in_thread(self, worker: int, work: _Work, allowed: list[Relay]) -> list[Outcome]:
        try:
            return self._drain_shaped(worker, work, allowed)
        finally:
            self.shaper.thread_done()

    def _drain_shaped(self, worker: int, work: _Work, allowed: list[Relay]) -> list[Outcome]:
        shaper = self.shaper
        outcomes: list[Outcome] = []
        while (transaction := work.take()) is not None:
            relay = shaper.choose(allowed)
            if relay is None:  # every relay rests after failures: the runner judges the last
                outcomes.append(Outcome(transaction, failure=self._last_failure(allowed)))
                work.halt()
                break
            session = self._session(worker, relay)
            wait = shaper.paused_for(relay) if session.connection.smtp is None else 0.0
            if not wait and session.slot is None:
                session.slot = shaper.open_session(relay, self._holder)
                if session.slot is None:  # every session of the cap is taken
                    if len(allowed) == 1 and work.leave(transaction):
                        break  # the workers that have a session send the rest
                    wait = 0.2
            if not wait:
                wait = shaper.admit(relay, transaction.recipients)
            if wait > 0:
                if not work.park(transaction, wait):
                    outcomes.append(_limited(transaction, relay, wait))
                continue
            outcome = session.connection.send(transaction)
            if session.connection.smtp is None:
                self._let_go(session)
            failure = outcome.failure
            slow = _slow_down_reply(shaper, outcome)
            if slow is not None and work.throttled(transaction) <= MAX_THROTTLES:
                work.park(transaction, shaper.slow_down(relay, transaction.recipients, *slow))
                continue
            if failure is not None and failure.code is None and slow is None and len(allowed) > 1:
                # No reply mid-transaction: the relay went away. Not accepted, so another
                # relay may take the transaction while this one rests.
                if not failure.concerns_session and shaper.choose(allowed, frozenset({relay.name})):
                    shaper.rest_relay(relay, f"{failure.stage}: {failure.text}")
                    work.park(transaction, 0.0)
                    continue
            if failure is not None and failure.concerns_session and slow is None:
                session.failure = failure
                if len(allowed) > 1 and shaper.choose(allowed, frozenset({relay.name})):
                    shaper.rest_relay(relay, f"{failure.stage}: {failure.text}")
                    work.park(transaction, 0.0)
                    continue
                if not work.hand_back(transaction):
                    outcomes.append(outcome)
                break
            outcomes.append(outcome)
        return outcomes

    def _session(self, worker: int, relay: Relay) -> _Session:
        session = self._sessions.get((worker, relay.name))
        if session is None:
            session = self._sessions[(worker, relay.name)] = _Session(relay, self.config)
        elif session.slot is not None and not self.shaper.keep_session(session.slot):
            session.connection.close()  # our place under the cap ran out: take a new one
            session.slot = None
        return session

    def _let_go(self, session: _Session) -> None:
        if session.slot is not None:
            self.shaper.close_session(session.slot)
            session.slot = None

    def _last_failure(self, relays: list[Relay]) -> Failure:
        for session in self._sessions.values():
            if session.relay in relays and session.failure is not None:
                return session.failure
        return Failure("connect", None, "no reply: every relay is resting after failures")

    def close(self) -> None:
        for session in self._sessions.values():
            session.connection.close()
            self._let_go(session)
        self._sessions.clear()
        for connection in self.connections:
            connection.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _slow_down_reply(shaper: Shaper, outcome: Outcome) -> tuple[int | None, str] | None:
    """The reply, if the whole transaction was turned away by one that means "slow down"."""
    failure = outcome.failure
    if failure is not None and failure.code is not None:
        if shaper.is_slow_down(failure.code, failure.text) and not outcome.refused:
            return failure.code, failure.text
    refused = outcome.refused
    recipients = outcome.transaction.recipients
    if refused and len(refused) == len(recipients):
        replies = list(refused.values())
        if all(code is not None and shaper.is_slow_down(code, text) for code, text in replies):
            return replies[0]
    return None


def _limited(transaction: Transaction, relay: Relay, wait: float) -> Outcome:
    text = f"waiting {wait:.0f} s for the limits of relay {relay.name} (rate, quota or sessions)"
    return Outcome(transaction, failure=Failure("limited", None, text, retry_after=wait))
