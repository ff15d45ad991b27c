"""Settings: read at call time, converted once, and checked at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from listdelivery import conf
from listdelivery.checks import check_settings

ROOT = Path(__file__).resolve().parent.parent


def ids(**values) -> list[str]:
    with override_settings(LISTDELIVERY=values):
        return [message.id for message in check_settings()]


def test_defaults_are_mailmans():
    with override_settings(LISTDELIVERY={}):
        config = conf.get_config()
    assert config["SMTP_HOST"] == "localhost"
    assert config["SMTP_PORT"] == 25
    assert config["MAX_RECIPIENTS"] == 10
    assert config["MAX_SESSIONS_PER_CONNECTION"] == 0
    assert config["DELIVERY_RETRY_PERIOD"] == timedelta(days=5)
    assert config["VERP_FORMAT"] == "${bounces}+${local}=${domain}"
    assert config["VERP_DELIVERY_INTERVAL"] == 0
    assert config["VERP_PERSONALIZED_DELIVERIES"] is False


def test_override_settings_takes_effect_at_once():
    with override_settings(LISTDELIVERY={"MAX_RECIPIENTS": 3}):
        assert conf.get("MAX_RECIPIENTS") == 3
    with override_settings(LISTDELIVERY={"MAX_RECIPIENTS": 7}):
        assert conf.get("MAX_RECIPIENTS") == 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(minutes=2), timedelta(minutes=2)),
        (90, timedelta(seconds=90)),
        (1.5, timedelta(seconds=1.5)),
        ("5d", timedelta(days=5)),
        ("15m", timedelta(minutes=15)),
        ("30s", timedelta(seconds=30)),
        ("2h", timedelta(hours=2)),
        ("45", timedelta(seconds=45)),
    ],
)
def test_durations_accept_timedeltas_seconds_and_mailmans_form(value, expected):
    assert conf.parse_duration(value) == expected


def test_a_good_configuration_passes_the_checks():
    assert (
        ids(SMTP_SECURE_MODE="STARTTLS", VERP_DELIVERY_INTERVAL="3", DELIVERY_RETRY_PERIOD="2d")
        == []
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"SMTP_SECURE_MODE": "tls"}, "listdelivery.E001"),
        ({"VERP_DELIVERY_INTERVAL": -1}, "listdelivery.E002"),
        ({"VERP_FORMAT": "${bounces}+${local}"}, "listdelivery.E003"),
        ({"VERP_FORMAT": "${bounces}+${local}=${domain}@x"}, "listdelivery.E003"),
        ({"VERP_FORMAT": "${bounces}${local}${domain}"}, "listdelivery.E003"),
        ({"VERP_FORMAT": "${bounces}+${local}=${domain}+${nope}"}, "listdelivery.E003"),
        ({"BULK_DELIVERY": "listdelivery.delivery.nowhere.Bulk"}, "listdelivery.E004"),
        ({"INDIVIDUAL_DELIVERY": "listdelivery.conf.get"}, "listdelivery.E004"),
        ({"DELIVERY_RETRY_PERIOD": "five days"}, "listdelivery.E005"),
        ({"MAX_RECIPIENTS": "ten"}, "listdelivery.E005"),
        ({"VERP_PERSONALIZED_DELIVERIES": "perhaps"}, "listdelivery.E005"),
        ({"SMTP_CONNECTIONS": 0}, "listdelivery.E006"),
        ({"SMTP_PORT": 70000}, "listdelivery.E006"),
        ({"VERP_DELIMITER": "ab"}, "listdelivery.E007"),
        ({"UNSUBSCRIBE_BASE_URL": "lists.example.com"}, "listdelivery.E010"),
        ({"BOUNCE_SCORE_THRESHOLD": 0}, "listdelivery.E006"),
        ({"MAX_RECIPIENT": 5}, "listdelivery.W001"),
        ({"LEASE_DURATION": 30, "SMTP_TIMEOUT": 60}, "listdelivery.W002"),
        ({"SMTP_USER": "me"}, "listdelivery.W003"),
    ],
)
def test_bad_values_are_reported_by_the_system_checks(values, expected):
    assert expected in ids(**values)


def test_a_typo_gets_a_suggestion():
    with override_settings(LISTDELIVERY={"MAX_RECIPIENT": 5}):
        (warning,) = check_settings()
    assert warning.hint == "Did you mean 'MAX_RECIPIENTS'?"


def test_reading_a_bad_value_names_the_setting():
    with override_settings(LISTDELIVERY={"DELIVERY_RETRY_DELAY": "soon"}):
        with pytest.raises(ImproperlyConfigured, match=r"LISTDELIVERY\['DELIVERY_RETRY_DELAY'\]"):
            conf.get_config()


def test_a_bad_password_value_never_appears_in_the_error():
    with override_settings(LISTDELIVERY={"SMTP_PASSWORD": 12345678}):
        messages = [m.msg for m in check_settings()]
    assert messages and not any("12345678" in m for m in messages)


def _manage(*args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environment}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_environment_variables_reach_the_settings():
    result = _manage(
        "shell",
        "--no-imports",
        "-c",
        "from listdelivery import conf; c = conf.get_config(); "
        "print(c['DELIVERY_RETRY_PERIOD'], c['MAX_RECIPIENTS'], c['VERP_PERSONALIZED_DELIVERIES'])",
        LISTDELIVERY_DELIVERY_RETRY_PERIOD="3d",
        LISTDELIVERY_MAX_RECIPIENTS="25",
        LISTDELIVERY_VERP_PERSONALIZED_DELIVERIES="yes",
    )
    assert result.stdout.strip() == "3 days, 0:00:00 25 True", result.stderr


def test_a_bad_environment_value_stops_start_up_with_a_check_error():
    result = _manage("check", LISTDELIVERY_SMTP_SECURE_MODE="tls")
    assert result.returncode != 0
    assert "listdelivery.E001" in result.stderr


def cluster_ids(**cluster) -> list[str]:
    from listdelivery.checks import check_cluster

    with override_settings(Q_CLUSTER=cluster):
        return [message.id for message in check_cluster()]


def test_the_demo_cluster_configuration_passes():
    from django.conf import settings

    assert cluster_ids(**settings.Q_CLUSTER) == []


def test_a_retry_not_longer_than_the_timeout_is_an_error():
    assert "listdelivery.E008" in cluster_ids(timeout=600, retry=600, max_attempts=1)
    assert "listdelivery.E008" in cluster_ids(retry=600, max_attempts=1)


def test_a_task_retried_forever_is_an_error():
    assert "listdelivery.E009" in cluster_ids(timeout=60, retry=120)
    assert "listdelivery.E009" not in cluster_ids(
        timeout=60, retry=120, max_attempts=0, ack_failures=True
    )


def test_without_django_q_the_checks_warn_that_only_deliver_pending_delivers():
    from django.conf import settings

    from listdelivery.checks import check_cluster

    apps_without_q = [a for a in settings.INSTALLED_APPS if a != "django_q"]
    with override_settings(INSTALLED_APPS=apps_without_q):
        assert [m.id for m in check_cluster()] == ["listdelivery.W004"]


def test_qinfo_config_masks_secrets():
    result = _manage(
        "qinfo",
        "--config",
        SECRET_KEY="top-secret-key-42",
        Q_BROKER="redis",
        REDIS_URL="redis://:hunter2@127.0.0.1:6379/0",
    )
    assert result.returncode == 0, result.stderr
    assert "REDIS: redis://:********@127.0.0.1:6379/0" in result.stdout
    assert "top-secret-key-42" not in result.stdout + result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_qinfo_masks_passwords_in_broker_dicts_and_urls_with_an_at_sign():
    from listdelivery.redact import masked

    config = {
        "host": "redis.internal",
        "password": "hunter2",
        "sqs": {"aws_region": "eu-west-1", "aws_secret_access_key": "AKIA-secret"},
        "url": "redis://:p@ss@word@redis.internal:6379/0",
    }
    shown = str(masked("REDIS", config))
    assert "redis.internal" in shown and "eu-west-1" in shown
    for secret in ("hunter2", "AKIA-secret", "p@ss", "ss@word", "word@redis"):
        assert secret not in shown
    assert "redis://:********@redis.internal:6379/0" in shown


@pytest.mark.parametrize(
    "url", ["https://lists.example.com/{site}", "https://x.org/a b", "ftp://x"]
)
def test_an_unsubscribe_url_that_cannot_work_is_an_error(url):
    assert "listdelivery.E010" in ids(UNSUBSCRIBE_BASE_URL=url)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_queueing_inside_a_transaction_with_the_broker_down_never_raises_to_the_caller():
    """Issue 10, point 22: the row commits; the sweep delivers the post within a minute."""
    from listdelivery.models import MailingList, OutgoingMessage

    from .conftest import database_url

    MailingList.objects.create(address="broker@example.com")
    script = (
        "from email import message_from_string\n"
        "from django.db import transaction\n"
        "from listdelivery.models import MailingList\n"
        "from listdelivery.pipeline import to_outgoing\n"
        "mlist = MailingList.objects.get(address='broker@example.com')\n"
        "msg = message_from_string('From: a@example.com\\nSubject: down\\n\\nHi\\n')\n"
        "with transaction.atomic():\n"
        "    row = to_outgoing(mlist, msg, {'recipients': ['a@example.org']})\n"
        "print('queued', row.pk)\n"
    )
    result = _manage(
        "shell",
        "--no-imports",
        "-c",
        script,
        DATABASE_URL=database_url(),
        Q_BROKER="redis",
        REDIS_URL="redis://:broker-secret@127.0.0.1:1/0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("queued"), result.stderr
    assert "Could not enqueue" in result.stderr and "sweep" in result.stderr
    assert "broker-secret" not in result.stderr
    assert OutgoingMessage.objects.get().status == OutgoingMessage.Status.QUEUED


@pytest.mark.parametrize("name", ["lists.exämple.org", "two words", "a\r\nMAIL FROM:<x>"])
def test_an_ehlo_name_that_cannot_be_sent_is_an_error(name):
    assert "listdelivery.E011" in ids(SMTP_EHLO_NAME=name)


@pytest.mark.parametrize("name", ["", "lists.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_a_host_name_or_address_literal_is_a_good_ehlo_name(name):
    assert "listdelivery.E011" not in ids(SMTP_EHLO_NAME=name)
