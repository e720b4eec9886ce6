"""A small shop backend whose Celery tasks use celery-roger (see ../README.md)."""

from .celery_app import app

__all__ = ["app"]
