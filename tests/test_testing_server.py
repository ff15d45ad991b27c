"""Tests for listdelivery.testing.SMTPTestServer, driven with smtplib (no Django, no database)."""

from __future__ import annotations

import collections
import shutil
import smtplib
import socket
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


# -- faults for the hostile world (issue 10) -----------------------------------


def talk(server: SMTPTestServer, *commands: str, pipelined: bool = False) -> list[str]:
    """Raw SMTP: the greeting and each reply's last line, verbatim, until the server hangs up."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        replies = sock.makefile("rb")

        def reply() -> str | None:
            try:
                while (line := replies.readline()) and line[3:4] == b"-":
                    pass
            except OSError:
                return None
            return line.decode().rstrip("\r\n") or None

        answers = [reply()]
        if pipelined:
            sock.sendall("".join(f"{c}\r\n" for c in commands).encode())
        for command in commands:
            if not pipelined:
                try:
                    sock.sendall(f"{command}\r\n".encode())
                except OSError:
                    break
            answers.append(reply())
            if answers[-1] is None:
                break
    return [a for a in answers if a is not None]


def test_rcpt_delay_slows_down_every_rcpt(server: SMTPTestServer) -> None:
    server.rcpt_delay = 0.15
    with connect(server) as client:
        client.ehlo()
        started = time.monotonic()
        client.sendmail("s@example.com", ["bart@example.com", "cris@example.com"], MESSAGE)
        elapsed = time.monotonic() - started

    assert elapsed >= 0.3
    assert server.messages[0].rcpt_tos == ["bart@example.com", "cris@example.com"]


def test_a_reply_with_a_code_no_server_should_send_reaches_the_client_verbatim(
    server: SMTPTestServer,
) -> None:
    server.fail_rcpt = {"bart@example.com": "4x1 try later"}
    replies = talk(server, "EHLO me", "MAIL FROM:<s@example.com>", "RCPT TO:<bart@example.com>")
    assert replies[-1] == "4x1 try later"


@pytest.mark.parametrize("length, accepted", [(998, True), (999, False)])
def test_max_line_length_refuses_a_longer_line_at_data(
    server: SMTPTestServer, length: int, accepted: bool
) -> None:
    server.max_line_length = 998
    body = "Subject: long\r\n\r\n" + "x" * length + "\r\n"
    with connect(server) as client:
        if accepted:
            client.sendmail("s@example.com", ["bart@example.com"], body)
        else:
            with pytest.raises(smtplib.SMTPDataError) as excinfo:
                client.sendmail("s@example.com", ["bart@example.com"], body)
            assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (
                500,
                b"5.5.2 Line too long",
            )
        client.sendmail("s@example.com", ["cris@example.com"], MESSAGE)  # the session goes on

    assert [m.rcpt_tos for m in server.messages] == (
        [["bart@example.com"], ["cris@example.com"]] if accepted else [["cris@example.com"]]
    )


def test_without_max_line_length_a_long_line_arrives_as_sent(server: SMTPTestServer) -> None:
    body = b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n"
    with connect(server) as client:
        client.sendmail("s@example.com", ["bart@example.com"], body)
    assert server.messages[0].content == body


def test_a_server_without_8bitmime_does_not_offer_it_and_refuses_body_8bitmime() -> None:
    with SMTPTestServer(eight_bit_mime=False) as smtp_server, connect(smtp_server) as client:
        client.ehlo()
        assert not client.has_extn("8bitmime")
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail(
                "s@example.com", ["bart@example.com"], MESSAGE, mail_options=["BODY=8BITMIME"]
            )
        assert excinfo.value.smtp_code == 555
        client.sendmail(
            "s@example.com", ["bart@example.com"], "Subject: Grüße\r\n\r\nÜber\r\n".encode()
        )
        client.sendmail("s@example.com", ["cris@example.com"], MESSAGE)

        first, second = smtp_server.messages
    assert (first.eight_bit, second.eight_bit) == (True, False)


def test_max_local_part_refuses_a_longer_sender(server: SMTPTestServer) -> None:
    server.max_local_part = 64
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail("l" * 65 + "@example.com", ["bart@example.com"], MESSAGE)
        assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (
            553,
            b"5.1.7 Local part too long",
        )
        client.sendmail("l" * 64 + "@example.com", ["bart@example.com"], MESSAGE)

    assert [m.mail_from for m in server.messages] == ["l" * 64 + "@example.com"]


def test_max_recipients_answers_452_beyond_the_limit(server: SMTPTestServer) -> None:
    server.max_recipients = 2
    recipients = ["anne@example.com", "bart@example.com", "cris@example.com"]
    with connect(server) as client:
        refused = client.sendmail("s@example.com", recipients, MESSAGE)
        client.sendmail("s@example.com", ["cris@example.com"], MESSAGE)  # a new transaction

    assert refused == {"cris@example.com": (452, b"4.5.3 Too many recipients")}
    assert [m.rcpt_tos for m in server.messages] == [recipients[:2], ["cris@example.com"]]


@pytest.mark.parametrize("pipelined", [False, True])
def test_hard_error_limit_hangs_up_like_postfix(server: SMTPTestServer, pipelined: bool) -> None:
    server.hard_error_limit = 3
    server.fail_rcpt = {f"gone{i}@example.com": "550 5.1.1 No such user" for i in range(5)}
    commands = [
        "EHLO me",
        "MAIL FROM:<s@example.com>",
        *(f"RCPT TO:<gone{i}@example.com>" for i in range(5)),
        "RCPT TO:<bart@example.com>",
    ]

    replies = talk(server, *commands, pipelined=pipelined)

    assert replies[3:] == ["550 5.1.1 No such user"] * 3 + ["421 4.7.0 Error: too many errors"]


def test_max_connections_refuses_one_more_with_421(server: SMTPTestServer) -> None:
    server.max_connections = 1
    with connect(server) as first:
        with pytest.raises(smtplib.SMTPConnectError) as excinfo:
            connect(server)
        assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (
            421,
            b"4.7.0 Too many connections",
        )
        first.sendmail("s@example.com", ["bart@example.com"], MESSAGE)

    deadline = time.monotonic() + 5
    while True:  # the server notices the first connection's end a moment later
        try:
            with connect(server) as again:
                again.sendmail("s@example.com", ["cris@example.com"], MESSAGE)
            break
        except smtplib.SMTPConnectError:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    assert server.connections == 2
    assert server.refused_connections >= 1
    assert [m.connection for m in server.messages] == [1, 2]


def test_size_limit_is_advertised_and_enforced(server: SMTPTestServer) -> None:
    server.size_limit = 100
    with connect(server) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "100"
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:
            client.sendmail("s@example.com", ["bart@example.com"], "x" * 200)
        client.ehlo()
        client.does_esmtp = False  # no SIZE= in MAIL FROM: the limit is enforced at DATA
        with pytest.raises(smtplib.SMTPDataError) as undeclared:
            client.sendmail("s@example.com", ["bart@example.com"], "x" * 200)

    assert (declared.value.smtp_code, undeclared.value.smtp_code) == (552, 552)
    assert server.messages == []


def test_ehlo_and_helo_names_are_recorded(server: SMTPTestServer) -> None:
    with smtplib.SMTP(server.host, server.port, local_hostname="lists.example.org") as client:
        client.ehlo()
        client.helo("old.example.org")
    assert server.ehlo_names == ["lists.example.org", "old.example.org"]


def test_fail_starttls(tls_context: ssl.SSLContext) -> None:
    with SMTPTestServer(tls_context=tls_context) as smtp_server:
        smtp_server.fail_starttls = "454 4.7.0 TLS not available due to local problem"
        with connect(smtp_server) as client:
            client.ehlo()
            with pytest.raises(smtplib.SMTPResponseException) as excinfo:
                client.starttls()
    assert excinfo.value.smtp_code == 454


def test_clear_switches_off_the_hostile_faults_too(server: SMTPTestServer) -> None:
    with smtplib.SMTP(server.host, server.port, local_hostname="a.example") as client:
        client.ehlo()
    server.rcpt_delay = 1.0
    server.max_line_length = 10
    server.max_local_part = 1
    server.max_recipients = 0
    server.hard_error_limit = 0
    server.max_connections = 0
    server.size_limit = 10
    server.fail_starttls = "454 No"

    server.clear()

    assert server.ehlo_names == []
    assert server.refused_connections == 0
    with connect(server) as client:
        client.sendmail("long-sender@example.com", ["bart@example.com"], MESSAGE)
    assert len(server.messages) == 1


# -- a fault-injecting sink for traffic shaping (issue 13) ----------------------


def send_each(server: SMTPTestServer, recipients: list[str]) -> list[int]:
    """One transaction per recipient on one session; the reply code of each."""
    codes = []
    with connect(server) as client:
        for rcpt in recipients:
            try:
                client.sendmail("s@example.com", [rcpt], MESSAGE)
                codes.append(250)
            except smtplib.SMTPDataError as error:
                codes.append(error.smtp_code)
    return codes


def test_above_the_rate_limit_transactions_get_ses_454_at_data_and_are_not_recorded(
    server: SMTPTestServer,
) -> None:
    server.rate_limit = 3
    with connect(server) as client:
        for name in ("anne", "bart", "cris"):
            client.sendmail("s@example.com", [f"{name}@example.com"], MESSAGE)
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.sendmail("s@example.com", ["dave@example.com"], MESSAGE)
        client.noop()  # the session goes on

    assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (
        454,
        b"4.7.0 Throttling failure: Maximum sending rate exceeded.",
    )
    assert [m.rcpt_tos for m in server.messages] == [
        ["anne@example.com"],
        ["bart@example.com"],
        ["cris@example.com"],
    ]
    assert server.throttled == 1


def test_the_rate_limit_is_shared_by_every_session(server: SMTPTestServer) -> None:
    server.rate_limit = 5
    results: list[list[int]] = []
    recipients = [f"member{i}@example.com" for i in range(5)]
    senders = [
        threading.Thread(target=lambda: results.append(send_each(server, recipients)))
        for _ in range(4)
    ]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    elapsed = time.monotonic() - started

    assert elapsed < 1.0, "the burst itself took a second: the window let more through"
    codes = [code for session in results for code in session]
    assert sorted(codes) == [250] * 5 + [454] * 15
    assert len(server.messages) == 5
    assert server.throttled == 15
    assert server.max_in_window() == 5


def test_the_window_slides_and_measures_the_pace(server: SMTPTestServer) -> None:
    server.rate_limit = 2
    with connect(server) as client:
        client.sendmail("s@example.com", ["anne@example.com"], MESSAGE)
        first = server.messages[0].received_at
        time.sleep(0.5)
        client.sendmail("s@example.com", ["bart@example.com"], MESSAGE)
        with pytest.raises(smtplib.SMTPDataError):  # anne and bart fill the second
            client.sendmail("s@example.com", ["cris@example.com"], MESSAGE)

        time.sleep(max(0.0, first + 1.05 - time.monotonic()))
        client.sendmail("s@example.com", ["cris@example.com"], MESSAGE)  # anne has left it
        with pytest.raises(smtplib.SMTPDataError):  # bart has not
            client.sendmail("s@example.com", ["dave@example.com"], MESSAGE)

    anne, bart, cris = server.messages
    assert [m.rcpt_tos for m in (anne, bart, cris)] == [
        ["anne@example.com"],
        ["bart@example.com"],
        ["cris@example.com"],
    ]
    assert server.throttled == 2
    assert server.max_in_window(1.0) == 2
    assert server.max_in_window(2.0) == 3
    assert server.mean_rate() == pytest.approx(2 / (cris.received_at - anne.received_at))
    assert 1.0 < server.mean_rate() <= 2 / 1.05


def test_pace_of_nothing(server: SMTPTestServer) -> None:
    assert (server.max_in_window(), server.mean_rate()) == (0, 0.0)


def test_peak_connections_counts_sessions_open_at_once(server: SMTPTestServer) -> None:
    all_open = threading.Barrier(4)

    def hold_a_session() -> None:
        with connect(server) as client:
            client.ehlo()
            all_open.wait(timeout=5)

    sessions = [threading.Thread(target=hold_a_session) for _ in range(4)]
    for session in sessions:
        session.start()
    for session in sessions:
        session.join()
    with connect(server) as client:
        client.sendmail("s@example.com", ["anne@example.com"], MESSAGE)

    assert server.peak_connections == 4
    assert server.connections == 5

    server.clear()
    assert server.peak_connections == 0
    with connect(server) as client:
        client.noop()
    assert server.peak_connections == 1


def test_peak_connections_leaves_out_refused_ones(server: SMTPTestServer) -> None:
    server.max_connections = 1
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPConnectError):
            connect(server)
        client.noop()
    assert (server.peak_connections, server.refused_connections) == (1, 1)


def test_max_connections_reply_can_say_what_postfix_says(server: SMTPTestServer) -> None:
    server.max_connections = 0
    server.max_connections_reply = (
        "421 4.7.0 mx.example.org: Error: too many connections from 127.0.0.1"
    )
    with pytest.raises(smtplib.SMTPConnectError) as excinfo:
        connect(server)
    assert (excinfo.value.smtp_code, excinfo.value.smtp_error) == (
        421,
        b"4.7.0 mx.example.org: Error: too many connections from 127.0.0.1",
    )


def test_over_the_quota_every_transaction_gets_454_until_clear(server: SMTPTestServer) -> None:
    server.quota = 2
    codes = send_each(server, ["anne@example.com", "bart@example.com", "cris@example.com"])
    with connect(server) as client, pytest.raises(smtplib.SMTPDataError) as excinfo:
        client.sendmail("s@example.com", ["dave@example.com"], MESSAGE)

    assert codes == [250, 250, 454]
    assert excinfo.value.smtp_error == b"4.7.0 Throttling failure: Daily message quota exceeded."
    assert len(server.messages) == 2
    assert server.throttled == 2

    server.clear()
    assert send_each(server, ["erin@example.com"]) == [250]


def test_throttle_and_quota_replies_are_configurable(server: SMTPTestServer) -> None:
    server.rate_limit = 0
    server.throttle_reply = "450 4.2.1 Peak SMTP relay limit exceeded"
    assert send_each(server, ["anne@example.com"]) == [450]
    server.rate_limit = None
    server.quota = 0
    server.quota_reply = "550 5.4.5 Daily sending quota exceeded"
    assert send_each(server, ["anne@example.com"]) == [550]
    assert server.throttled == 2


def test_clear_switches_off_the_traffic_limits(server: SMTPTestServer) -> None:
    server.rate_limit = 0
    server.quota = 0
    server.throttle_reply = server.quota_reply = "454 No"
    server.max_connections_reply = "421 No"
    send_each(server, ["anne@example.com"])

    server.clear()

    assert (server.rate_limit, server.quota, server.throttled) == (None, None, 0)
    assert server.throttle_reply.startswith("454 4.7.0 Throttling failure: Maximum")
    assert server.quota_reply.startswith("454 4.7.0 Throttling failure: Daily")
    assert server.max_connections_reply == "421 4.7.0 Too many connections"
    assert send_each(server, ["anne@example.com"]) == [250]
