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


def test_chord_entries_give_the_values_in_order_or_celery_s_chord_error():
    entries = [results.chord_part("a", "SUCCESS", value=1), results.chord_part("b", "SUCCESS", value={"x": 2})]
    assert json.loads(entries[0]) == [1, "a", "SUCCESS", 1]
    assert results.chord_results(entries) == ([1, {"x": 2}], None)
    failed = entries + [results.chord_part("c", "FAILURE", exc=ValueError("boom", 3))]
    assert results.chord_results(failed) == ([1, {"x": 2}], "Dependency c raised ValueError('boom', 3)")
    revoked = [results.chord_part("d", "REVOKED", exc=RuntimeError("expired"))]
    assert results.chord_results(revoked)[1] == "Dependency d raised RuntimeError('expired')"
    odd = results.chord_part("e", "SUCCESS", value=Odd())            # not JSON: a FAILURE saying so
    assert results.chord_results([odd])[1].startswith("Dependency e raised TypeError('result not serializable")
    assert results.chord_results([b"\x00"])[1].startswith("Dependency entry unreadable")


def test_the_chord_error_record_is_celery_s_chord_error():
    record = json.loads(results.chord_error("body", "Dependency c raised ValueError('boom')", group_id="g"))
    assert record["status"] == "FAILURE" and record["task_id"] == "body" and record["group_id"] == "g"
    assert record["result"] == {"exc_type": "ChordError", "exc_message": ["Dependency c raised ValueError('boom')"],
                                "exc_module": "celery.exceptions"}


def test_group_records_round_trip_and_nested_groups_flatten():
    assert json.loads(results.group_record("g", ["a", "b"])) == {"result": [["g", None], [[["a", None], None],
                                                                                        [["b", None], None]]]}
    assert results.group_members(results.group_record("g", ["a", "b"])) == ["a", "b"]
    nested = json.dumps({"result": [["g", None], [[["a", None], None], [["h", None], [[["b", None], None]]]]]})
    assert results.group_members(nested) == ["a", "b"]
    assert results.group_members(b"not json") is None and results.group_members('{"result": 1}') is None


def test_started_is_celery_s_started():
    record = json.loads(results.started("t", 42, "greenq@h", parent_id="p"))
    assert (record["status"], record["result"], record["date_done"], record["parent_id"]) == \
        ("STARTED", {"pid": 42, "hostname": "greenq@h"}, None, "p")


def test_a_celery_record_reads_as_greenq_s_meta():
    ok = results.to_greenq_meta(results.encode(results.meta("t", "SUCCESS", result=dt.date(2030, 1, 2))), "t")
    assert ok is not None and (ok["state"], ok["result"]) == ("SUCCESS", dt.date(2030, 1, 2))
    failed = results.to_greenq_meta(results.encode(results.meta("t", "FAILURE", exc=KeyError("k"), traceback="tb")),
                                    "t")
    assert failed is not None and failed["exc"] == {"type": "builtins.KeyError", "args": ["k"], "message": "k"}
    assert failed["traceback"] == "tb" and failed["result"] is None
    revoked = results.to_greenq_meta(json.dumps({"status": "REVOKED", "result": {
        "exc_type": "TaskRevokedError", "exc_message": ["expired"], "exc_module": "celery.exceptions"}}), "t")
    assert revoked is not None and revoked["reason"] == "expired"
    assert results.to_greenq_meta(b"\xff", "t") is None and results.to_greenq_meta("[1]", "t") is None
