"""The SMTP layer against a real server: sessions reused, replaced when stale, TLS verified."""

from __future__ import annotations

import collections
import logging
import smtplib
import ssl
import subprocess
import threading
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listdelivery import conf
from listdelivery.smtp import Connection, Failure, SMTPPool, Transaction
from listdelivery.testing import SMTPTestServer
from listdelivery.wire import wire_safe

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


def test_a_server_that_is_down_is_a_connect_failure_with_no_reply_code(smtpd):
    smtpd.stop()
    outcome = Connection(config_for(smtpd)).send(transaction())
    assert outcome.failure == Failure(
        "connect", None, "no reply: connection refused (ConnectionRefusedError)"
    )
    assert outcome.accepted == []
    assert outcome.undelivered == ["a@example.com"]


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
    assert outcome.failure == Failure(
        "data", None, "no reply: nothing within 0.3 seconds (TimeoutError)"
    )


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


# -- replies as the server gave them (issue 10, points 2, 23, 24, 28) -----------


def test_an_unreadable_rcpt_reply_is_a_refusal_without_a_code(smtpd):
    smtpd.fail_rcpt = {"b@example.com": "4x1 try later"}
    outcome = Connection(config_for(smtpd)).send(transaction("a@example.com", "b@example.com"))

    assert outcome.refused == {"b@example.com": (None, "unreadable reply: 4x1 try later")}
    assert outcome.accepted == ["a@example.com"]
    assert [m.rcpt_tos for m in smtpd.messages] == [["a@example.com"]]


@pytest.mark.parametrize("stage", ["mail", "data"])
def test_an_unreadable_reply_fails_the_transaction_without_a_code(smtpd, stage):
    setattr(smtpd, f"fail_{stage}", "4x1 try later")
    connection = Connection(config_for(smtpd))

    outcome = connection.send(transaction())
    setattr(smtpd, f"fail_{stage}", None)

    assert outcome.failure == Failure(stage, None, "unreadable reply: 4x1 try later")
    assert outcome.undelivered == ["a@example.com"]
    assert connection.send(transaction()).failure is None
    assert len(smtpd.messages) == 1


def test_a_dropped_connection_keeps_the_refusals_already_read(smtpd):
    smtpd.fail_rcpt = {"b@example.com": "550 5.1.1 No such user"}
    smtpd.drop_data = 1
    connection = Connection(config_for(smtpd))

    outcome = connection.send(transaction("a@example.com", "b@example.com", "c@example.com"))

    assert outcome.refused == {"b@example.com": (550, "5.1.1 No such user")}
    assert outcome.failure.stage == "data" and outcome.failure.code is None
    assert outcome.failure.text.startswith("no reply: ")
    assert outcome.undelivered == ["a@example.com", "c@example.com"]
    assert connection.send(transaction(*outcome.undelivered)).failure is None
    assert [m.rcpt_tos for m in smtpd.messages] == [["a@example.com", "c@example.com"]]


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_chunk_with_many_unknown_users_is_delivered_after_postfix_hangs_up(pipelining):
    """Postfix answers 550 to each unknown user and hangs up after smtpd_hard_error_limit."""
    unknown = [f"gone{i}@example.com" for i in range(22)]
    chunk = ["anne@example.com", *unknown, "bart@example.com", "cris@example.com"]
    with SMTPTestServer(pipelining=pipelining) as server:
        server.hard_error_limit = 20
        server.fail_rcpt = {address: "550 5.1.1 No such user" for address in unknown}
        connection = Connection(config_for(server))

        first = connection.send(transaction(*chunk))
        again = connection.send(transaction(*first.undelivered))

        assert first.failure == Failure("rcpt", 421, "4.7.0 Error: too many errors")
        assert first.refused == {
            **{address: (550, "5.1.1 No such user") for address in unknown[:20]},
            unknown[20]: (421, "4.7.0 Error: too many errors"),
        }
        assert first.undelivered == [
            "anne@example.com",
            unknown[21],
            "bart@example.com",
            "cris@example.com",
        ]
        assert again.failure is None
        assert again.refused == {unknown[21]: (550, "5.1.1 No such user")}
        assert [m.rcpt_tos for m in server.messages] == [
            ["anne@example.com", "bart@example.com", "cris@example.com"]
        ]


def test_with_many_recipients_data_waits_for_their_replies(smtpd):
    """A DATA sent after every RCPT was refused would be one more error for the server."""
    from listdelivery.smtp import PIPELINE_DATA_UP_TO

    gone = [f"gone{i:02d}@example.com" for i in range(PIPELINE_DATA_UP_TO + 1)]
    smtpd.hard_error_limit = len(gone) + 1
    smtpd.fail_rcpt = dict.fromkeys(gone, "550 5.1.1 No such user")
    connection = Connection(config_for(smtpd))

    refused = connection.send(transaction(*gone))
    delivered = connection.send(transaction("a@example.com"))

    assert refused.failure is None and len(refused.refused) == len(gone)
    assert delivered.failure is None
    assert smtpd.connections == 1


def test_too_many_recipients_is_a_refusal_of_the_rest_with_the_servers_reply(smtpd):
    smtpd.max_recipients = 2
    outcome = Connection(config_for(smtpd)).send(
        transaction("a@example.com", "b@example.com", "c@example.com")
    )
    assert outcome.failure is None
    assert outcome.refused == {"c@example.com": (452, "4.5.3 Too many recipients")}
    assert [m.rcpt_tos for m in smtpd.messages] == [["a@example.com", "b@example.com"]]


def test_starttls_refused_by_the_server_is_a_tls_failure_with_its_reply(self_signed):
    with SMTPTestServer(tls_context=self_signed) as server:
        server.fail_starttls = "454 4.7.0 TLS not available due to local problem"
        config = config_for(server, SMTP_SECURE_MODE="starttls", SMTP_VERIFY_CERT=False)
        outcome = Connection(config).send(transaction())
        assert outcome.failure == Failure(
            "tls", 454, "4.7.0 TLS not available due to local problem"
        )
        assert server.messages == []


def test_the_ehlo_name_is_the_setting(smtpd):
    Connection(config_for(smtpd, SMTP_EHLO_NAME="lists.example.org")).send(transaction())
    assert smtpd.ehlo_names == ["lists.example.org"]


def test_without_an_ehlo_name_the_machines_own_is_sent(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port) as probe:
        machine = probe.local_hostname
    Connection(config_for(smtpd, SMTP_EHLO_NAME="")).send(transaction())
    assert smtpd.ehlo_names == [machine]


# -- sessions (points 7, 8, 25) --------------------------------------------------


def test_max_sessions_per_connection_counts_failed_transactions_too(smtpd):
    smtpd.fail_rcpt = {"gone@example.com": "550 5.1.1 No such user"}
    connection = Connection(config_for(smtpd, MAX_SESSIONS_PER_CONNECTION=2))
    for recipient in ["gone", "a", "gone", "b", "gone"]:
        connection.send(transaction(f"{recipient}@example.com"))
    connection.close()

    assert smtpd.connections == 3
    assert [m.connection for m in smtpd.messages] == [1, 2]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_non_ascii_password_logs_in(mechanism):
    with SMTPTestServer(auth=("list", "pässwörd"), auth_mechanisms=(mechanism,)) as server:
        config = config_for(server, SMTP_USER="list", SMTP_PASSWORD="pässwörd")
        outcome = Connection(config).send(transaction())
        assert outcome.failure is None
        assert len(server.messages) == 1


@pytest.mark.parametrize("password", ["pässwört", "p\udcc3sswort"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_wrong_password_fails_at_auth_and_is_shown_nowhere(caplog, mechanism, password):
    caplog.set_level(logging.DEBUG)
    with SMTPTestServer(auth=("list", "pässwörd"), auth_mechanisms=(mechanism,)) as server:
        config = config_for(server, SMTP_USER="list", SMTP_PASSWORD=password)
        outcome = Connection(config).send(transaction())

    assert outcome.failure == Failure("auth", 535, "5.7.8 Authentication credentials invalid")
    shown = repr(outcome) + caplog.text
    assert not any(password[i : i + 3] in shown for i in range(len(password) - 2))


def test_a_server_without_plain_or_login_is_an_auth_failure():
    with SMTPTestServer(auth=("list", "pw"), auth_mechanisms=()) as server:
        config = config_for(server, SMTP_USER="list", SMTP_PASSWORD="pw")
        outcome = Connection(config).send(transaction())
    assert outcome.failure.stage == "auth" and outcome.failure.code is None
    assert "neither AUTH PLAIN nor AUTH LOGIN" in outcome.failure.text


def test_a_connection_over_the_servers_limit_hands_its_work_to_the_others(smtpd):
    smtpd.max_connections = 2
    smtpd.delay = 0.02
    recipients = [f"r{i}@example.com" for i in range(12)]
    with SMTPPool(config_for(smtpd, SMTP_CONNECTIONS=4)) as pool:
        first = pool.send_all(transaction(r) for r in recipients)
        refused_at_first = smtpd.refused_connections
        second = pool.send_all(transaction(r) for r in recipients)

    assert [o.failure for o in first + second] == [None] * 24
    assert smtpd.recipients_count() == {r: 2 for r in recipients}
    assert smtpd.connections == 2
    assert (refused_at_first, smtpd.refused_connections) == (2, 4)  # each send_all tries again


def test_a_single_transaction_goes_to_an_open_session(smtpd):
    smtpd.max_connections = 1
    with SMTPPool(config_for(smtpd, SMTP_CONNECTIONS=3)) as pool:
        pool.send_all(transaction(f"r{i}@example.com") for i in range(6))
        refused = smtpd.refused_connections
        [outcome] = pool.send_all([transaction("last@example.com")])

    assert outcome.failure is None
    assert smtpd.refused_connections == refused  # no new connection was tried
    assert smtpd.recipients_count()["last@example.com"] == 1


@pytest.mark.parametrize("connections", [1, 3])
def test_when_no_connection_can_open_the_send_all_stops_with_the_failure(smtpd, connections):
    smtpd.max_connections = 0
    with SMTPPool(config_for(smtpd, SMTP_CONNECTIONS=connections)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(20))

    assert [o.failure for o in outcomes] == [Failure("connect", 421, "4.7.0 Too many connections")]
    assert smtpd.refused_connections == connections


@pytest.mark.parametrize("connections", [1, 3])
def test_send_all_takes_no_more_transactions_once_stop_is_set(smtpd, connections):
    stop = threading.Event()

    def copies():
        for i in range(20):
            if i == 3:
                stop.set()  # as the runner does when it loses its lease
            yield transaction(f"r{i}@example.com")

    with SMTPPool(config_for(smtpd, SMTP_CONNECTIONS=connections)) as pool:
        outcomes = pool.send_all(copies(), stop=stop)
        assert pool.send_all([transaction()], stop=stop) == []

    assert len(outcomes) == 4
    assert len(smtpd.messages) == 4


# -- the message on the wire (points 9, 11, 26) ----------------------------------


def test_a_message_over_the_servers_size_limit_is_not_sent():
    message = b"Subject: big\r\n\r\n" + (b"x" * 100 + b"\r\n") * 20
    with SMTPTestServer(data_size_limit=1000) as server:
        connection = Connection(config_for(server))
        big = connection.send(Transaction("l@example.com", ["a@example.com"], message))
        small = connection.send(transaction())

        assert big.failure == Failure(
            "size",
            552,
            f"5.3.4 message of {len(message)} octets exceeds the server's limit of 1000",
        )
        assert big.undelivered == ["a@example.com"]
        assert small.failure is None and server.connections == 1


@pytest.mark.parametrize("limit, declared", [(1000, True), (0, False)])
def test_the_size_is_declared_when_the_server_offers_size(limit, declared):
    with SMTPTestServer(data_size_limit=limit) as server:
        Connection(config_for(server)).send(transaction())
        [received] = server.messages
    expected = [f"SIZE={len(received.content)}"] if declared else []
    assert [o for o in received.mail_options if o.startswith("SIZE=")] == expected


@pytest.mark.parametrize("offered", [True, False])
@pytest.mark.parametrize("body", ["Hello", "Grüße"])
def test_body_8bitmime_is_declared_only_for_8bit_content_to_a_server_offering_it(offered, body):
    message = f"Subject: hi\r\n\r\n{body}\r\n".encode()
    with SMTPTestServer(eight_bit_mime=offered) as server:
        outcome = Connection(config_for(server)).send(
            Transaction("l@example.com", ["a@example.com"], message)
        )
        [received] = server.messages
    assert outcome.failure is None
    assert ("BODY=8BITMIME" in received.mail_options) == (offered and received.eight_bit)


def test_bare_line_ends_go_out_as_crlf(smtpd):
    message = b"Subject: hi\n\nline one\rline two\n.dot\n"
    Connection(config_for(smtpd)).send(Transaction("l@example.com", ["a@example.com"], message))
    content = smtpd.messages[0].content
    assert content == b"Subject: hi\r\n\r\nline one\r\nline two\r\n.dot\r\n"


@pytest.fixture(scope="module")
def sink():
    with SMTPTestServer() as server:
        connection = Connection(config_for(server))
        yield server, connection
        connection.close()


PIECES = [b".", b"..", b"\r", b"\n", b"\r\n", b"x", b" ", b"\xc3\xa9", b"\x00", b"From "]


@settings(max_examples=60, deadline=None)
@given(
    message=st.binary(max_size=200) | st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)
)
def test_any_message_arrives_as_wire_safe_made_it(sink, message):
    server, connection = sink
    outcome = connection.send(Transaction("l@example.com", ["a@example.com"], message))

    expected = wire_safe(message, eight_bit_ok=True)
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert outcome.failure is None
    assert server.messages[-1].content == expected


# -- each message's write carries the next transaction's commands (RFC 2920 §3.1) --------------


def test_each_message_goes_with_the_next_transactions_commands(smtpd):
    with SMTPPool(config_for(smtpd)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(5))

    assert [o.failure for o in outcomes] == [None] * 5
    assert [m.rcpt_tos for m in smtpd.messages] == [[f"r{i}@example.com"] for i in range(5)]
    # The last message had nothing after it; every other one had the next MAIL FROM behind it.
    assert [m.followed_by_commands for m in smtpd.messages] == [True] * 4 + [False]
    assert smtpd.connections == 1


def test_without_pipelining_each_transaction_waits_for_the_last_ones_reply():
    with SMTPTestServer(pipelining=False) as server, SMTPPool(config_for(server)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(3))

        assert [o.failure for o in outcomes] == [None] * 3
        assert [m.followed_by_commands for m in server.messages] == [False] * 3


def test_a_session_that_ends_after_a_message_sends_the_next_on_a_new_one(smtpd):
    """The next transaction's commands went after the message into a session that was
    leaving: nothing of it was accepted, so it goes again, not as a failure."""
    smtpd.hang_up_after_messages = 2
    with SMTPPool(config_for(smtpd)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(5))

    assert [o.failure for o in outcomes] == [None] * 5
    assert sorted(r for m in smtpd.messages for r in m.rcpt_tos) == [
        f"r{i}@example.com" for i in range(5)
    ]
    assert smtpd.connections == 3


def test_a_message_lost_with_its_session_fails_alone_and_the_next_goes_on_a_new_one(smtpd):
    smtpd.drop_data = 1  # no reply to the first message's end: its fate is unknown
    with SMTPPool(config_for(smtpd)) as pool:
        first, second, third = pool.send_all(transaction(f"r{i}@example.com") for i in range(3))

    assert first.failure.stage == "data" and first.failure.code is None
    assert first.undelivered == ["r0@example.com"]
    assert second.failure is None and third.failure is None
    assert [m.rcpt_tos for m in smtpd.messages] == [["r1@example.com"], ["r2@example.com"]]
    assert smtpd.connections == 2


def test_a_refused_message_leaves_the_next_one_alone(smtpd):
    """The final reply to a message ends its transaction: the next one's commands, already
    sent behind it, are answered in turn (no RSET between them would be)."""
    smtpd.quota = 1
    with SMTPPool(config_for(smtpd)) as pool:
        first, second, third = pool.send_all(transaction(f"r{i}@example.com") for i in range(3))
        smtpd.quota = None
        fourth = pool.send_all([transaction("r3@example.com")])[0]

    assert first.failure is None and fourth.failure is None
    quota = Failure("data", 454, "4.7.0 Throttling failure: Daily message quota exceeded.")
    assert second.failure == quota and third.failure == quota
    assert [m.rcpt_tos for m in smtpd.messages] == [["r0@example.com"], ["r3@example.com"]]
    assert smtpd.connections == 1


def test_the_session_limit_is_kept_with_transactions_taken_ahead(smtpd):
    with SMTPPool(config_for(smtpd, MAX_SESSIONS_PER_CONNECTION=2)) as pool:
        outcomes = pool.send_all(transaction(f"r{i}@example.com") for i in range(5))

    assert [o.failure for o in outcomes] == [None] * 5
    assert smtpd.connections == 3
    by_session = collections.Counter(m.connection for m in smtpd.messages)
    assert sorted(by_session.values()) == [1, 2, 2]


def test_after_a_421_to_a_message_the_next_goes_on_a_new_session(smtpd):
    """A 421 ends the session whatever the server does next: the commands sent behind the
    message are not read there, and the next transaction starts again on a new session."""
    smtpd.fail_data = "421 4.3.2 Service shutting down"
    with SMTPPool(config_for(smtpd)) as pool:
        first, second = pool.send_all(transaction(f"r{i}@example.com") for i in range(2))

    closing = Failure("data", 421, "4.3.2 Service shutting down")
    assert first.failure == closing and second.failure == closing
    assert smtpd.connections == 2
    assert smtpd.messages == []
