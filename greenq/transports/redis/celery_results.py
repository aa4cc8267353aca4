"""Results of tasks taken from Celery queues, stored where Celery's Redis
result backend keeps them (``celery-task-meta-<id>``, SETEX and PUBLISH on
that name: greenq.celery.results), beside greenq's own record, so an
unmodified Celery client's ``AsyncResult.get()`` returns them.

Also, as Celery's Redis backend does:

* **chords**: a header member of a Celery chord is counted in the chord's
  keys (``celery-taskset-meta-<group id>.j``, ``.t``, ``.s``, ``.d``,
  ``.c``: greenq.celery.results.group_key) by one script
  (scripts/celery_chord_part.lua), so Celery workers and greenq workers can
  run members of one chord; the member that completes it and takes its
  claim sends the body, then ``chord_done`` (scripts/celery_chord_done.lua)
  drops the keys and marks the chord done.
* **groups**: ``celery-taskset-meta-<group id>``, what Celery's
  ``GroupResult.save()`` writes and ``GroupResult.restore()`` reads.
* **reading** Celery's records for greenq's ``AsyncResult`` (a task greenq
  sent to a Celery queue may run on a Celery worker): ``wait_either`` waits
  for greenq's record or Celery's, hearing Celery's PUBLISH on the record's
  key through the backend's one listener (no polling).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...celery.results import READY, group_key, group_record, key, to_greenq_meta
from ...reconnect import Unreachable
from . import lua
from .results import FINAL, RedisBackend

#: how long the claim of the member sending a chord's body lives (Celery's
#: default: twice its 5 s join timeout); a worker dying in between leaves its
#: message unacknowledged, and the member run again takes the claim anew
CLAIM_SECONDS = 10
#: how long a done chord's mark stays (a member run again later does nothing)
DONE_SECONDS = 300
_CHORD_SUFFIXES = (".j", ".t", ".s", ".d", ".c")


class CeleryRedisBackend(RedisBackend):
    """``RedisBackend`` that can also write (and read) Celery's records."""

    celery_records = True
    celery_groups = True

    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self._chord_part_script = self.client.register_script(lua.CELERY_CHORD_PART)
        self._chord_done_celery_script = self.client.register_script(lua.CELERY_CHORD_DONE)
        self._instance = uuid.uuid4().hex        # in this process's chord claims

    def store_celery(self, records: Sequence[Tuple[str, bytes]]) -> None:
        """Write ``(task id, encoded record)`` pairs as Celery's backend does,
        in one round trip."""
        if records:
            self._set_and_publish([(key(task_id), data) for task_id, data in records], "store Celery results")

    def _set_and_publish(self, items: Sequence[Tuple[str, bytes]], what: str) -> None:
        """SETEX (``result_expires``) each ``(key, record)`` and PUBLISH it on the
        key's name, as Celery's Redis backend does, in one round trip."""
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for name, data in items:
                if self.expires:
                    pipe.setex(name, self.expires, data)
                else:
                    pipe.set(name, data)
                pipe.publish(name, data)
            pipe.execute()
        self._call(write, self._timeout, what)

    # -- chords ------------------------------------------------------------------
    def celery_chord_parts(self, parts: Sequence[Tuple[str, str, Any, bytes]]) -> List[Optional[str]]:
        """Count each ``(group id, member id, group_index, entry)``; for each,
        the claim token when that member completed its chord and took the
        claim to send its body (None otherwise), in one round trip."""
        if not parts:
            return []
        keys: List[str] = []
        args: List[Any] = [self.expires, CLAIM_SECONDS]
        tokens = []
        for group_id, member_id, index, entry in parts:
            keys += [group_key(group_id, s) for s in _CHORD_SUFFIXES]
            token = f"{self._instance}:{member_id}"    # the same again when the settler retries
            tokens.append(token)
            args += [member_id, "+inf" if index is None else int(index), entry, token]
        replies = self._call(lambda: self._chord_part_script(keys=keys, args=args), self._timeout,
                             "count Celery chord members")
        return [token if int(reply[2]) == 1 else None for token, reply in zip(tokens, replies)]

    def celery_chord_entries(self, group_id: str) -> List[bytes]:
        """The chord's member entries, in ``group_index`` order."""
        return list(self._call(lambda: self.client.zrange(group_key(group_id, ".j"), 0, -1), self._timeout,
                               "read a Celery chord"))

    def celery_chord_done(self, group_id: str, token: str) -> bool:
        """Drop the chord's keys and mark it done, while ``token`` holds its claim."""
        keys = [group_key(group_id, s) for s in _CHORD_SUFFIXES]
        return bool(self._call(lambda: self._chord_done_celery_script(keys=keys, args=[token, DONE_SECONDS]),
                               self._timeout, "finish a Celery chord"))

    # -- groups ----------------------------------------------------------------
    def save_celery_group(self, group_id: str, member_ids: Sequence[str]) -> None:
        """``celery-taskset-meta-<group id>`` as Celery's ``GroupResult.save()``
        writes it (SETEX ``result_expires``, and PUBLISH, as Celery does)."""
        self._set_and_publish([(group_key(group_id), group_record(group_id, member_ids))], "save a Celery group")

    # -- reading Celery's records -------------------------------------------------
    def get_celery(self, task_id: str) -> Optional[Dict[str, Any]]:
        """The Celery record of ``task_id`` as greenq's result meta, or None."""
        data = self._call(lambda: self.client.get(key(task_id)), self._timeout, "get Celery result")
        return None if data is None else to_greenq_meta(data, task_id)

    def wait_either(self, task_id: str, timeout: Optional[float]) -> Optional[Tuple[str, Any]]:
        """Wait for a final record of ``task_id``: greenq's (``("greenq",
        bytes)``, preferred: a greenq worker writes both) or Celery's
        (``("celery", meta)``); None after ``timeout``.  Celery's PUBLISH on
        the record's key is heard by this backend's listener (``watch``), so
        nothing is polled."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> Optional[float]:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        listener = self._listener
        channel = key(task_id)
        event = listener.register(task_id)
        watching = False
        try:
            if not listener.ready.wait(left()):
                raise Unreachable(f"wait for result: {self.reconnector.name}: "
                                  "the result listener could not subscribe")
            lifetime = int(timeout if timeout is not None else (self.expires or 86400)) + 60
            mine = self._call(lambda: self._check_in_script(
                keys=[self._key("result", task_id), self._key("waiters", task_id)],
                args=[listener.channel, lifetime]), left(), "wait for result")
            if mine is not None and mine[:1] == FINAL:      # done already: nothing more to hear
                return "greenq", mine[1:]
            watching = True
            if not listener.watch(channel, task_id).wait(left()):   # hear Celery's PUBLISH from now on
                return None
            while True:
                if mine is not None and mine[:1] == FINAL:
                    return "greenq", mine[1:]
                theirs = self.get_celery(task_id)
                if theirs is not None and theirs.get("state") in READY:
                    return "celery", theirs
                remaining = left()
                if remaining is not None and remaining <= 0:
                    return None
                if not event.wait(remaining):
                    return None
                event.clear()
                mine = self._call(lambda: self.client.get(self._key("result", task_id)), left(),
                                  "wait for result")
        finally:
            listener.unregister(task_id, event)
            if watching:
                listener.unwatch(channel)
