from greenq.contrib.django import create_app

app = create_app("djshop", settings_module="djshop.settings")

from djshop.orders import tasks  # noqa: E402,F401  (the tasks use `app`)
