"""The SMTP layer against a real server: sessions reused, replaced when stale, TLS verified."""

from __future__ import annotations

import ssl
import subprocess
from datetime import timedelta

import pytest

from listdelivery import conf
from listdelivery.smtp import Connection, SMTPPool, Transaction
from listdelivery.testing import SMTPTestServer

MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nHello\r\n"


def config_for(server: SMTPTestServer, **values) -> dict:
    return {**conf.DEFAULTS, "SMTP_HOST": server.host, "SMTP_PORT": server.port, **values}


def transaction(*recipients: str) -> Transaction:
    return Transaction("list-bounces@example.com", list(recipients) or ["a@example.com"], MESSAGE)


def test_a_stale_session_is_replaced_without_a_failure(smtpd):
    connection = Connection(config_for(smtpd))
    assert connection.send(transaction()).failure is None
    smtpd.stop()  # the server drops every session it had
    smtpd.start()

    outcome = connection.send(transaction("b@example.com"))

    assert outcome.failure is None
    assert [m.rcpt_tos for m in smtpd.messages] == [["a@example.com"], ["b@example.com"]]
    assert smtpd.connections == 2
    connection.close()


def test_a_server_that_is_down_is_a_connect_failure_with_mailmans_444(smtpd):
    smtpd.stop()
    outcome = Connection(config_for(smtpd)).send(transaction())
    assert (outcome.failure.stage, outcome.failure.code) == ("connect", 444)
    assert outcome.accepted == []


def test_parallel_connections_share_the_work(smtpd):
    smtpd.delay = 0.05
    with SMTPPool(config_for(smtpd, SMTP_CONNECTIONS=4)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(12))

    assert len(outcomes) == 12 and all(o.failure is None for o in outcomes)
    assert smtpd.connections == 4
    assert sorted(r for m in smtpd.messages for r in m.rcpt_tos) == sorted(
        f"r{i}@example.com" for i in range(12)
    )


def test_the_pool_stops_at_a_session_failure_instead_of_trying_every_transaction(smtpd):
    smtpd.stop()
    with SMTPPool(config_for(smtpd)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(50))
    assert len(outcomes) == 1


def test_login_happens_only_with_both_user_and_password():
    with SMTPTestServer(auth=("list", "pw")) as server:
        anonymous = Connection(config_for(server, SMTP_USER="list")).send(transaction())
        logged_in = Connection(config_for(server, SMTP_USER="list", SMTP_PASSWORD="pw")).send(
            transaction()
        )
    assert anonymous.failure.stage == "mail" and anonymous.failure.code == 530
    assert logged_in.failure is None


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> ssl.SSLContext:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_starttls_verifies_the_certificate_by_default(self_signed):
    with SMTPTestServer(tls_context=self_signed) as server:
        outcome = Connection(config_for(server, SMTP_SECURE_MODE="starttls")).send(transaction())
    assert outcome.failure.stage == "tls"
    assert "certificate verify failed" in outcome.failure.text


def test_starttls_without_verification_delivers(self_signed):
    with SMTPTestServer(tls_context=self_signed) as server:
        config = config_for(server, SMTP_SECURE_MODE="starttls", SMTP_VERIFY_CERT=False)
        outcome = Connection(config).send(transaction())
        assert outcome.failure is None
        assert len(server.messages) == 1


def test_starttls_against_a_server_without_it_is_a_tls_failure(smtpd):
    outcome = Connection(config_for(smtpd, SMTP_SECURE_MODE="starttls")).send(transaction())
    assert outcome.failure.stage == "tls"


def test_a_slow_server_times_out_as_a_temporary_failure(smtpd):
    smtpd.delay = 1.0
    outcome = Connection(config_for(smtpd, SMTP_TIMEOUT=timedelta(seconds=0.3))).send(transaction())
    assert (outcome.failure.stage, outcome.failure.code) == ("data", 444)


@pytest.mark.parametrize("pipelining", [True, False])
def test_refusals_are_matched_to_their_recipients_with_and_without_pipelining(pipelining):
    with SMTPTestServer(pipelining=pipelining) as server:
        server.fail_rcpt = {
            "b@example.com": "550 5.1.1 No such user",
            "c@example.com": "450 4.2.0 Busy",
        }
        connection = Connection(config_for(server))
        mixed = connection.send(transaction("a@example.com", "b@example.com", "c@example.com"))
        refused = connection.send(transaction("b@example.com"))
        after = connection.send(transaction("d@example.com"))

        assert mixed.accepted == ["a@example.com"]
        assert mixed.refused == {
            "b@example.com": (550, "5.1.1 No such user"),
            "c@example.com": (450, "4.2.0 Busy"),
        }
        assert (
            refused.refused == {"b@example.com": (550, "5.1.1 No such user")}
            and refused.failure is None
        )
        assert after.failure is None
        assert [m.rcpt_tos for m in server.messages] == [["a@example.com"], ["d@example.com"]]
        assert server.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_sender_fails_the_transaction_and_the_session_goes_on(pipelining):
    with SMTPTestServer(pipelining=pipelining) as server:
        server.fail_mail = "550 5.7.1 Sender rejected"
        connection = Connection(config_for(server))
        outcome = connection.send(transaction())
        server.fail_mail = None
        assert (outcome.failure.stage, outcome.failure.code) == ("mail", 550)
        assert connection.send(transaction()).failure is None
        assert len(server.messages) == 1 and server.connections == 1


def test_leading_dots_are_stuffed_and_arrive_intact(smtpd):
    message = b"From: a@example.com\r\n\r\n.hidden\r\n..two\r\nend"
    Connection(config_for(smtpd)).send(Transaction("l@example.com", ["a@example.com"], message))
    assert smtpd.messages[0].content == message + b"\r\n"
