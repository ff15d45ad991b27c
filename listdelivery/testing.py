"""An in-process SMTP server for tests, with fault injection.

Built on aiosmtpd only (no Django), so host sites can use it in their own test
suites::

    with SMTPTestServer() as server:
        ...  # point the code under test at server.host / server.port
        assert server.wait_for(1)
        assert server.messages[0].rcpt_tos == ["anne@example.com"]

Every SMTP transaction that ends in ``250 OK`` after DATA is recorded as a
:class:`ReceivedMessage`. The fault attributes (``fail_rcpt``, ``fail_mail``,
``fail_data``, ``drop_data``, ``delay``) can be changed at any time from the
test thread; :meth:`SMTPTestServer.stop` makes the port refuse connections and
:meth:`SMTPTestServer.start` brings the server back on the same port.
"""

from __future__ import annotations

import asyncio
import collections
import email
import email.message
import socket
import ssl
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["ReceivedMessage", "SMTPTestServer"]


@dataclass
class ReceivedMessage:
    """One accepted SMTP transaction."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    connection: int

    @property
    def message(self) -> email.message.Message:
        """The content parsed with the compat32 policy, line endings as a mailbox stores them."""
        return email.message_from_bytes(self.content.replace(b"\r\n", b"\n"))


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
        if self._owner.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before aiosmtpd's closing "250 HELP"
        return responses

    async def handle_MAIL(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = self._owner.fail_mail
        if reply is not None:
            return reply
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
        failures = {key.lower(): reply for key, reply in list(self._owner.fail_rcpt.items())}
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
        reply = owner.fail_data
        if reply is not None:
            return reply
        assert isinstance(smtp, _SMTP)
        assert envelope.mail_from is not None
        assert envelope.original_content is not None
        owner._record(
            ReceivedMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                mail_options=list(envelope.mail_options),
                connection=smtp.connection_number,
            )
        )
        return "250 OK"


class _SMTP(SMTP):
    """An SMTP session that knows which numbered connection it serves."""

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
        if plaintext_auth:
            # Passing auth_require_tls=False to SMTP() emits a UserWarning for
            # every connection; the test server offers AUTH in clear on purpose.
            self._auth_require_tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the re-entry after STARTTLS
            self.connection_number = self._owner._register_connection(
                transport.get_extra_info("peername")
            )
        super().connection_made(transport)


class _Controller(Controller):
    """A Controller whose sessions are :class:`_SMTP` bound to the test server."""

    def __init__(self, owner: SMTPTestServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self._owner = owner

    def factory(self) -> _SMTP:
        return _SMTP(self._owner, self.handler, **self.SMTP_kwargs)

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

    ``auth=(username, password)`` offers AUTH PLAIN and LOGIN without TLS and
    requires it before MAIL FROM. ``tls_context`` offers (but does not require)
    STARTTLS. The port is picked at construction time when not given and is
    kept across :meth:`stop` / :meth:`start`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        auth: tuple[str, str] | None = None,
        smtputf8: bool = True,
        pipelining: bool = True,
        tls_context: ssl.SSLContext | None = None,
        data_size_limit: int = 64 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = _free_port(host) if port is None else port
        self.auth = auth
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.tls_context = tls_context
        self.data_size_limit = data_size_limit

        self._lock = threading.Lock()
        self._received = threading.Condition(self._lock)
        self._messages: list[ReceivedMessage] = []
        self._connections = 0
        self._trigger_port: int | None = None
        self._controller: _Controller | None = None

        self.fail_rcpt: dict[str, str] = {}
        self.fail_mail: str | None = None
        self.fail_data: str | None = None
        self.drop_data = 0
        self.delay = 0.0

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
        smtp_kwargs: dict[str, Any] = {
            "data_size_limit": self.data_size_limit,
            "enable_SMTPUTF8": self.smtputf8,
            "decode_data": False,
            "tls_context": self.tls_context,
        }
        if self.auth is not None:
            smtp_kwargs.update(
                auth_required=True,
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

    def clear(self) -> None:
        """Forget messages and connections, and switch off every fault."""
        with self._lock:
            self._messages.clear()
            self._connections = 0
            self.fail_rcpt = {}
            self.fail_mail = None
            self.fail_data = None
            self.drop_data = 0
            self.delay = 0.0

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

    def _register_connection(self, peer: Any) -> int:
        with self._lock:
            if self._trigger_port is not None and peer and peer[1] == self._trigger_port:
                self._trigger_port = None
                return 0
            self._connections += 1
            return self._connections

    def _take_drop(self) -> bool:
        with self._lock:
            if self.drop_data > 0:
                self.drop_data -= 1
                return True
            return False

    def _record(self, message: ReceivedMessage) -> None:
        with self._received:
            self._messages.append(message)
            self._received.notify_all()
