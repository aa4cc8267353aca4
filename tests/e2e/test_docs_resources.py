"""docs/resources.md's recipes, run as written (issue 20, deliverable 6).

Each recipe is three blocks: ``; greenq.ini: recipe "NAME"``, ``# tasks.py:
recipe "NAME"`` and ``# example: NAME``.  The first two become the files of a
real worker on an SQLite broker; the example runs in a plain Python process
against it.  The downstream is real too, and checks the limit from its own
side: an SQLite database for the pool recipe (in process and host scope), a
local HTTP service that counts the requests it serves at once for the API
recipes (refusing with 503 above a capacity for the adaptive one)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import keep_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["database pool", "external API", "adaptive"]


def recipes() -> "dict[str, dict[str, str]]":
    text = (ROOT / "docs" / "resources.md").read_text()
    found: "dict[str, dict[str, str]]" = {}
    for lang, block in re.findall(r"```(python|ini)\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        named = re.fullmatch(r'(?:; greenq\.ini|# tasks\.py): recipe "(.+)"', first)
        if named:
            kind = "ini" if lang == "ini" else "tasks"
            found.setdefault(named.group(1), {})[kind] = block
        elif first.startswith("# example: "):
            found.setdefault(first[len("# example: "):], {})["example"] = block
    return found


def test_every_recipe_is_found_whole():
    found = recipes()
    assert list(found) == RECIPES
    for name, parts in found.items():
        assert sorted(parts) == ["example", "ini", "tasks"], name


class Service:
    """A local HTTP service answering ``{"q": ...}`` after ``latency`` s;
    with ``capacity``, a 503 to any request beyond that many at once."""

    def __init__(self, capacity=None, latency=0.02):
        self.capacity, self.latency = capacity, latency
        self.lock = threading.Lock()
        self.in_flight = self.most = self.served = self.refused = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with service.lock:
                    service.in_flight += 1
                    over = service.capacity is not None and service.in_flight > service.capacity
                    if over:
                        service.refused += 1
                    else:
                        service.most = max(service.most, service.in_flight)
                try:
                    if over:
                        self.send_response(503)
                        self.end_headers()
                        return
                    time.sleep(service.latency)
                    body = json.dumps({"q": parse_qs(urlsplit(self.path).query)["q"][0]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    with service.lock:
                        service.served += 1
                finally:
                    with service.lock:
                        service.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_recipe(tmp: Path, name: str, extra_env: dict, workers: int = 1, ini: str = None) -> str:
    """Write the recipe's files, start its workers, run its example, stop them."""
    parts = recipes()[name]
    (tmp / "greenq.ini").write_text(ini if ini is not None else parts["ini"])
    (tmp / "tasks.py").write_text(parts["tasks"])
    return run_example(tmp, parts["example"], extra_env, workers)


def run_example(tmp: Path, example: str, extra_env: dict, workers: int = 1) -> str:
    """Start ``workers`` gevent workers on the tasks.py and greenq.ini in
    ``tmp`` (an SQLite broker there), run ``example`` as a plain client, stop
    them; what the workers printed (also used by test_resource_pool_e2e)."""
    env = {k: v for k, v in os.environ.items() if keep_env(k)}
    env.update(GREENQ_BROKER_URL=f"sqlite:///{tmp / 'broker.sqlite3'}", PYTHONPATH=f"{tmp}{os.pathsep}{ROOT}",
               GREENQ_WORKER_BLOCKING_THRESHOLD="0", **extra_env)
    procs = [subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "tasks", "-P", "gevent", "-c", "20"],
                              cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(workers)]
    try:
        done = subprocess.run([sys.executable, "-c", example], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=180)
    finally:
        outs = []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            outs.append(out)
    said = "\n".join(outs)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\nworkers:\n{said}"
    assert all(proc.returncode == 0 for proc in procs), said
    return said


@pytest.mark.parametrize("scope", ["process", "host"])
def test_the_database_pool_recipe(tmp_path, scope):
    ini = recipes()["database pool"]["ini"]
    if scope != "process":
        ini = ini.replace("[resource:db]\n", f"[resource:db]\nscope = {scope}\n")
        assert f"scope = {scope}" in ini
    run_recipe(tmp_path, "database pool", {"DATABASE_URL": f"sqlite:///{tmp_path / 'shop.sqlite3'}"},
               ini=ini)


def test_the_external_api_recipe_holds_its_limit_across_two_workers(tmp_path):
    service = Service(latency=0.05)
    try:
        run_recipe(tmp_path, "external API", {"GEOCODER_URL": service.url}, workers=2)
    finally:
        service.close()
    assert service.served == 40
    assert 2 <= service.most <= 8, service.most      # the fleet-wide limit, seen by the service


def test_the_adaptive_recipe_finds_a_capacity_it_was_not_told(tmp_path):
    service = Service(capacity=6, latency=0.02)
    try:
        said = run_recipe(tmp_path, "adaptive", {"SEARCH_URL": service.url})
    finally:
        service.close()
    # every task came back although the service refused some of their
    # requests: the errors were raised, cut the limit and were retried
    assert service.served == 100, said
    assert service.refused > 0, said
