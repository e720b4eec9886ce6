"""Settings of the test project, from the environment tests/test_django.py sets:
ROGER_DJANGO_REDIS_URL (results and roger state), ROGER_DJANGO_BROKER (else that Redis),
ROGER_DJANGO_DB (the sqlite file), ROGER_DJANGO_QUEUE, and ROGER_DJANGO_SETTINGS (a JSON
object of further settings)."""

import json
import os

SECRET_KEY = "roger-tests-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["orders"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["ROGER_DJANGO_DB"],
        "OPTIONS": {"timeout": 20},
    }
}

REDIS_URL = os.environ["ROGER_DJANGO_REDIS_URL"]
CELERY_BROKER_URL = os.environ.get("ROGER_DJANGO_BROKER") or REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 600
CELERY_BROKER_HEARTBEAT = 0
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("ROGER_DJANGO_QUEUE", "django")
if CELERY_BROKER_URL.startswith("amqp"):
    # A publish returns once RabbitMQ has the message.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}

CELERY_ROGER_REDIS_URL = REDIS_URL
CELERY_ROGER_PARTITION = "django-tests"
# Short: a rolled-back transaction's queue key frees itself this soon.
CELERY_ROGER_PUBLISH_GRACE_SECONDS = 3

globals().update(json.loads(os.environ.get("ROGER_DJANGO_SETTINGS") or "{}"))
