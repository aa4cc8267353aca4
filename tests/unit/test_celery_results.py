"""greenq.celery.results: the record Celery's result backends store, built
purely (the Redis write is tests/e2e/transport_redis/test_celery_interop_e2e.py,
read there by Celery's own AsyncResult)."""
from __future__ import annotations

import datetime as dt
import decimal
import json

from greenq.celery import protocol, results


class Odd:
    pass


def test_a_success_record_has_celerys_keys_and_kombus_json():
    record = json.loads(results.encode(results.meta("t1", "SUCCESS", result={"n": decimal.Decimal("1.5")},
                                                    parent_id="p", group_id="g")))
    assert set(record) == {"status", "result", "traceback", "children", "date_done", "task_id", "parent_id",
                           "group_id"}
    assert (record["status"], record["task_id"], record["children"], record["traceback"]) == ("SUCCESS", "t1", [], None)
    assert record["result"] == {"n": {"__type__": "decimal", "__value__": "1.5"}}
    assert dt.datetime.fromisoformat(record["date_done"]).tzinfo is not None
    assert protocol.json_loads(results.encode(results.meta("t", "SUCCESS", result=b"\xff")))["result"] == b"\xff"


def test_an_exception_is_stored_as_celery_rebuilds_it():
    record = json.loads(results.encode(results.meta("t2", "FAILURE", exc=KeyError("k", 1), traceback="tb")))
    assert record["result"] == {"exc_type": "KeyError", "exc_message": ["k", 1], "exc_module": "builtins"}
    assert record["traceback"] == "tb" and record["date_done"]
    odd = json.loads(results.encode(results.meta("t3", "FAILURE", exc=ValueError(Odd()))))
    assert odd["result"]["exc_type"] == "ValueError" and odd["result"]["exc_message"][0].startswith("<")


def test_a_result_json_cannot_carry_is_stored_as_a_failure_saying_so():
    record = json.loads(results.encode(results.meta("t4", "SUCCESS", result=Odd())))
    assert record["status"] == "FAILURE" and record["result"]["exc_type"] == "TypeError"
    assert "not serializable" in record["result"]["exc_message"][0]


def test_the_worker_s_outcomes_map_to_celery_states():
    msg = protocol.CeleryMessage("t", [], {}, id="m1", parent_id="p1")
    task_id, data = results.worker_record(msg, "success", 42, None, None, None)
    assert task_id == "m1" and json.loads(data)["result"] == 42 and json.loads(data)["parent_id"] == "p1"
    revoked = json.loads(results.worker_record(msg, "revoked", None, None, None, "expired")[1])
    assert revoked["status"] == "REVOKED" and revoked["result"]["exc_type"] == "TaskRevokedError"
    assert revoked["result"]["exc_message"] == ["expired"]
    retry = json.loads(results.worker_record(msg, "retry", None, RuntimeError("again"), None, None)[1])
    assert retry["status"] == "RETRY" and retry["date_done"] is None
    assert results.worker_record(msg, "defer", None, None, None, None) is None
    assert results.key("m1") == "celery-task-meta-m1"
