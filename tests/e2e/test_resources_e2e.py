"""Resource permits in a real greenq-worker (issue 20): the limit holds under
the pool under test while tasks needing no permit go on, and a task naming a
resource with no section stops the worker at start (exit 2) with the nearest
valid name."""
from __future__ import annotations

import json

TASKS = '''
import threading
import time

from greenq import GreenQ

app = GreenQ.from_config(name="res")
holding = {"pg": 0, "api": 0}
lock = threading.Lock()       # (patched under gevent/eventlet; the threads pool needs it)


def enter(name):
    with lock:
        holding[name] += 1
        seen = holding[name]
    time.sleep(0.02)          # cooperative under gevent/eventlet: others run meanwhile
    with lock:
        holding[name] -= 1
    return seen


@app.task(name="res.query", resources={"pg": 1})
def query(n):
    return enter("pg")


@app.task(name="res.call")
def call(n):
    with app.resource("api"):
        return enter("api")


@app.task(name="res.free")
def free(n):
    return n
'''

INI = "[resource:pg]\\nlimit = 2\\n\\n[resource:api]\\nlimit = 1\\n"

SEND = '''
import json, res_tasks
ids = [res_tasks.query.delay(n).id for n in range(40)]
ids += [res_tasks.call.delay(n).id for n in range(10)]
ids += [res_tasks.free.delay(n).id for n in range(20)]
print(json.dumps(ids))
'''

READ = '''
import json, sys, res_tasks
ids = json.loads(sys.argv[1] if len(sys.argv) > 1 else open("ids.json").read())
print(json.dumps([res_tasks.app.AsyncResult(i).get(timeout=10) for i in ids]))
'''


def test_the_limit_holds_in_a_real_worker(pool, sqlite_env):
    env = sqlite_env
    (env.tmp / "res_tasks.py").write_text(TASKS)
    (env.tmp / "greenq.ini").write_text(INI.replace("\\n", "\n"))
    sent = env.client(SEND)
    assert sent.returncode == 0, sent.stderr
    (env.tmp / "ids.json").write_text(sent.stdout.strip())
    code, out = env.run_worker(pool, "-A", "res_tasks", "-c", "20", timeout=120)
    assert code == 0, out
    read = env.client(READ)
    assert read.returncode == 0, read.stderr + out
    values = json.loads(read.stdout)
    pg, api, free = values[:40], values[40:50], values[50:]
    assert max(pg) == 2 and min(pg) >= 1, pg          # never above the limit, and used
    assert api == [1] * 10, api
    assert free == list(range(20))


def test_a_task_naming_an_unknown_resource_stops_the_worker_with_the_nearest_name(pool, sqlite_env):
    env = sqlite_env
    (env.tmp / "res_tasks.py").write_text(TASKS.replace('resources={"pg": 1}', 'resources={"pgg": 1}'))
    (env.tmp / "greenq.ini").write_text(INI.replace("\\n", "\n"))
    code, out = env.run_worker(pool, "-A", "res_tasks", timeout=60)
    assert code == 2, out
    assert "resource 'pgg'" in out and "[resource:pg]" in out, out
