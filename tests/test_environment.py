"""``listdelivery_from_environment``: a host's settings file reads LISTDELIVERY_<KEY> variables."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import environ
import pytest
from django.core.exceptions import ImproperlyConfigured

from listdelivery import conf
from listdelivery.checks import check_settings
from listdelivery.environment import listdelivery_from_environment

ROOT = Path(__file__).resolve().parent.parent


def clean_environment(**variables: str) -> dict[str, str]:
    """This process's environment without any LISTDELIVERY_ variable, plus ``variables``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LISTDELIVERY_")}
    return {**environment, **variables}


def test_every_kind_of_setting_arrives_with_its_type():
    settings = listdelivery_from_environment(
        env={
            "LISTDELIVERY_SMTP_HOST": "mail.example.org",
            "LISTDELIVERY_SMTP_PORT": "587",
            "LISTDELIVERY_MAX_RECIPIENTS": " 25 ",
            "LISTDELIVERY_DELIVERY_RETRY_PERIOD": "5d",
            "LISTDELIVERY_DELIVERY_RETRY_DELAY": "15m",
            "LISTDELIVERY_SMTP_TIMEOUT": "30s",
            "LISTDELIVERY_LEASE_DURATION": "90",
            "LISTDELIVERY_VERP_PERSONALIZED_DELIVERIES": "yes",
            "LISTDELIVERY_SMTP_VERIFY_CERT": "off",
            "LISTDELIVERY_SMTP_USER": "",
        }
    )
    assert settings == {
        "SMTP_HOST": "mail.example.org",
        "SMTP_PORT": 587,
        "MAX_RECIPIENTS": 25,
        "DELIVERY_RETRY_PERIOD": timedelta(days=5),
        "DELIVERY_RETRY_DELAY": timedelta(minutes=15),
        "SMTP_TIMEOUT": timedelta(seconds=30),
        "LEASE_DURATION": timedelta(seconds=90),
        "VERP_PERSONALIZED_DELIVERIES": True,
        "SMTP_VERIFY_CERT": False,
        "SMTP_USER": "",
    }


def test_variables_override_the_defaults_and_the_rest_of_the_defaults_stay():
    settings = listdelivery_from_environment(
        defaults={"SMTP_HOST": "mail.example.org", "SMTP_PORT": 587},
        env={"LISTDELIVERY_SMTP_PORT": "2525", "PATH": "/usr/bin"},
    )
    assert settings == {"SMTP_HOST": "mail.example.org", "SMTP_PORT": 2525}
    assert settings.from_environment == {"SMTP_PORT"}


def test_values_are_taken_literally_a_dollar_is_not_a_reference():
    """django-environ would read ``$...`` as another variable's name; a VERP format starts so."""
    settings = listdelivery_from_environment(
        env={
            "LISTDELIVERY_VERP_FORMAT": "${bounces}-${local}+${domain}",
            "LISTDELIVERY_SMTP_PASSWORD": "$ecret",
        }
    )
    assert settings["VERP_FORMAT"] == "${bounces}-${local}+${domain}"
    assert settings["SMTP_PASSWORD"] == "$ecret"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAX_RECIPIENTS", "ten", "LISTDELIVERY_MAX_RECIPIENTS='ten' is not a whole number"),
        ("SMTP_PORT", "25.5", "LISTDELIVERY_SMTP_PORT='25.5' is not a whole number"),
        (
            "DELIVERY_RETRY_PERIOD",
            "five days",
            "LISTDELIVERY_DELIVERY_RETRY_PERIOD='five days' is not a duration",
        ),
        ("LEASE_DURATION", "99999999999d", "LISTDELIVERY_LEASE_DURATION='99999999999d' is too"),
        (
            "VERP_PERSONALIZED_DELIVERIES",
            "perhaps",
            "LISTDELIVERY_VERP_PERSONALIZED_DELIVERIES='perhaps' is not yes or no",
        ),
    ],
)
def test_a_value_that_cannot_be_converted_names_the_variable(variable, value, message):
    with pytest.raises(ImproperlyConfigured) as raised:
        listdelivery_from_environment(env={f"LISTDELIVERY_{variable}": value})
    assert str(raised.value).startswith(message)


def test_another_prefix_reads_other_variables():
    settings = listdelivery_from_environment(
        prefix="LISTS_",
        env={"LISTS_MAX_RECIPIENTS": "5", "LISTDELIVERY_MAX_RECIPIENTS": "7"},
    )
    assert settings == {"MAX_RECIPIENTS": 5}
    with pytest.raises(ImproperlyConfigured, match=r"^LISTS_MAX_RECIPIENTS='x' "):
        listdelivery_from_environment(prefix="LISTS_", env={"LISTS_MAX_RECIPIENTS": "x"})


def test_a_misspelt_variable_is_pointed_out_by_the_system_checks(settings):
    settings.LISTDELIVERY = listdelivery_from_environment(
        env={"LISTDELIVERY_SMTP_HOTS": "mail.example.org"}
    )
    (warning,) = check_settings()
    assert warning.id == "listdelivery.W001"
    assert "'SMTP_HOTS' (from the environment)" in warning.msg
    assert warning.hint == "Did you mean 'SMTP_HOST'?"


def test_a_django_environ_env_is_read_and_a_secret_can_come_from_a_file(tmp_path, monkeypatch):
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret-from-a-file\n")  # as `echo s3cret > file` writes it
    monkeypatch.setenv("LISTDELIVERY_SMTP_USER", "lists")
    monkeypatch.setenv("LISTDELIVERY_SMTP_PASSWORD_FILE", str(secret))

    from_file = listdelivery_from_environment(env=environ.FileAwareEnv())
    plain = listdelivery_from_environment(env=environ.Env())

    assert from_file == {"SMTP_USER": "lists", "SMTP_PASSWORD": "s3cret-from-a-file"}
    assert plain["SMTP_USER"] == "lists" and "SMTP_PASSWORD" not in plain


def test_the_result_is_a_valid_listdelivery_setting(settings):
    settings.LISTDELIVERY = listdelivery_from_environment(
        defaults={"SMTP_HOST": "mail.example.org"},
        env={"LISTDELIVERY_DELIVERY_RETRY_PERIOD": "2d", "LISTDELIVERY_SMTP_CONNECTIONS": "3"},
    )
    assert check_settings() == []
    config = conf.get_config()
    assert config["SMTP_HOST"] == "mail.example.org"
    assert config["DELIVERY_RETRY_PERIOD"] == timedelta(days=2)
    assert config["SMTP_CONNECTIONS"] == 3


def test_the_dashboard_says_which_values_came_from_the_environment(settings):
    from listdelivery.dashboard import setting_rows

    settings.LISTDELIVERY = listdelivery_from_environment(
        defaults={"SMTP_HOST": "mail.example.org"},
        env={"LISTDELIVERY_SMTP_PORT": "587", "LISTDELIVERY_SMTP_PASSWORD": "hunter2"},
    )
    rows = {row.key: (row.value, row.source) for row in setting_rows()}
    assert rows["SMTP_HOST"] == ("mail.example.org", "settings")
    assert rows["SMTP_PORT"] == ("587", "environment")
    assert rows["SMTP_PASSWORD"] == ("••••••", "environment")
    assert rows["MAX_RECIPIENTS"] == ("10", "default")

    settings.LISTDELIVERY = {"SMTP_PORT": 2525}  # a test's own dict: nothing from the environment
    assert {row.key: row.source for row in setting_rows()}["SMTP_PORT"] == "settings"


@pytest.mark.slow
def test_a_settings_file_can_call_it_before_django_is_set_up():
    """Importing it loads no model and no app: it runs while settings are being read."""
    script = (
        "import sys\n"
        "from listdelivery.environment import listdelivery_from_environment\n"
        "from django.apps import apps\n"
        "settings = listdelivery_from_environment()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('django.db', 'listdelivery.')))\n"
        "print(apps.ready, settings['MAX_RECIPIENTS'], loaded)\n"
    )
    environment = clean_environment(LISTDELIVERY_MAX_RECIPIENTS="12")
    environment.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(maxsplit=2) == [
        "False",
        "12",
        "['listdelivery.conf', 'listdelivery.environment']\n",
    ]


@pytest.mark.slow
def test_a_bad_variable_stops_the_demo_site_with_its_name():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=clean_environment(LISTDELIVERY_MAX_RECIPIENTS="ten"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "LISTDELIVERY_MAX_RECIPIENTS='ten' is not a whole number" in result.stderr


@pytest.mark.slow
def test_the_dashboard_of_the_demo_site_says_which_values_came_from_the_environment():
    script = (
        "from listdelivery.dashboard import setting_rows\n"
        "rows = {row.key: row.source for row in setting_rows()}\n"
        "print(rows['SMTP_HOST'], rows['SMTP_PORT'], rows['MAX_RECIPIENTS'])\n"
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=clean_environment(LISTDELIVERY_SMTP_HOST="mail.example.org"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split() == ["environment", "default", "default"], result.stderr
