"""The dashboard page in a real browser when the API says odd things (issue
17, items 9, 10, 11): a heartbeat with ``"queues": "default"``, a worker row
whose every field has the wrong type, /api/dlq failing and /api/schedule
answering an object instead of a list.  The page still draws every other
table and the good worker, marks what it could not update, and never throws
(before: one ``Promise.all`` and ``(w.queues || []).join`` killed the page).
"""
from __future__ import annotations

import threading
import time

import pytest

from greenq import GreenQ
from greenq.dashboard import server
from greenq.dashboard.state import FleetState

from .test_dashboard_browser import _table, _text, _until, browser  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.e2e

BAD_ROW = {"name": 5, "online": "yes", "queues": "default", "running": {"a": 1}, "concurrency": [1],
           "rss": "huge", "seconds_since_heartbeat": "x", "pool": None}


class OddState(FleetState):
    def worker_list(self):
        return super().worker_list() + [BAD_ROW, "not a row", None]


class OddDashboard(server.Dashboard):
    def dead_letters(self):
        raise RuntimeError("the dead-letter store is away")


def test_the_page_survives_odd_answers(tmp_path, browser, monkeypatch):  # noqa: F811
    app = GreenQ("readers-page", broker=f"sqlite:///{tmp_path / 'broker.sqlite3'}")
    app.send_task("readers.nothing", (1,))                          # a queue with one ready message
    monkeypatch.setattr(server, "schedule", lambda app: {"not": "a list"})
    state = OddState()
    now = time.time()
    state.apply([{"type": "worker-heartbeat", "worker": "good-w1", "timestamp": now, "queues": "default",
                  "pool": "gevent", "concurrency": 4, "running": 1},
                 {"type": "task-received", "uuid": "task-1", "name": "readers.nothing", "worker": "good-w1",
                  "timestamp": now}])
    dashboard = OddDashboard(app, state)
    httpd = server.serve(dashboard, "127.0.0.1", 0)
    dashboard.hosts = server.allowed_hosts("127.0.0.1", httpd.server_address[1])   # as greenq dashboard does
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        _until(browser, lambda d: "not updated: dlq" in _text(d, "#status"), "the failed table named")
        assert _text(browser, 'tr[data-worker="good-w1"] td.name') == "good-w1"
        assert _text(browser, 'tr[data-worker="good-w1"] td.queues') == ""          # "default": dropped
        assert _text(browser, 'tr[data-worker="good-w1"] td.concurrency') == "4"
        rows = _table(browser, "#workers tbody tr")
        assert len(rows) == 2                                  # the bad row, blank; "not a row" and null: none
        bad = rows[1]
        assert bad[:5] == ["", "offline", "", "", ""] and bad[-1] == "", bad
        assert _text(browser, 'tr[data-queue="default"] td.ready') == "1"
        assert _text(browser, 'tr[data-task="task-1"] td.state') == "RECEIVED"
        assert browser.find_elements("css selector", "#schedule tbody tr") == []
        assert "HTTP 500" in browser.find_element(
            "css selector", "#dlq-section").get_attribute("data-error")
        assert browser.find_element("css selector", "#schedule-section").get_attribute("data-error") is None
        assert "1 online" == _text(browser, "#workers-count")
    finally:
        httpd.server_close()
        app.close()
