"""``INSTALLED_APPS = [..., "greenq.contrib.django"]``: registers greenq's
system checks with ``manage.py check`` (docs/frameworks.md)."""
from __future__ import annotations

from django.apps import AppConfig


class GreenQDjangoConfig(AppConfig):
    name = "greenq.contrib.django"
    label = "greenq"
    verbose_name = "greenq"

    def ready(self) -> None:
        from . import register_checks
        register_checks()
