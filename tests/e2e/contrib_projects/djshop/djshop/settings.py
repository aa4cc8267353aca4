"""The test project's settings: DJSHOP_DB (a SQLite file path, or
postgresql://user@host:port/name), DJSHOP_BROKER (the greenq broker URL; unset:
none in the settings), DJSHOP_MISTAKE=1 (a misspelt greenq setting),
DJSHOP_SILENCED (SILENCED_SYSTEM_CHECKS, space-separated)."""
import os
from urllib.parse import urlsplit

SECRET_KEY = "test"
USE_TZ = True
INSTALLED_APPS = ["greenq.contrib.django", "djshop.orders"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

_db = os.environ["DJSHOP_DB"]
if _db.startswith("postgresql://"):
    _url = urlsplit(_db)
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": _url.path[1:],
                             "USER": _url.username, "HOST": _url.hostname, "PORT": _url.port,
                             "CONN_MAX_AGE": int(os.environ.get("DJSHOP_CONN_MAX_AGE", "0"))}}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": _db}}

# greenq reads the settings named GREENQ_* (docs/frameworks.md)
if os.environ.get("DJSHOP_BROKER"):
    GREENQ_BROKER_URL = os.environ["DJSHOP_BROKER"]
GREENQ_WORKER_CONCURRENCY = 4
GREENQ_DEFAULT_QUEUE = "shop"
GREENQ_WORKER_QUEUES = ["shop"]
if os.environ.get("DJSHOP_MISTAKE"):
    GREENQ_WORKER_CONCURENCY = 8
SILENCED_SYSTEM_CHECKS = os.environ.get("DJSHOP_SILENCED", "").split()
