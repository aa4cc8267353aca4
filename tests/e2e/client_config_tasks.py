"""Tasks of the client-config e2e tests (issue 18): tasks that wait on
subtasks, run by real worker processes (``-A client_config_tasks``)."""
from greenq import GreenQ, group

app = GreenQ.from_config(name="client_config")


@app.task(name="client_config.add")
def add(x, y):
    return x + y


@app.task(name="client_config.waits")
def waits(x, opt_out=False):
    """Waits on a subtask: refused inside a task unless opted out."""
    result = add.delay(x, 1)
    if opt_out:
        return result.get(timeout=20, disable_sync_subtasks=False)
    return result.get(timeout=20)


@app.task(name="client_config.waits_group")
def waits_group(n):
    return group(add.s(i, i) for i in range(n)).delay().get(timeout=20)
