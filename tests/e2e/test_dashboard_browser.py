"""``greenq dashboard`` in a real browser (Debian's chromium and chromedriver,
through selenium): a worker that starts after the page opened, a queue's
count changing, a failure with its traceback, a dead letter requeued from
the page behind its confirmation; plus the JSON API and basic auth.

With GREENQ_TEST_SCREENSHOT=1 the page under load is saved to docs/dashboard.png.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REQUIRE

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent.parent
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1500")


def _missing(what: str) -> None:
    if REQUIRE:
        pytest.fail(f"GREENQ_TEST_REQUIRE_SERVICES=1 but {what} is missing (apt-get install chromium "
                    f"chromium-driver; pip install selenium)")
    pytest.skip(f"{what} is missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_dashboard(env, *extra: str) -> "tuple[subprocess.Popen, str]":
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "dashboard", "--http", f"127.0.0.1:{port}", *extra],
                            cwd=env.tmp, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(base + "/static/style.css", timeout=2).close()
            return proc, base
        except urllib.error.HTTPError:
            return proc, base                       # it answers (401 with auth)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"the dashboard did not start:\n{env.dump()}")
            time.sleep(0.1)


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        _missing("chromium or chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def _until(driver, check, what: str, timeout: float = 30):
    """Wait until ``check(driver)`` is truthy (the page redraws every second)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(WebDriverException,)).until(check)
    except Exception:
        raise AssertionError(f"the page never showed {what}; it shows:\n"
                             f"{driver.find_element('tag name', 'main').text}") from None


def _table(driver, css: str) -> "list[list[str]]":
    """The cells' texts of the rows ``css`` selects, read again whole when a
    redraw replaced them while they were read (see _text)."""
    from selenium.common.exceptions import StaleElementReferenceException
    for attempt in range(5):
        try:
            return [[cell.text for cell in row.find_elements("css selector", "td")]
                    for row in driver.find_elements("css selector", css)]
        except StaleElementReferenceException:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _text(driver, css: str) -> str:
    """The element's text.  The page redraws its tables every second, so an
    element found just before a redraw can be replaced before it is read
    (StaleElementReferenceException): it is then found again."""
    from selenium.common.exceptions import StaleElementReferenceException
    for attempt in range(5):
        try:
            return driver.find_element("css selector", css).text
        except StaleElementReferenceException:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def test_dashboard_in_a_browser(pool, sqlite_env, browser):
    import e2e_tasks
    env = sqlite_env
    app = env.app()
    _, base = _start_dashboard(env)
    browser.get(base + "/")
    _until(browser, lambda d: "updated" in _text(d, "#status"), "its first update")
    assert browser.find_element("css selector", "#workers-empty").is_displayed()

    # a queue's count changes as tasks are sent, before any worker runs
    e2e_tasks.add.delay(1, 1)
    _until(browser, lambda d: _text(d, 'tr[data-queue="default"] td.ready') == "1", "1 ready message")
    more = [e2e_tasks.add.delay(i, 1) for i in range(2)]
    _until(browser, lambda d: _text(d, 'tr[data-queue="default"] td.ready') == "3", "3 ready messages")
    assert re.fullmatch(r"\d+\.\d s", _text(browser, 'tr[data-queue="default"] td.oldest-ready-age'))

    # a worker that starts after the page opened appears, online, and drains the queue
    worker = env.worker(pool, "-n", "browser-w1", "-E", burst=False)
    _until(browser, lambda d: _text(d, 'tr[data-worker="browser-w1"] td:nth-child(2)') == "online",
           "the new worker online")
    assert [r.get(timeout=20) for r in more] == [1, 2]
    _until(browser, lambda d: _text(d, 'tr[data-queue="default"] td.ready') == "0", "the queue drained")

    # a failure with its traceback
    failed = e2e_tasks.fail.delay("shown in the browser")
    failed.get(timeout=20, propagate=False)
    css = f'.failure[data-task="{failed.id}"] pre.traceback'
    _until(browser, lambda d: "Traceback" in _text(d, css), "the failure's traceback (the newest is open)")
    trace = _text(browser, css)
    assert "KeyError" in trace and "e2e_tasks.py" in trace, trace
    _until(browser, lambda d: _text(d, f'tr[data-task="{failed.id}"] td.state') == "FAILURE", "the task list")

    # a dead letter (an unknown task), requeued from the page behind its confirmation
    app.send_task("e2e.no_such_task", (1,))
    row = 'tr[data-dead] td.reason'
    _until(browser, lambda d: "unknown task" in _text(d, row), "the dead letter")
    if os.environ.get("GREENQ_TEST_SCREENSHOT"):
        _load(e2e_tasks, seconds=20)
        _until(browser, lambda d: d.find_element("css selector", "#chart-total").text.startswith("(")
               and not d.find_element("css selector", "#chart-total").text.startswith("(0 "), "throughput")
        browser.save_screenshot(str(ROOT / "docs" / "dashboard.png"))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    _until(browser, lambda d: _text(d, 'tr[data-worker="browser-w1"] td:nth-child(2)') == "offline",
           "the worker offline")
    ready_before = int(_text(browser, 'tr[data-queue="default"] td.ready'))
    browser.find_element("css selector", "tr[data-dead] button.requeue").click()
    assert browser.find_element("css selector", "#confirm").is_displayed()
    assert "Requeue dead letter" in _text(browser, "#confirm-text")
    browser.find_element("css selector", "#confirm-yes").click()
    _until(browser, lambda d: not d.find_elements("css selector", "tr[data-dead]"), "the dead letter gone")
    _until(browser, lambda d: int(_text(d, 'tr[data-queue="default"] td.ready')) == ready_before + 1,
           "the requeued message ready again")


def _load(e2e_tasks, seconds: float) -> None:
    """Tasks for a screenshot under load: a stream of additions and a few failures."""
    def send() -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            e2e_tasks.app.enqueue_many([e2e_tasks.add.s(i, j) for j in range(40)])
            if i % 5 == 0:
                e2e_tasks.fail.delay(f"load {i}")
            i += 1
            time.sleep(0.1)
    thread = threading.Thread(target=send)
    thread.start()
    thread.join()


def test_api_and_basic_auth(sqlite_env):
    env = sqlite_env
    env.env["GREENQ_DASHBOARD_AUTH"] = "ops:s3cret"
    _, base = _start_dashboard(env)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/api/workers", timeout=5)
    assert refused.value.code == 401
    token = base64.b64encode(b"ops:s3cret").decode()

    def call(path: str, body=None, headers=None):
        req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", **(headers or {})})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    assert call("/api/workers") == [] and call("/api/tasks") == []
    assert {q["name"] for q in call("/api/queues")} >= set()
    with pytest.raises(urllib.error.HTTPError) as forged:       # no X-GreenQ header: not from the page
        call("/api/dlq/purge", {})
    assert forged.value.code == 403
    assert call("/api/dlq/purge", {}, {"X-GreenQ": "1", "Content-Type": "application/json"}) == {"purged": 0}


def test_the_resources_panel(pool, sqlite_env, browser):
    """A worker whose pg (limit 1) is held while four tasks wait: the panel
    shows the limit in force, in use and waiting, with the limit's sparkline,
    and follows when the permit is released."""
    from tests.e2e.test_resources_observed_e2e import INI, SEND, TASKS
    env = sqlite_env
    (env.tmp / "resobs_tasks.py").write_text(TASKS)
    (env.tmp / "greenq.ini").write_text(INI)
    sent = env.client(SEND)
    assert sent.returncode == 0, sent.stderr
    _, base = _start_dashboard(env)
    browser.get(base + "/")
    _until(browser, lambda d: "updated" in _text(d, "#status"), "its first update")
    assert browser.find_element("css selector", "#resources-empty").is_displayed()
    env.worker(pool, "-A", "resobs_tasks", "-n", "res-w1", "-c", "4", burst=False)
    env.wait_marker("holding")
    row = 'tr[data-resource="pg"]'
    _until(browser, lambda d: _text(d, f"{row} td.waiting") == "4", "four tasks waiting on pg")
    assert [_text(browser, f"{row} td.{cls}") for cls in ("limit", "configured", "in-use")] == ["1", "1", "1"]
    assert browser.find_elements("css selector", f"{row} svg.sparkline polyline.limit")
    assert _text(browser, 'tr[data-resource="api"] td.limit') == "7"
    assert not browser.find_element("css selector", "#resources-empty").is_displayed()
    (env.tmp / "markers" / "release").write_text("go\n")
    _until(browser, lambda d: _text(d, f"{row} td.waiting") == "0" and _text(d, f"{row} td.in-use") == "0",
           "pg free again")
