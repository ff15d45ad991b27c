"""Settings of the listdelivery demo site, every value from the environment.

django-environ reads ``DATABASE_URL``, ``SECRET_KEY``, ``DEBUG``, the cluster's
``Q_*`` variables, and, through listdelivery's own helper (the one a host site
uses too), one ``LISTDELIVERY_<KEY>`` variable per listdelivery setting,
converted to its type: a bad value stops start-up with an error naming it.
"""

from pathlib import Path

import environ

from listdelivery.environment import listdelivery_from_environment

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; never committed

SECRET_KEY = env.str("SECRET_KEY", default="insecure-development-key-change-me")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "listdelivery",  # before django_q: its qinfo masks secrets in --config
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

ROOT_URLCONF = "project.urls"

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

WSGI_APPLICATION = "project.wsgi.application"

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (deliver_pending, qcluster workers) share the file:
    # take the write lock when a transaction starts, wait for it instead of
    # failing, and let readers run beside the writer.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not memory, so that tests can start delivery subprocesses on it.
    DATABASES["default"]["TEST"] = {
        "NAME": env.str("TEST_DATABASE_PATH", default=str(BASE_DIR / ".test-db.sqlite3"))
    }

FIXTURE_DIRS = [BASE_DIR / "fixtures"]

# django-q2 runs delivery (python manage.py qcluster). The embedded default is
# its ORM broker on the database above; Q_BROKER=redis with REDIS_URL switches
# to Redis for clusters on several machines. Every machine of one cluster
# needs the same SECRET_KEY (tasks are signed with it) and Q_CLUSTER_NAME.
Q_BROKER = env.str("Q_BROKER", default="orm")
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
# listdelivery asks nothing of Q_CLUSTER (its tasks carry their own timeout and
# ack_failure); these are the values any site might choose for its own tasks.
# The name is fixed: it salts the signature of every task. Q_CLUSTER_NAME is
# django-q2's own variable, read by django-q2 itself: the queue a process uses,
# this name by default, or another name, such as one of ALT_CLUSTERS.
Q_CLUSTER = {
    "name": "listdelivery",
    "workers": env.int("Q_WORKERS", default=2),
    "timeout": env.int("Q_TIMEOUT", default=600),
    # Longer than the timeout, or a broker hands a still-running task out again.
    "retry": env.int("Q_RETRY", default=900),
    # After downtime the sweep runs once, not once per missed minute.
    "catch_up": False,
    "save_limit": 1000,
    "label": "Delivery tasks",
    # A cluster of its own for listdelivery's tasks, when LISTDELIVERY_Q_CLUSTER=deliveries:
    # run it with Q_CLUSTER_NAME=deliveries python manage.py qcluster.
    "ALT_CLUSTERS": {"deliveries": {}},
}
if Q_BROKER == "redis":
    Q_CLUSTER["redis"] = REDIS_URL
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["poll"] = 0.5
    # qinfo and the cluster's monitor share statistics through the cache.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": env.str("CACHE_DIR", default=str(BASE_DIR / ".cache")),
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Every LISTDELIVERY_<KEY> variable, converted; the dashboard says which values came from it.
LISTDELIVERY = listdelivery_from_environment(env=env)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "listdelivery": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    },
}
