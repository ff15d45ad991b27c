"""An in-process SMTP server for tests, with fault injection.

Built on aiosmtpd only (no Django), so host sites can use it in their own test
suites::

    with SMTPTestServer() as server:
        ...  # point the code under test at server.host / server.port
        assert server.wait_for(1)
        assert server.messages[0].rcpt_tos == ["anne@example.com"]

Every SMTP transaction that ends in ``250 OK`` after DATA is recorded as a
:class:`ReceivedMessage`. :meth:`SMTPTestServer.stop` makes the port refuse
connections and :meth:`SMTPTestServer.start` brings the server back on the same
port.

Faults are public attributes that can be changed at any time from the test
thread; :meth:`SMTPTestServer.clear` switches them all off again:

``fail_rcpt``
    ``{address: reply}``: answer RCPT for these addresses (case-insensitive) with
    ``reply``, sent verbatim, even with a code no server should send
    (``"4x1 try later"``).
``fail_mail`` / ``fail_data``
    A reply (verbatim) to every MAIL FROM / to the end of every DATA.
``fail_starttls``
    A reply (verbatim) to STARTTLS instead of starting TLS.
``drop_data``
    Hang up, without a reply, at the end of DATA this many times.
``hang_up_after_messages``
    A session that has had this many messages accepted hangs up right after
    the last one's 250, reading nothing more (a server at its per-session
    limit that leaves without a 421).
``delay`` / ``rcpt_delay``
    Seconds to wait before the reply to DATA / before each reply to RCPT.
``max_line_length``
    A message with a line longer than this many octets (CRLF not counted) gets
    ``500 5.5.2 Line too long`` at the end of DATA and is not recorded, as many
    servers do over 998. ``None``: lines of any length are accepted, so a test
    can see what a client sent.
``max_local_part``
    A MAIL FROM whose local part is longer than this many octets gets
    ``553 5.1.7 Local part too long``.
``max_recipients``
    RCPTs beyond this many accepted ones in a transaction get
    ``452 4.5.3 Too many recipients``.
``hard_error_limit``
    Like Postfix's ``smtpd_hard_error_limit``: once a session has had this many
    4xx/5xx replies, the next command gets ``421 4.7.0 Error: too many errors``
    and the server hangs up.
``max_connections``
    A connection beyond this many open at once gets ``max_connections_reply``
    (``421 4.7.0 Too many connections``; Postfix's anvil says
    ``421 4.7.0 <host>: Error: too many connections from <ip>``) as its
    greeting and is closed; it is counted in ``refused_connections``, not in
    ``connections``.
``rate_limit``
    Messages per second the server accepts, over a sliding 1-second window
    across all sessions: a transaction that would make it more gets
    ``throttle_reply`` (SES's ``454 4.7.0 Throttling failure: Maximum sending
    rate exceeded.``) and is not recorded. The reply comes at the end of DATA,
    where SES gives it (smtplib raises ``SMTPDataError``); the session goes on.
    Refused transactions do not count against the rate.
``quota``
    Once this many messages are recorded (since the last ``clear()``), every
    further transaction gets ``quota_reply`` (SES's ``454 4.7.0 Throttling
    failure: Daily message quota exceeded.``) at the end of DATA.
``size_limit``
    For new connections: advertise ``SIZE`` with this limit instead of the
    constructor's ``data_size_limit``, and refuse larger messages with 552.

Constructor options describe the server rather than a fault and are not reset
by ``clear()``: ``auth``, ``auth_mechanisms``, ``smtputf8``, ``pipelining``,
``tls_context``, ``data_size_limit``, ``eight_bit_mime`` (``False`` leaves
8BITMIME out of the EHLO reply and refuses ``BODY=8BITMIME`` with 555) and
``xverp`` (``True`` offers Postfix's XVERP and takes ``XVERP`` or ``XVERP=+=`` at
MAIL FROM; without it that parameter gets 555, as from any server that does not
offer it). A message sent with XVERP is recorded once, with all its
``rcpt_tos`` and ``XVERP=+=`` in ``mail_options``;
:meth:`ReceivedMessage.sender_for` gives the sender each recipient's copy
would carry.

What the server saw besides messages: ``connections`` (sessions accepted),
``refused_connections``, ``peak_connections`` (the most sessions open at once),
``throttled`` (transactions refused by ``rate_limit`` or ``quota``),
``ehlo_names`` (the name of every EHLO or HELO, in order) and, per message,
``ReceivedMessage.eight_bit`` (whether its content had any byte over 127) and
``ReceivedMessage.received_at`` (``time.monotonic()`` when it was accepted), from
which ``max_in_window()`` and ``mean_rate()`` measure the pace of a test's
traffic. ``clear()`` forgets all of these too, so a test measures only what
came after it.
"""

from __future__ import annotations

import asyncio
import collections
import email
import email.message
import functools
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, AnyStr

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

__all__ = ["ReceivedMessage", "SMTPTestServer"]

TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections"
THROTTLING_FAILURE = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
QUOTA_EXCEEDED = "454 4.7.0 Throttling failure: Daily message quota exceeded."
#: Postfix's default XVERP delimiters: the first follows the sender's local part, the second
#: stands for the recipient's @.
XVERP_DELIMITERS = "+="
#: The window ``rate_limit`` counts accepted messages over.
RATE_WINDOW_SECONDS = 1.0
#: How long a hung-up session waits for the client to close before closing itself.
LINGER_SECONDS = 2.0


@dataclass
class ReceivedMessage:
    """One accepted SMTP transaction."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    connection: int
    #: ``time.monotonic()`` when the server accepted the message.
    received_at: float = 0.0
    #: Whether the client had already sent more (the next transaction's commands, with
    #: PIPELINING) when the message ended, before the server's reply to it.
    followed_by_commands: bool = False

    @property
    def message(self) -> email.message.Message:
        """The content parsed with the compat32 policy, line endings as a mailbox stores them."""
        return email.message_from_bytes(self.content.replace(b"\r\n", b"\n"))

    @property
    def eight_bit(self) -> bool:
        """Whether the content had any byte over 127."""
        return not self.content.isascii()

    def sender_for(self, recipient: str) -> str:
        """The envelope sender ``recipient``'s copy carries: ``mail_from``, or with XVERP the
        address Postfix writes (``bounces+local=domain@…`` with its default delimiters)."""
        option = next((o for o in self.mail_options if o.partition("=")[0] == "XVERP"), None)
        if option is None:
            return self.mail_from
        delimiters = option.partition("=")[2] or XVERP_DELIMITERS
        local, _, domain = recipient.rpartition("@")
        bounces, _, sender_domain = self.mail_from.rpartition("@")
        return f"{bounces}{delimiters[0]}{local}{delimiters[1]}{domain}@{sender_domain}"


def _longest_line(content: bytes) -> int:
    return max(len(line) for line in content.split(b"\r\n"))


class _Handler:
    """aiosmtpd hooks that apply the server's faults and record messages."""

    def __init__(self, owner: SMTPTestServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self._owner._record_ehlo(hostname)
        if not self._owner.eight_bit_mime:
            responses.remove("250-8BITMIME")
        if self._owner.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before aiosmtpd's closing "250 HELP"
        if self._owner.xverp:
            responses.insert(-1, "250-XVERP")
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        self._owner._record_ehlo(hostname)
        return f"250 {server.hostname}"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # A client that has read "221" may open its next session at once; the
        # session it quit must no longer count as open by then.
        assert isinstance(server, _SMTP)
        server.end_session()
        return "221 Bye"

    async def handle_MAIL(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        owner = self._owner
        reply = owner.fail_mail
        if reply is not None:
            return reply
        if not owner.eight_bit_mime and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 BODY=8BITMIME is not supported"
        local_part = address.rpartition("@")[0] if "@" in address else address
        limit = owner.max_local_part
        if limit is not None and len(local_part.encode("utf-8", "surrogateescape")) > limit:
            return "553 5.1.7 Local part too long"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        owner = self._owner
        if owner.rcpt_delay > 0:
            await asyncio.sleep(owner.rcpt_delay)
        limit = owner.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        failures = {key.lower(): reply for key, reply in list(owner.fail_rcpt.items())}
        reply = failures.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        owner = self._owner
        if owner.delay > 0:
            await asyncio.sleep(owner.delay)
        if owner._take_drop():
            assert smtp.transport is not None
            smtp.transport.abort()
            # connection_lost() cancels the session task while we wait here, so
            # aiosmtpd never tries to write a reply to the dead connection.
            await asyncio.get_running_loop().create_future()
        assert isinstance(smtp, _SMTP)
        assert envelope.mail_from is not None
        assert envelope.original_content is not None
        limit = owner.max_line_length
        if limit is not None and _longest_line(envelope.original_content) > limit:
            return "500 5.5.2 Line too long"
        reply = owner.fail_data
        if reply is not None:
            return reply
        reply = owner._accept(
            ReceivedMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                mail_options=list(envelope.mail_options),
                connection=smtp.connection_number,
                followed_by_commands=smtp.has_unread_input(),
            )
        )
        if reply.startswith("250"):
            smtp.accepted += 1
            limit = owner.hang_up_after_messages
            smtp.hang_up_after_reply = limit is not None and smtp.accepted >= limit
        return reply


class _SMTP(SMTP):
    """An SMTP session that knows which numbered connection it serves, and can refuse it."""

    # aiosmtpd refuses DATA lines over 1001 octets by itself; the test server leaves
    # that to max_line_length, so that a test sees the long line a client sent.
    line_length_limit = 1024 * 1024

    def __init__(
        self,
        owner: SMTPTestServer,
        handler: _Handler,
        *,
        plaintext_auth: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner
        self.connection_number = 0
        self._refused = False
        self._open = False
        self._error_replies = 0
        self._hung_up = False
        self.accepted = 0  # messages of this session
        self.hang_up_after_reply = False
        self._smtp_methods = {
            name: self._unless_too_many_errors(method)
            for name, method in self._smtp_methods.items()
        }
        if plaintext_auth:
            # Passing auth_require_tls=False to SMTP() emits a UserWarning for
            # every connection; the test server offers AUTH in clear on purpose.
            self._auth_require_tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the re-entry after STARTTLS
            self.connection_number, self._refused = self._owner._register_connection(
                transport.get_extra_info("peername")
            )
            self._open = self.connection_number > 0 and not self._refused
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.end_session()
        super().connection_lost(error)

    def end_session(self) -> None:
        """Stop counting this session as open (at QUIT, or when the connection is lost)."""
        if self._open:
            self._open = False
            self._owner._unregister_connection()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd refuses parameters it does not know: with ``xverp`` it is taken out before,
        and added to the envelope's options once MAIL FROM is accepted."""
        xverp = None
        if arg and self._owner.xverp:
            words = arg.split(" ")
            kept = [w for w in words if w.upper().partition("=")[0] != "XVERP"]
            if len(kept) < len(words):
                xverp = next(w for w in words if w not in kept).upper()
                arg = " ".join(kept)
        nested = self.envelope.mail_from is not None
        await super().smtp_MAIL(arg)
        if xverp and not nested and self.envelope.mail_from is not None:
            self.envelope.mail_options.append(xverp)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self._owner.fail_starttls
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_STARTTLS(arg)

    async def _handle_client(self) -> None:
        if self._refused:
            await self.push(self._owner.max_connections_reply)
            self._hang_up()
            return
        await super()._handle_client()

    async def push(self, status: AnyStr) -> None:
        if self._hung_up:
            return  # what the client sent after the hang-up gets no reply
        first = status[:1]
        if first in ("4", "5", b"4", b"5"):
            self._error_replies += 1
        await super().push(status)
        if self.hang_up_after_reply:
            self._hang_up()

    def has_unread_input(self) -> bool:
        """Whether the client's bytes after the current line are already here, unread."""
        return bool(getattr(self._reader, "_buffer", b""))

    def _unless_too_many_errors(
        self, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)  # keeps the syntax aiosmtpd's HELP reads
        async def command(arg: str | None) -> None:
            limit = self._owner.hard_error_limit
            if limit is not None and self._error_replies >= limit:
                await self.push(TOO_MANY_ERRORS)
                self._hang_up()
            elif not self._hung_up:
                await method(arg)

        return command

    def _hang_up(self) -> None:
        """Close the session after the last reply, reading and ignoring what the client still sends.

        Closing a socket with unread input sends a TCP reset, which can destroy the
        last reply before the client reads it; real servers linger for this reason.
        """
        self._hung_up = True
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()


class _Controller(Controller):
    """A Controller whose sessions are :class:`_SMTP` bound to the test server."""

    def __init__(self, owner: SMTPTestServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self._owner = owner

    def factory(self) -> _SMTP:
        kwargs = dict(self.SMTP_kwargs)
        if self._owner.size_limit is not None:
            kwargs["data_size_limit"] = self._owner.size_limit
        return _SMTP(self._owner, self.handler, **kwargs)

    def _trigger_server(self) -> None:
        """Make the start-up probe connection, telling the owner not to count it."""
        family, type_, proto, _, address = socket.getaddrinfo(
            self.hostname, self.port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, type_, proto) as sock:
            sock.settimeout(1.0)
            sock.bind((address[0], 0))
            self._owner._trigger_port = sock.getsockname()[1]
            sock.connect(address)
            sock.recv(1024)


def _free_port(host: str) -> int:
    family, type_, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, type_, proto) as sock:
        sock.bind(address)
        return sock.getsockname()[1]


class SMTPTestServer:
    """An aiosmtpd server in a background thread that records what it receives.

    ``auth=(username, password)`` offers AUTH (``auth_mechanisms``, PLAIN and
    LOGIN by default) without TLS and requires it before MAIL FROM; credentials
    are compared as UTF-8.
    ``tls_context`` offers (but does not require) STARTTLS. The port is picked
    at construction time when not given and is kept across :meth:`stop` /
    :meth:`start`. The faults are described in the module's docstring.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        auth: tuple[str, str] | None = None,
        auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
        smtputf8: bool = True,
        pipelining: bool = True,
        eight_bit_mime: bool = True,
        tls_context: ssl.SSLContext | None = None,
        data_size_limit: int = 64 * 1024 * 1024,
        xverp: bool = False,
    ) -> None:
        self.host = host
        self.port = _free_port(host) if port is None else port
        self.auth = auth
        self.auth_mechanisms = auth_mechanisms
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.eight_bit_mime = eight_bit_mime
        self.tls_context = tls_context
        self.data_size_limit = data_size_limit
        self.xverp = xverp

        self._lock = threading.Lock()
        self._received = threading.Condition(self._lock)
        self._messages: list[ReceivedMessage] = []
        self._connections = 0
        self._refused_connections = 0
        self._open_connections = 0
        self._peak_connections = 0
        self._throttled = 0
        #: Accepted messages' times within the last RATE_WINDOW_SECONDS, for rate_limit.
        self._recent: collections.deque[float] = collections.deque()
        self._ehlo_names: list[str] = []
        self._trigger_port: int | None = None
        self._controller: _Controller | None = None
        self._switch_faults_off()

    def _switch_faults_off(self) -> None:
        self.fail_rcpt: dict[str, str] = {}
        self.fail_mail: str | None = None
        self.fail_data: str | None = None
        self.fail_starttls: str | None = None
        self.drop_data = 0
        self.hang_up_after_messages: int | None = None
        self.delay = 0.0
        self.rcpt_delay = 0.0
        self.max_line_length: int | None = None
        self.max_local_part: int | None = None
        self.max_recipients: int | None = None
        self.hard_error_limit: int | None = None
        self.max_connections: int | None = None
        self.max_connections_reply = TOO_MANY_CONNECTIONS
        self.rate_limit: int | None = None
        self.throttle_reply = THROTTLING_FAILURE
        self.quota: int | None = None
        self.quota_reply = QUOTA_EXCEEDED
        self.size_limit: int | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SMTPTestServer {self.host}:{self.port} {state}>"

    @property
    def running(self) -> bool:
        """Whether the server is currently listening."""
        return self._controller is not None

    def start(self) -> SMTPTestServer:
        """Start listening on ``host:port``; does nothing if already running."""
        if self._controller is not None:
            return self
        with self._lock:
            self._open_connections = 0  # stop() dropped them all
        smtp_kwargs: dict[str, Any] = {
            "data_size_limit": self.data_size_limit,
            "enable_SMTPUTF8": self.smtputf8,
            "decode_data": False,
            "tls_context": self.tls_context,
        }
        if self.auth is not None:
            smtp_kwargs.update(
                auth_required=True,
                auth_exclude_mechanism=[
                    m for m in ("PLAIN", "LOGIN") if m not in self.auth_mechanisms
                ],
                authenticator=self._authenticate,
                plaintext_auth=True,
            )
        controller = _Controller(
            self,
            hostname=self.host,
            port=self.port,
            server_hostname="localhost",
            **smtp_kwargs,
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections; does nothing if not running."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SMTPTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A copy of the messages received so far, oldest first."""
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """How many client connections have been accepted."""
        with self._lock:
            return self._connections

    @property
    def refused_connections(self) -> int:
        """How many connections got ``421 Too many connections`` as their greeting."""
        with self._lock:
            return self._refused_connections

    @property
    def peak_connections(self) -> int:
        """The most sessions open at once (refused connections not counted)."""
        with self._lock:
            return self._peak_connections

    @property
    def throttled(self) -> int:
        """How many transactions got ``throttle_reply`` or ``quota_reply``."""
        with self._lock:
            return self._throttled

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most messages accepted within any span of ``seconds``."""
        times = [message.received_at for message in self.messages]
        most = 0
        end = 0
        for start, first in enumerate(times):
            while end < len(times) and times[end] < first + seconds:
                end += 1
            most = max(most, end - start)
        return most

    def mean_rate(self) -> float:
        """Messages per second from the first accepted message to the last; 0.0 for fewer than 2."""
        messages = self.messages
        if len(messages) < 2:
            return 0.0
        span = messages[-1].received_at - messages[0].received_at
        return (len(messages) - 1) / span if span > 0 else float("inf")

    @property
    def ehlo_names(self) -> list[str]:
        """The name sent with every EHLO or HELO so far, oldest first."""
        with self._lock:
            return list(self._ehlo_names)

    def clear(self) -> None:
        """Forget what the server saw and switch off every fault.

        Messages, connections, throttled transactions and EHLO names are
        forgotten; ``peak_connections`` starts again from the sessions open now.
        """
        with self._lock:
            self._messages.clear()
            self._recent.clear()
            self._connections = 0
            self._refused_connections = 0
            self._peak_connections = self._open_connections
            self._throttled = 0
            self._ehlo_names.clear()
            self._switch_faults_off()

    def recipients_count(self) -> collections.Counter[str]:
        """How many messages each (lowercased) envelope recipient received."""
        return collections.Counter(
            rcpt.lower() for message in self.messages for rcpt in message.rcpt_tos
        )

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` messages were received; False on timeout."""
        with self._received:
            return self._received.wait_for(lambda: len(self._messages) >= count, timeout)

    def _authenticate(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self.auth is not None
        username, password = self.auth
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == username.encode()
            and auth_data.password == password.encode()
        )
        # handled=False lets aiosmtpd answer 535 itself on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def _register_connection(self, peer: Any) -> tuple[int, bool]:
        """The new connection's number (0 for the start-up probe), and whether to refuse it."""
        with self._lock:
            if self._trigger_port is not None and peer and peer[1] == self._trigger_port:
                self._trigger_port = None
                return 0, False
            limit = self.max_connections
            if limit is not None and self._open_connections >= limit:
                self._refused_connections += 1
                return 0, True
            self._open_connections += 1
            self._peak_connections = max(self._peak_connections, self._open_connections)
            self._connections += 1
            return self._connections, False

    def _unregister_connection(self) -> None:
        with self._lock:
            self._open_connections -= 1

    def _record_ehlo(self, name: str) -> None:
        with self._lock:
            self._ehlo_names.append(name)

    def _take_drop(self) -> bool:
        with self._lock:
            if self.drop_data > 0:
                self.drop_data -= 1
                return True
            return False

    def _accept(self, message: ReceivedMessage) -> str:
        """Record the message and answer 250, unless the quota or the rate limit refuses it."""
        with self._received:
            now = time.monotonic()
            recent = self._recent
            while recent and recent[0] <= now - RATE_WINDOW_SECONDS:
                recent.popleft()
            if self.quota is not None and len(self._messages) >= self.quota:
                self._throttled += 1
                return self.quota_reply
            if self.rate_limit is not None and len(recent) >= self.rate_limit:
                self._throttled += 1
                return self.throttle_reply
            recent.append(now)
            message.received_at = now
            self._messages.append(message)
            self._received.notify_all()
            return "250 OK"
