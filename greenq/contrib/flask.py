"""greenq with Flask, app factory pattern included (docs/frameworks.md)::

    greenq = GreenQ("shop")          # tasks: @greenq.task, before any Flask app exists

    def create_app():
        app = Flask(__name__)
        app.config.from_mapping(GREENQ_BROKER_URL="redis://...")
        greenq.init_app(app)
        return app

``init_app`` configures the extension's GreenQ (``greenq.app``) from the
Flask config keys named ``GREENQ_*`` (mapped as the environment's names are,
greenq/contrib/_settings.py; the INI file and the environment are read over
them, as a worker does), and every task a worker runs does so inside that
Flask app's ``app_context()``: ``current_app``, extensions bound to the app
and ``g`` work in tasks as in a view.  A worker names the module that calls
the factory: ``greenq-worker -A shop.worker`` where ``shop/worker.py`` says
``from shop import create_app, greenq; create_app(); app = greenq.app``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from .. import app as app_module
from . import _settings

if TYPE_CHECKING:  # pragma: no cover
    from flask import Flask

KIND = "Flask config"


class GreenQ:
    """The Flask extension.  ``GreenQ(name)`` makes the greenq app at once
    (``self.app``; ``self.task`` is its decorator) with defaults and no
    file read; ``init_app(flask_app)`` (or ``GreenQ(name, flask_app)``)
    gives it its settings and its Flask app."""

    def __init__(self, name: str = "greenq", flask_app: Optional["Flask"] = None, *,
                 config_file: Union[str, bool, None] = None) -> None:
        self.app = app_module.GreenQ(name, config_file=False)
        self.task = self.app.task
        self.flask_app: Optional["Flask"] = None
        self.config_file = config_file
        self._contexts: Dict[int, Any] = {}
        self.app.on("task_prerun", self._enter)
        self.app.on("task_postrun", self._leave)
        if flask_app is not None:
            self.init_app(flask_app)

    def init_app(self, flask_app: "Flask") -> None:
        """Configure from ``flask_app.config``'s ``GREENQ_*`` keys (a
        ConfigError names the key and value refused; an unknown key is
        logged with the nearest valid name) and run tasks in its app context.
        The last app given is the one tasks run in."""
        values = {k: v for k, v in flask_app.config.items() if k.startswith(_settings.PREFIX)}
        _settings.reconfigure(self.app, _settings.load(values, KIND, config_file=self.config_file))
        self.flask_app = flask_app
        flask_app.extensions["greenq"] = self

    # task_prerun / task_postrun, in the task's greenlet (thread): one context per task
    def _enter(self, task: Any, request: Any) -> None:
        if self.flask_app is not None:
            ctx = self.flask_app.app_context()
            ctx.push()
            self._contexts[id(request)] = ctx

    def _leave(self, task: Any, request: Any, state: Any, retval: Any) -> None:
        ctx = self._contexts.pop(id(request), None)
        if ctx is not None:
            ctx.pop()
