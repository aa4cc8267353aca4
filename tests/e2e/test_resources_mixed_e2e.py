"""Both ways of holding a permit on one resource in a real greenq-worker
(issue 20): tasks with ``resources={"api": 1}`` and tasks taking
``with app.resource("api"):`` inside, more of them than runners.  The
admission step takes a task's permit only for a free runner that runs it at
once, so the tasks waiting inside their runner slot cannot hold every runner
while the permits are held by tasks queued for one (before, the worker hung:
under gevent and eventlet the consumer admits a whole batch before any
runner starts, so the first `whole` task took the permit and sat behind the
`call` tasks that waited for it)."""
from __future__ import annotations

import json

TASKS = '''
import threading
import time

from greenq import GreenQ

app = GreenQ.from_config(name="mixed")
holding = [0]
lock = threading.Lock()       # (patched under gevent/eventlet; the threads pool needs it)


def enter():
    with lock:
        holding[0] += 1
        seen = holding[0]
    time.sleep(0.01)          # cooperative under gevent/eventlet: others run meanwhile
    with lock:
        holding[0] -= 1
    return seen


@app.task(name="mixed.whole", resources={"api": 1})
def whole(n):
    return enter()


@app.task(name="mixed.call")
def call(n):
    with app.resource("api"):
        return enter()
'''

INI = "[resource:api]\nlimit = 1\n"

SEND = '''
import json, mixed_tasks
ids = []
for n in range(10):
    ids += [mixed_tasks.call.delay(2 * n).id, mixed_tasks.call.delay(2 * n + 1).id, mixed_tasks.whole.delay(n).id]
print(json.dumps(ids))
'''

READ = '''
import json, mixed_tasks
ids = json.loads(open("ids.json").read())
print(json.dumps([mixed_tasks.app.AsyncResult(i).get(timeout=10) for i in ids]))
'''


def test_admission_permits_and_app_resource_share_a_resource_with_fewer_runners(pool, sqlite_env):
    env = sqlite_env
    (env.tmp / "mixed_tasks.py").write_text(TASKS)
    (env.tmp / "greenq.ini").write_text(INI)
    sent = env.client(SEND)
    assert sent.returncode == 0, sent.stderr
    (env.tmp / "ids.json").write_text(sent.stdout.strip())
    code, out = env.run_worker(pool, "-A", "mixed_tasks", "-c", "2", "--prefetch", "8", timeout=60)
    assert code == 0, out
    read = env.client(READ)
    assert read.returncode == 0, read.stderr + out
    assert json.loads(read.stdout) == [1] * 30, out        # every task ran, never two holders at once
