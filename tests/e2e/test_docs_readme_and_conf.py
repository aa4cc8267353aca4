"""The documentation is executable (issue 8, items 8 and 12): the README's
tutorial runs, block by block, against Redis with a real worker; a worker
starts from each conf/ example and runs a task; the README documents how to
point the tests elsewhere.

Only the servers' addresses are changed (the test Redis database and key
prefix, the test RabbitMQ vhost, a local web server instead of
example.org); each replaced text must occur in the file, so a change to the
docs that these tests do not follow fails them.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tests.conftest import delete_queues, own_prefix

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TUTORIAL_BROKER = "redis://127.0.0.1:6379/0"
TUTORIAL_URL = "https://example.org"


def blocks(text: str) -> List[Tuple[str, str]]:
    """``(language, code)`` of every fenced code block of ``text``, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def tutorial() -> List[Tuple[str, str]]:
    start = README.index("## Tutorial")
    end = README.index("\n## ", start + 1)
    return blocks(README[start:end])


def replace(text: str, replacements: Dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the docs no longer contain {old!r}; update this test with them"
        text = text.replace(old, new)
    return text


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_") or k.startswith("GREENQ_TEST_")}
    env.update(PYTHONPATH=str(ROOT), GREENQ_WORKER_BLOCKING_THRESHOLD="0", **extra)
    return env


def greenq_argv(words: List[str]) -> List[str]:
    """``greenq ...`` / ``greenq-worker ...`` as this interpreter runs them."""
    module = {"greenq": "greenq.cli", "greenq-worker": "greenq.worker"}[Path(words[0]).name]
    return [sys.executable, "-m", module, *words[1:]]


# -- README -------------------------------------------------------------------------

def test_ci_runs_the_readmes_test_command_verbatim():
    """.ci/run runs the README's second command (install, then the whole
    suite) exactly as the README gives it."""
    first_block = blocks(README)[0][1]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and "tox" in commands[1], commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, f".ci/run does not run the README's {commands[1]!r}"


def test_readme_install_line_installs_the_tutorials_broker_client():
    tasks_code = tutorial()[0][1]
    scheme = re.search(r'broker="(\w+)://', tasks_code).group(1)
    needed = {"redis": "redis", "rediss": "redis", "amqp": "amqp", "pyamqp": "amqp"}.get(scheme)
    installs = re.findall(r"pip install (?:-e )?'\.\[([\w,]+)\]'", README)
    assert installs, "the README has no pip install line"
    for extras in installs:
        assert needed is None or needed in extras.split(","), (extras, scheme)


@pytest.fixture
def web_server():
    """A local stand-in for example.org, so the tutorial does not need the Internet."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


#: runs a Python block statement by statement; an expression followed by a
#: comment holding a Python literal (``r.get(timeout=10)  # 5``) must equal it
RUNNER = '''
import ast, sys
source = open(sys.argv[1]).read()
lines = source.splitlines()
scope = {"__name__": "__main__"}
for node in ast.parse(source).body:
    code = ast.Module(body=[node], type_ignores=[])
    if isinstance(node, ast.Expr):
        comment = lines[node.end_lineno - 1][node.end_col_offset:].strip()
        value = eval(compile(ast.Expression(node.value), "<readme>", "eval"), scope)
        if comment.startswith("#"):
            try:
                expected = ast.literal_eval(comment[1:].strip())
            except (ValueError, SyntaxError):
                continue
            assert value == expected, f"line {node.lineno}: {value!r} != {expected!r} (README)"
            print(f"checked line {node.lineno}: {value!r}")
    else:
        exec(compile(code, "<readme>", "exec"), scope)
print("block ran")
'''


@pytest.mark.e2e
def test_readme_tutorial_runs_as_written(tmp_path, redis_url, redis_prefix, web_server):
    pytest.importorskip("gevent")
    (tasks_lang, tasks_code), (_, worker_sh), (calls_lang, calls_code), (_, operate_sh) = tutorial()
    assert tasks_lang == calls_lang == "python"
    path = tasks_code.splitlines()[0].lstrip("# ").strip()
    assert path == "shop/tasks.py"
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / path).write_text(replace(tasks_code, {TUTORIAL_BROKER: redis_url}))
    env = clean_env(GREENQ_KEY_PREFIX=redis_prefix)

    worker_cmd = [line for line in worker_sh.splitlines() if line.startswith("greenq-worker")]
    assert len(worker_cmd) == 1
    worker = subprocess.Popen(greenq_argv(shlex.split(worker_cmd[0])), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        (tmp_path / "calls.py").write_text(replace(calls_code, {TUTORIAL_URL: web_server}))
        (tmp_path / "runner.py").write_text(RUNNER)
        ran = subprocess.run([sys.executable, "runner.py", "calls.py"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "checked line 4: 5" in ran.stdout and "block ran" in ran.stdout

        task_id = None
        for line in operate_sh.splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if "TASK_ID" in words:
                assert task_id, "the tutorial shows a result before any call"
                words = [task_id if w == "TASK_ID" else w for w in words]
            done = subprocess.run(greenq_argv(words), cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=90)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
            if "call" in words:
                task_id, outcome = done.stdout.splitlines()
                assert '"result": 5' in outcome and '"state": "SUCCESS"' in outcome, done.stdout
            if "result" in words:
                assert "SUCCESS" in done.stdout, done.stdout
            if "queues" in words:
                assert re.search(r"^io\s", done.stdout, re.M) and re.search(r"^default\s", done.stdout, re.M)
            if "show" in words:
                assert f"broker_url = {redis_url}" in done.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    assert "app='shop'" in out and "Traceback" not in out, out


# -- conf/ ----------------------------------------------------------------------------

TASKS = textwrap.dedent('''
    from greenq import GreenQ

    app = GreenQ("shop")   # every setting comes from the INI file the worker was started with


    @app.task
    def add(x, y):
        return x + y
    ''')


def rewrite(ini: str, values: Dict[str, Dict[str, str]]) -> str:
    """``ini`` with ``key = value`` set in each section: an existing line is
    replaced, a missing key added under its section header."""
    lines = ini.splitlines()
    for section, keys in values.items():
        start = lines.index(f"[{section}]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        for key, value in keys.items():
            at = next((i for i in range(start + 1, end) if re.match(rf"{key}\s*=", lines[i])), None)
            if at is None:
                lines.insert(start + 1, f"{key} = {value}")
                end += 1
            else:
                lines[at] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


def unit_command(text: str) -> Tuple[List[str], Dict[str, str]]:
    """ExecStart's words and Environment= variables of a systemd unit."""
    words, env = [], {}
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            words = shlex.split(line[len("ExecStart="):])
        elif line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            env[key] = value
    return words, env


def supervisord_command(text: str) -> List[str]:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(text)
    return shlex.split(parser.get("program:greenq-worker", "command"))


CONF_FILES = ["greenq.ini", "redis.ini", "rabbitmq.ini", "greenq-worker.service", "supervisord.conf"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", CONF_FILES)
def test_a_worker_started_from_each_conf_example_runs_a_task(name, request, tmp_path):
    pytest.importorskip("gevent")
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "tasks.py").write_text(TASKS)
    env = clean_env()
    ini_name = {"greenq-worker.service": "redis.ini", "supervisord.conf": "redis.ini"}.get(name, name)
    ini = (ROOT / "conf" / ini_name).read_text()
    if ini_name == "greenq.ini":   # every key at its default: SQLite in the current directory, no app
        ini = rewrite(ini, {"greenq": {"app": "shop.tasks",
                                       "logging_config": str(ROOT / "conf" / "logging.ini")}})
    elif ini_name == "redis.ini":
        ini = rewrite(ini, {"greenq": {"broker_url": request.getfixturevalue("redis_url"),
                                       "key_prefix": request.getfixturevalue("redis_prefix")}})
    else:
        queue, prefix, url = f"conf-{uuid.uuid4().hex[:8]}", own_prefix(), request.getfixturevalue("amqp_url")
        request.addfinalizer(lambda: delete_queues(url, [queue], prefix))
        ini = rewrite(ini, {"greenq": {"broker_url": url, "key_prefix": prefix, "default_queue": queue},
                            "worker": {"queues": queue}})
    config = tmp_path / "greenq-test.ini"
    config.write_text(ini)

    if name.endswith(".ini"):
        argv = greenq_argv(["greenq-worker", "--config", str(config)])
    elif name.endswith(".service"):
        words, unit_env = unit_command((ROOT / "conf" / name).read_text())
        assert set(unit_env) == {"GREENQ_CONFIG"}
        env["GREENQ_CONFIG"] = str(config)
        argv = greenq_argv(words)
    else:
        words = supervisord_command((ROOT / "conf" / name).read_text())
        argv = greenq_argv(replace(" ".join(words), {"/etc/greenq/greenq.ini": str(config)}).split())
    assert "-A" not in argv   # the documented way: the INI names the app

    worker = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        called = subprocess.run(greenq_argv(["greenq", "--config", str(config), "call", "shop.tasks.add",
                                             "--args", "[2, 3]", "--wait", "--timeout", "60"]),
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert called.returncode == 0, called.stdout + called.stderr + out
    assert '"result": 5' in called.stdout
    assert worker.returncode == 0, out
    assert "app='shop'" in out and "Traceback" not in out and "WARNING" not in out, out


# -- the test suite's own settings ------------------------------------------------------

def test_every_test_environment_variable_is_documented_in_the_readme():
    used = set()
    for path in (ROOT / "tests").rglob("*.py"):
        used |= set(re.findall(r"""environ(?:\.get\(|\[)["'](GREENQ_TEST_\w+)["']""", path.read_text()))
    used -= {"GREENQ_TEST_DRIVER"}   # the workers' own copy of GREENQ_TEST_DRIVERS, set by the tests
    missing = sorted(v for v in used if f"`{v}`" not in README)
    assert not missing, f"README.md does not document {missing}"


def test_tox_shows_skip_reasons():
    commands = [line for line in (ROOT / "tox.ini").read_text().splitlines() if " pytest " in f" {line} "]
    assert commands and all(" -rs " in f"{line} " for line in commands), commands


def test_the_test_vhost_and_redis_db_can_be_set_by_environment(tmp_path, amqp_url, redis_url):
    """A run with GREENQ_TEST_AMQP_VHOST uses that (existing) vhost and leaves it; GREENQ_TEST_REDIS_DB the db."""
    vhost = amqp_url.rsplit("/", 1)[1]
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_probe(amqp_url, redis_url):\n    print('URLS', amqp_url, redis_url)\n")
    env = dict(os.environ, GREENQ_TEST_AMQP_VHOST=vhost, GREENQ_TEST_REDIS_DB="12")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", "--rootdir", str(tmp_path), str(probe)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    line = [x for x in done.stdout.splitlines() if x.startswith("URLS")][0]
    assert line.split()[1].endswith(f"/{vhost}") and line.split()[2].endswith("/12"), line
    import amqp   # the vhost is still there: the run did not delete what it did not create
    from greenq.transports.amqp.common import connection_params
    conn = amqp.Connection(**connection_params(amqp_url))
    conn.connect()
    conn.close()
