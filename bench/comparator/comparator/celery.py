"""Celery configured from Django settings, as cookiecutter-django does it."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "comparator.settings")

app = Celery("comparator")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
