"""A minimal Django project delivering webhooks with django-webhook (PyPI `django-webhook`) and Celery:
the pattern a Django user reaches for instead of Kite. bench/comparator.py runs it in a venv of its
own (Django, Celery, django-webhook, psycopg, redis), on the PostgreSQL and Redis Kite uses.

Configured as such a project usually is (cookiecutter-django's Celery setup), and no worse than Kite
where it matters for speed: JSON, results ignored, prefetch 4 as Kite's worker, and database
connections kept between tasks as Kite keeps them (CONN_MAX_AGE and CELERY_DB_REUSE_MAX: without
the latter, Celery's Django fixup closes every connection after every task, and each delivery opens
a new PostgreSQL connection: ~12 ms of PostgreSQL CPU per delivery in a trial).
"""

import os
from urllib.parse import urlsplit

import requests.adapters

_db = urlsplit(os.environ["COMPARATOR_DATABASE_URL"])

SECRET_KEY = "comparator-benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django_webhook", "orders"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.path.lstrip("/"),
        "USER": _db.username or "postgres",
        "HOST": _db.hostname,
        "PORT": _db.port,
        "CONN_MAX_AGE": 60,
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ["COMPARATOR_REDIS_URL"]
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
CELERY_TASK_TIME_LIMIT = 300
CELERY_DB_REUSE_MAX = 1000  # as kite/settings.py

DJANGO_WEBHOOK = {"MODELS": ["orders.Order"]}

# The receiver's certificate stands for a publicly trusted one: requests verifies it against this
# bundle as it would against certifi's (django-webhook sends with a bare Session, verify=True).
if os.environ.get("COMPARATOR_CA_BUNDLE"):
    requests.adapters.DEFAULT_CA_BUNDLE_PATH = os.environ["COMPARATOR_CA_BUNDLE"]
