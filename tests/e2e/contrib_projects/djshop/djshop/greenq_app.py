from greenq.contrib.django import create_app

app = create_app("djshop", settings_module="djshop.settings")

from djshop.orders import tasks  # noqa: E402  (registers the tasks, which use `app`)

__all__ = ["app", "tasks"]
