"""Settings of a small community site that adopted listdelivery.

It stands for an existing site, not for the demo: its own app (announcements),
its own user model (accounts.User), its own admin index template and the
django-q2 cluster it already ran for its own tasks (``timeout`` 60, ``retry``
120, everything else django-q2's defaults). What it added for listdelivery is
marked ``listdelivery:``; it changed nothing else for us.

``.ci/host-site`` runs it against the built wheel in a virtualenv of its own.
The environment variables are the site's own: where its database is, and
where its mail server is.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("HOSTSITE_SECRET_KEY", "django-insecure-hostsite-not-for-production")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver", "lists.example.org"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "accounts",
    "announcements",
    "listdelivery",  # listdelivery: before django_q, so that its qinfo masks secrets
    "django_q",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "hostsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "hostsite.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("HOSTSITE_DATABASE", BASE_DIR / "db.sqlite3"),
        # listdelivery: what its README tells a SQLite site to add, since qcluster workers
        # and the web processes write the same file.
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
        # A file, so that a test can start a qcluster process on the test database.
        "TEST": {
            "NAME": os.environ.get("HOSTSITE_TEST_DATABASE", BASE_DIR / "test-db.sqlite3"),
        },
    }
}

AUTH_USER_MODEL = "accounts.User"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "Europe/Berlin"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The site's own django-q2 cluster, as it ran before listdelivery came.
Q_CLUSTER = {
    "name": "hostsite",
    "workers": 2,
    "timeout": 60,
    "retry": 120,
    "orm": "default",
}

# listdelivery: where the site's mail server is, and where it serves listdelivery.urls.
LISTDELIVERY = {
    "SMTP_HOST": os.environ.get("HOSTSITE_SMTP_HOST", "localhost"),
    "SMTP_PORT": int(os.environ.get("HOSTSITE_SMTP_PORT", "25")),
    "UNSUBSCRIBE_BASE_URL": "https://lists.example.org",
}
