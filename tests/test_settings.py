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


@pytest.mark.parametrize(
    "cluster",
    [
        {"name": "site", "timeout": 60, "retry": 120, "orm": "default"},  # the host
        {"name": "site", "orm": "default"},  # django-q2's defaults: no timeout, retry 60
        {"name": "site", "timeout": 600, "retry": 600, "max_attempts": 0, "ack_failures": False},
        {"name": "site", "sync": True, "save_limit": -1},
    ],
)
def test_the_hosts_own_cluster_configuration_is_none_of_our_business(cluster):
    """The host keeps its Q_CLUSTER: our tasks carry their own ack_failure and timeout."""
    assert cluster_ids(**cluster) == []


def test_a_cluster_of_our_own_must_be_one_the_host_defines():
    with override_settings(LISTDELIVERY={"Q_CLUSTER": "deliveries"}):
        assert cluster_ids(name="site", orm="default") == ["listdelivery.E012"]
        assert cluster_ids(name="site", ALT_CLUSTERS={"other": {}}) == ["listdelivery.E012"]
        assert cluster_ids(name="site", ALT_CLUSTERS={"deliveries": {}}) == []
        assert cluster_ids(name="deliveries") == []
    from listdelivery.checks import check_cluster

    with override_settings(LISTDELIVERY={"Q_CLUSTER": "deliveries"}, Q_CLUSTER={"name": "site"}):
        (error,) = check_cluster()
    assert "Q_CLUSTER['ALT_CLUSTERS'] = {'deliveries': {" in error.hint
    assert "Q_CLUSTER_NAME=deliveries python manage.py qcluster" in error.hint


def test_django_q_listed_before_listdelivery_loses_the_masked_qinfo():
    from django.conf import settings

    from listdelivery.checks import check_cluster

    reordered = [a for a in settings.INSTALLED_APPS if a != "django_q"]
    reordered.insert(reordered.index("listdelivery"), "django_q")
    with override_settings(INSTALLED_APPS=reordered):
        (warning,) = check_cluster()
    assert warning.id == "listdelivery.W007"
    assert "Move 'listdelivery' above 'django_q'" in warning.hint


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


# -- the host's own settings ------------------------------------------------------------

urlpatterns: list = []  # a site that does not include listdelivery.urls (ROOT_URLCONF below)


def site_ids(**overrides) -> list[str]:
    from listdelivery.checks import check_site

    with override_settings(**overrides):
        return [message.id for message in check_site()]


def test_the_demo_site_passes_the_site_checks():
    assert site_ids() == []


def test_use_tz_false_is_an_error_that_says_it_is_required():
    from listdelivery.checks import check_site

    with override_settings(USE_TZ=False):
        (error,) = check_site()
    assert error.id == "listdelivery.E013"
    assert "requires USE_TZ = True" in error.msg


def test_one_click_links_without_the_urls_included_would_404():
    from listdelivery.checks import check_site

    listdelivery = {"UNSUBSCRIBE_BASE_URL": "https://lists.example.com"}
    with override_settings(LISTDELIVERY=listdelivery, ROOT_URLCONF="tests.test_settings"):
        (warning,) = check_site()
    assert warning.id == "listdelivery.W008"
    assert 'include("listdelivery.urls")' in warning.hint
    assert site_ids(LISTDELIVERY=listdelivery) == []  # the demo site includes them
    assert site_ids(ROOT_URLCONF="tests.test_settings") == []  # no links, nothing to serve


SQLITE = "django.db.backends.sqlite3"


@pytest.mark.parametrize(
    ("options", "missing"),
    [
        ({}, "without IMMEDIATE transactions and a lock timeout of 20 seconds or more"),
        ({"timeout": 30}, "without IMMEDIATE transactions:"),
        ({"transaction_mode": "IMMEDIATE"}, "without a lock timeout of 20 seconds or more"),
        ({"transaction_mode": "IMMEDIATE", "timeout": 5}, "without a lock timeout"),
    ],
)
def test_sqlite_shared_with_a_cluster_needs_immediate_transactions_and_a_lock_timeout(
    options, missing
):
    from listdelivery.checks import sqlite_problems

    (warning,) = sqlite_problems({"default": {"ENGINE": SQLITE, "NAME": "x", "OPTIONS": options}})
    assert warning.id == "listdelivery.W009"
    assert missing in warning.msg
    assert "'transaction_mode': 'IMMEDIATE'" in warning.hint
    assert "'timeout': 30" in warning.hint or "'timeout': 30" in repr(options)
    assert "PRAGMA journal_mode=WAL" in warning.hint


def test_the_sqlite_hint_keeps_the_sites_own_options():
    from listdelivery.checks import sqlite_problems

    options = {"timeout": 60, "init_command": "PRAGMA foreign_keys=ON;"}
    (warning,) = sqlite_problems({"default": {"ENGINE": SQLITE, "OPTIONS": options}})
    assert warning.hint.startswith(
        "Set DATABASES['default']['OPTIONS'] = {'timeout': 60, "
        "'init_command': 'PRAGMA foreign_keys=ON;', 'transaction_mode': 'IMMEDIATE'}"
    )


def test_good_sqlite_options_other_databases_and_no_cluster_pass():
    from django.conf import settings

    from listdelivery.checks import sqlite_problems

    good = {"transaction_mode": "IMMEDIATE", "timeout": 20}
    assert sqlite_problems({"default": {"ENGINE": SQLITE, "OPTIONS": good}}) == []
    assert sqlite_problems({"default": {"ENGINE": "django.db.backends.postgresql"}}) == []
    apps_without_q = [a for a in settings.INSTALLED_APPS if a != "django_q"]
    with override_settings(INSTALLED_APPS=apps_without_q):
        assert sqlite_problems({"default": {"ENGINE": SQLITE}}) == []


# -- the config cache ---------------------------------------------------------------------


def test_a_plain_assignment_to_settings_is_read_at_once():
    """``settings.LISTDELIVERY = {...}`` sends no setting_changed; the cache notices anyway."""
    from django.conf import settings

    saved = settings.LISTDELIVERY
    try:
        settings.LISTDELIVERY = {"MAX_RECIPIENTS": 3}
        assert conf.get("MAX_RECIPIENTS") == 3
        settings.LISTDELIVERY = {"MAX_RECIPIENTS": 7}
        assert conf.get("MAX_RECIPIENTS") == 7
        settings.LISTDELIVERY["MAX_RECIPIENTS"] = 9  # changed in place
        assert conf.get("MAX_RECIPIENTS") == 9
        del settings.LISTDELIVERY["MAX_RECIPIENTS"]
        assert conf.get("MAX_RECIPIENTS") == 10
    finally:
        settings.LISTDELIVERY = saved


def test_the_config_is_converted_once_while_the_settings_stay_the_same():
    with override_settings(LISTDELIVERY={"DELIVERY_RETRY_PERIOD": "2d"}):
        first = conf.get_config()
        assert conf.get_config() is first
    assert conf.get_config() is not first


def test_a_test_that_assigns_settings_delivers_to_the_server_it_names(smtpd, mlist, first_post):
    from django.conf import settings

    from .conftest import queue_post, run

    saved = settings.LISTDELIVERY
    try:
        settings.LISTDELIVERY = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": 9, "ENQUEUE_TASKS": False}
        conf.get_config()  # cached with the wrong port
        settings.LISTDELIVERY = {
            "SMTP_HOST": smtpd.host,
            "SMTP_PORT": smtpd.port,
            "ENQUEUE_TASKS": False,
        }
        queue_post(mlist, first_post)
        assert run().delivered == 1
    finally:
        settings.LISTDELIVERY = saved
    assert smtpd.messages[0].rcpt_tos == [
        "aperson@example.com",
        "bperson@example.com",
        "cperson@example.com",
    ]


# -- our tasks under the host's django-q2 -------------------------------------------------


def queued_tasks(cluster: str | None = None) -> list[dict]:
    """The task packages waiting in the (real) broker of ``cluster``, taken out of it."""
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage

    broker = get_broker(cluster)
    found = []
    while True:
        tasks = broker.dequeue()
        if not tasks:
            return found
        for ack_id, payload in tasks:
            found.append(SignedPackage.loads(payload))
            broker.acknowledge(ack_id)


@pytest.mark.django_db
def test_a_delivery_task_is_acknowledged_even_if_it_fails_and_may_run_half_an_hour(
    mlist, first_post, django_capture_on_commit_callbacks
):
    """Whatever the host's max_attempts, ack_failures and timeout: the rows retry, not the broker."""
    from django_q.brokers import get_broker

    from .conftest import queue_post

    get_broker().purge_queue()
    with django_capture_on_commit_callbacks(execute=True):
        row = queue_post(mlist, first_post)

    (task,) = queued_tasks()
    assert task["func"] == "listdelivery.tasks.deliver_due"
    assert task["name"] == f"deliver post {row.pk}"
    assert (task["ack_failure"], task["timeout"], task["cluster"]) == (True, 30 * 60, None)
    assert "save" not in task  # each post's task is kept in the history, with its summary


@pytest.mark.django_db
def test_a_cluster_of_our_own_gets_our_tasks(
    settings, mlist, first_post, django_capture_on_commit_callbacks
):
    from django_q.brokers import get_broker

    from .conftest import queue_post

    settings.LISTDELIVERY = {"Q_CLUSTER": "deliveries"}
    get_broker().purge_queue()
    get_broker("deliveries").purge_queue()
    with django_capture_on_commit_callbacks(execute=True):
        queue_post(mlist, first_post)

    assert queued_tasks() == []
    (task,) = queued_tasks("deliveries")
    assert task["cluster"] == "deliveries"


# -- the sweep schedule -------------------------------------------------------------------


def sweep_schedules():
    from django_q.models import Schedule

    from listdelivery.tasks import TASK

    return Schedule.objects.filter(func=TASK)


def schedule_ids() -> list[str]:
    from listdelivery.checks import check_sweep_schedule

    return [message.id for message in check_sweep_schedule(databases=["default"])]


@pytest.mark.django_db
def test_migrate_created_one_sweep_that_stores_no_success():
    (sweep,) = sweep_schedules()
    assert sweep.name == "listdelivery: deliver due posts"
    assert (sweep.schedule_type, sweep.minutes, sweep.repeats) == ("I", 1, -1)
    assert "'save': False" in sweep.kwargs and "'ack_failure': True" in sweep.kwargs
    assert schedule_ids() == []


@pytest.mark.django_db
def test_a_deleted_sweep_is_not_recreated_by_migrate_and_a_check_says_so():
    from django.core.management import call_command

    sweep_schedules().delete()
    call_command("migrate", verbosity=0)
    assert not sweep_schedules().exists()
    assert schedule_ids() == ["listdelivery.W005"]

    call_command("sweep_schedule", verbosity=0)
    assert sweep_schedules().count() == 1
    assert schedule_ids() == []


@pytest.mark.django_db
def test_a_renamed_sweep_is_kept_as_the_administrator_left_it():
    from django.core.management import call_command

    sweep_schedules().update(name="every minute, please")
    call_command("migrate", verbosity=0)
    call_command("sweep_schedule", verbosity=0)
    assert list(sweep_schedules().values_list("name", flat=True)) == ["every minute, please"]


@pytest.mark.django_db
def test_the_sweep_is_created_by_the_migrate_that_creates_the_tables():
    from django.db.migrations.loader import MigrationLoader

    from listdelivery.tasks import create_sweep_schedule_once

    graph = MigrationLoader(None, ignore_no_migrations=True).graph
    sweep_schedules().delete()
    later = graph.nodes[("listdelivery", "0005_hostile_world")]
    create_sweep_schedule_once(plan=[(later, False)])
    assert not sweep_schedules().exists()
    for first in (("listdelivery", "0001_initial"), ("django_q", "0001_initial")):
        sweep_schedules().delete()
        create_sweep_schedule_once(plan=[(later, False), (graph.nodes[first], False)])
        assert sweep_schedules().count() == 1


@pytest.mark.django_db
def test_a_sweep_that_stores_every_success_is_pointed_out(settings):
    sweep_schedules().update(kwargs="")
    assert schedule_ids() == ["listdelivery.W006"]
    sweep_schedules().update(kwargs="q_options={'save': False}")  # django-q2's other syntax
    assert schedule_ids() == []
    sweep_schedules().update(kwargs="")
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "save_limit": -1}  # the site keeps no successes
    assert schedule_ids() == []


def test_without_a_database_the_schedule_check_stays_quiet():
    from listdelivery.checks import check_sweep_schedule

    assert check_sweep_schedule(databases=None) == []


@pytest.mark.parametrize(
    ("engine", "refused"),
    [
        ("django.db.backends.mysql", True),
        ("django.db.backends.oracle", True),
        ("django.db.backends.postgresql", False),
        ("django.db.backends.sqlite3", False),
    ],
)
def test_a_database_listdelivery_cannot_use_is_an_error_before_migrate_fails(engine, refused):
    from listdelivery.checks import unsupported_databases

    found = unsupported_databases({"default": {"ENGINE": engine, "NAME": "lists"}})
    assert (["listdelivery.E014"] if refused else []) == [message.id for message in found]
