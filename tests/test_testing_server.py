"""Tests for listdelivery.testing.SMTPTestServer, driven with smtplib (no Django, no database)."""

from __future__ import annotations

import collections
import shutil
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from listdelivery.testing import ReceivedMessage, SMTPTestServer

MESSAGE = "From: anne@example.com\nTo: list@example.com\nSubject: Hello\n\nFirst post!\n"


@pytest.fixture
def server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer() as smtp_server:
        yield smtp_server


def connect(server: SMTPTestServer) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, timeout=5)


def test_records_envelope_content_and_connection(server: SMTPTestServer) -> None:
    with connect(server) as client:
        refused = client.sendmail(
            "Sender@Example.com",
            ["bart@example.com", "Cris@Example.com"],
            MESSAGE,
            mail_options=["BODY=8BITMIME"],
        )
        client.sendmail("sender@example.com", ["dave@example.com"], MESSAGE)

    assert refused == {}
    first, second = server.messages
    assert isinstance(first, ReceivedMessage)
    assert first.mail_from == "Sender@Example.com"
    assert first.rcpt_tos == ["bart@example.com", "Cris@Example.com"]
    assert first.content == MESSAGE.replace("\n", "\r\n").encode()
    assert "BODY=8BITMIME" in first.mail_options
    assert first.message["Subject"] == "Hello"
    assert first.message.get_payload() == "First post!\n"
    assert (first.connection, second.connection) == (1, 1)
    assert second.rcpt_tos == ["dave@example.com"]


def test_counts_connections_but_not_the_startup_probe(server: SMTPTestServer) -> None:
    assert server.connections == 0
    for _ in range(2):
        with connect(server) as client:
            client.sendmail("sender@example.com", ["bart@example.com"], MESSAGE)

    assert server.connections == 2
    assert [m.connection for m in server.messages] == [1, 2]


def test_messages_is_a_copy(server: SMTPTestServer) -> None:
    server.messages.append(ReceivedMessage("a@x", ["b@x"], b"", [], 1))
    assert server.messages == []


def test_recipients_count_and_wait_for(server: SMTPTestServer) -> None:
    assert server.wait_for(1, timeout=0.05) is False

    def send() -> None:
        with connect(server) as client:
            client.sendmail("s@example.com", ["Bart@Example.com", "cris@example.com"], MESSAGE)
            client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

    sender = threading.Thread(target=send)
    sender.start()
    assert server.wait_for(2, timeout=5) is True
    sender.join()

    assert server.recipients_count() == collections.Counter(
        {"bart@example.com": 2, "cris@example.com": 1}
    )


def test_fail_rcpt_refuses_some_recipients(server: SMTPTestServer) -> None:
    server.fail_rcpt = {
        "Gone@Example.com": "550 5.1.1 No such user",
        "busy@example.com": "450 4.2.0 Try later",
    }
    with connect(server) as client:
        refused = client.sendmail(
            "s@example.com",
            ["gone@example.com", "bart@example.com", "BUSY@example.com"],
            MESSAGE,
        )

    assert refused == {
        "gone@example.com": (550, b"5.1.1 No such user"),
        "BUSY@example.com": (450, b"4.2.0 Try later"),
    }
    [message] = server.messages
    assert message.rcpt_tos == ["bart@example.com"]


def test_fail_rcpt_for_everyone_records_nothing(server: SMTPTestServer) -> None:
    server.fail_rcpt["gone@example.com"] = "550 5.1.1 No such user"
    with connect(server) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail("s@example.com", ["gone@example.com"], MESSAGE)
    assert server.messages == []


@pytest.mark.parametrize("reply", ["550 5.7.1 Sender rejected", "421 4.3.0 Busy"])
def test_fail_mail(server: SMTPTestServer, reply: str) -> None:
    server.fail_mail = reply
    with connect(server) as client, pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

    code, text = reply.split(" ", 1)
    assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (int(code), text.encode())
    assert server.messages == []


def test_fail_data_answers_instead_of_recording(server: SMTPTestServer) -> None:
    server.fail_data = "451 4.3.0 Local error"
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
        assert excinfo.value.smtp_code == 451
        assert server.messages == []

        server.fail_data = None
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

    assert len(server.messages) == 1


def test_drop_data_disconnects_then_recovers(server: SMTPTestServer) -> None:
    server.drop_data = 1
    with connect(server) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
    assert server.drop_data == 0
    assert server.messages == []

    with connect(server) as client:
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

    [message] = server.messages
    assert message.connection == 2


def test_delay_slows_down_data(server: SMTPTestServer) -> None:
    server.delay = 0.3
    with connect(server) as client:
        client.ehlo()
        started = time.monotonic()
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
        elapsed = time.monotonic() - started

    assert elapsed >= 0.3
    assert len(server.messages) == 1


def test_data_size_limit() -> None:
    with SMTPTestServer(data_size_limit=100) as small, connect(small) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail("s@example.com", ["bart@example.com"], "x" * 200)
    assert excinfo.value.smtp_code == 552


class TestAuth:
    @pytest.fixture
    def server(self) -> Iterator[SMTPTestServer]:
        with SMTPTestServer(auth=("user", "secret")) as smtp_server:
            yield smtp_server

    def test_mail_without_login_is_refused(self, server: SMTPTestServer) -> None:
        with connect(server) as client:
            client.ehlo()
            assert client.has_extn("auth")
            with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
                client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

        assert excinfo.value.smtp_code == 530
        assert excinfo.value.smtp_error == b"5.7.0 Authentication required"

    def test_wrong_password(self, server: SMTPTestServer) -> None:
        with connect(server) as client, pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.login("user", "wrong")
        assert excinfo.value.smtp_code == 535

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
    def test_right_password(self, server: SMTPTestServer, mechanism: str) -> None:
        with connect(server) as client:
            client.ehlo()
            client.user, client.password = "user", "secret"
            authobject = getattr(client, f"auth_{mechanism.lower()}")
            code, _ = client.auth(mechanism, authobject)
            assert code == 235
            client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

        assert len(server.messages) == 1


def test_no_auth_by_default(server: SMTPTestServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert not client.has_extn("auth")


def test_stop_refuses_connections_and_start_comes_back_on_same_port(
    server: SMTPTestServer,
) -> None:
    port = server.port
    client = connect(server)
    client.ehlo()

    server.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    with pytest.raises(ConnectionRefusedError):
        connect(server)

    server.start()
    assert server.port == port
    with connect(server) as client:
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

    assert server.connections == 2
    assert [m.connection for m in server.messages] == [2]


def test_start_and_stop_are_idempotent() -> None:
    smtp_server = SMTPTestServer()
    smtp_server.stop()
    assert smtp_server.start() is smtp_server.start()
    smtp_server.stop()
    smtp_server.stop()
    with pytest.raises(ConnectionRefusedError):
        connect(smtp_server)


@pytest.mark.parametrize("smtputf8", [True, False])
def test_smtputf8_advertisement(smtputf8: bool) -> None:
    with SMTPTestServer(smtputf8=smtputf8) as smtp_server, connect(smtp_server) as client:
        client.ehlo()
        assert client.has_extn("smtputf8") is smtputf8


def test_smtputf8_transaction(server: SMTPTestServer) -> None:
    body = "Subject: Grüße\r\n\r\nÜber\r\n".encode()
    with connect(server) as client:
        client.sendmail("jörg@example.com", ["zoë@example.com"], body, mail_options=["SMTPUTF8"])

    [message] = server.messages
    assert message.mail_from == "jörg@example.com"
    assert message.rcpt_tos == ["zoë@example.com"]
    assert "SMTPUTF8" in message.mail_options
    assert message.content == body


def test_clear_resets_everything(server: SMTPTestServer) -> None:
    with connect(server) as client:
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
    server.fail_rcpt = {"bart@example.com": "550 No"}
    server.fail_mail = "421 Busy"
    server.fail_data = "451 Later"
    server.drop_data = 3
    server.delay = 5.0

    server.clear()

    assert server.messages == []
    assert server.connections == 0
    assert server.fail_rcpt == {}
    assert (server.fail_mail, server.fail_data, server.drop_data, server.delay) == (
        None,
        None,
        0,
        0,
    )
    with connect(server) as client:
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
    assert [m.connection for m in server.messages] == [1]


@pytest.fixture
def tls_context(tmp_path: Path) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1"
    subprocess.run(
        [*command.split(), "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_starttls_is_offered_not_required(tls_context: ssl.SSLContext) -> None:
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE

    with SMTPTestServer(tls_context=tls_context) as smtp_server:
        with connect(smtp_server) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            client.starttls(context=client_context)
            client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
        with connect(smtp_server) as client:
            client.sendmail("s@example.com", ["cris@example.com"], MESSAGE)

        assert smtp_server.connections == 2
        assert [m.connection for m in smtp_server.messages] == [1, 2]
