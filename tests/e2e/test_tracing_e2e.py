"""[greenq] tracing with a real greenq-worker process (docs/tracing.md): the
client's producer spans and the worker's consumer spans, each process exporting
its own to a file, are one trace (the in-process cases: tests/unit/test_tracing.py)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the test extra installs opentelemetry-sdk")

CLIENT = '''
import json
from tracing_tasks import add, total, export_spans
from greenq import chain, chord
export_spans()
single = add.delay(2, 3)
steps = chain(add.s(1, 2), add.s(3)).apply_async()
joined = chord([add.s(i, i) for i in range(3)], total.s()).apply_async()
print(json.dumps({"single": single.id, "chain": steps.id, "chain_first": steps.parent.id, "chord": joined.id}))
'''


def read_spans(directory):
    return [json.loads(line) for path in sorted(directory.glob("spans.*.jsonl"))
            for line in path.read_text().splitlines()]


def test_the_workers_consumer_spans_are_in_the_producers_traces(pool, any_env):
    env = any_env
    traces = env.tmp / "traces"
    traces.mkdir()
    env.env.update({"GREENQ_TRACING": "true", "TRACE_DIR": str(traces)})
    if env.kind == "amqp":      # a chord needs stored results: rpc:// keeps none
        env.env["GREENQ_RESULT_BACKEND"] = f"sqlite:///{env.tmp / 'results.sqlite3'}"
    sent = env.client(CLIENT)
    assert sent.returncode == 0, sent.stderr
    ids = json.loads(sent.stdout)
    code, out = env.run_worker(pool, "-A", "tracing_tasks", "-c", "4")
    queue = env.env.get("GREENQ_DEFAULT_QUEUE", "default")
    assert code == 0, out
    app = env.app("tracing_tasks")
    assert app.AsyncResult(ids["single"]).get(timeout=10) == 5
    assert app.AsyncResult(ids["chain"]).get(timeout=10) == 6
    assert app.AsyncResult(ids["chord"]).get(timeout=10) == 6
    spans = read_spans(traces)
    client_pid = {s["pid"] for s in spans if s["kind"] == "PRODUCER" and s["attributes"]["messaging.message.id"]
                  == ids["single"]}
    assert len(client_pid) == 1
    by_id = {s["span_id"]: s for s in spans}

    def one(kind, message_id):
        found = [s for s in spans if s["kind"] == kind and s["attributes"]["messaging.message.id"] == message_id]
        assert len(found) == 1, (kind, message_id, spans)
        return found[0]
    send, run = one("PRODUCER", ids["single"]), one("CONSUMER", ids["single"])
    assert send["pid"] in client_pid and run["pid"] not in client_pid       # two processes, one trace
    assert run["trace_id"] == send["trace_id"] and run["parent"] == send["span_id"]
    assert (send["name"], run["name"]) == (f"send {queue}", f"process {queue}")
    assert run["attributes"]["messaging.operation.type"] == "process"
    # the chain: its second step sent by the worker under the first step's run
    first_run, last_send = one("CONSUMER", ids["chain_first"]), one("PRODUCER", ids["chain"])
    assert last_send["pid"] not in client_pid and last_send["parent"] == first_run["span_id"]
    assert one("CONSUMER", ids["chain"])["trace_id"] == one("PRODUCER", ids["chain_first"])["trace_id"]
    # the chord: the callback, sent by a worker, linked to the members' sends from the client
    callback = one("CONSUMER", ids["chord"])
    assert len(callback["links"]) == 3
    assert all(by_id[link]["kind"] == "PRODUCER" and by_id[link]["pid"] in client_pid
               for link in callback["links"])
