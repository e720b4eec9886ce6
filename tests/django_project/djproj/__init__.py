"""A Django project for tests/test_django.py: Celery configured from Django's settings."""

from .celery import app as celery_app

__all__ = ("celery_app",)
