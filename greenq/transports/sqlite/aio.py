"""The asyncio client's results on ``sqlite://``: SQLite cannot notify, so
one poller per client (greenq/aio/threaded.py, ``PollingResults``) reads
the final records of every task waited for with one ``SELECT ... IN (...)``
per pause (5 ms growing to 200 ms while nothing arrives), in a thread of its
own, on the app's result backend's connections.  A thousand concurrent
``aget()`` cost one query per pause, the same as one.  Publishing is the
blocking broker's ``publish_many`` (one transaction per gathered batch) in a
thread: ``ThreadedPublisher``."""
from __future__ import annotations

import sqlite3
import time
from typing import Dict, Sequence

from ...aio.threaded import PollingResults
from .client import chunks, placeholders


class SQLiteResults(PollingResults):
    """``PollingResults`` with one query of the results table."""

    def _final_many(self, task_ids: Sequence[str]) -> Dict[str, bytes]:
        backend = self.app.backend
        table = backend._t.results        # type: ignore[attr-defined]  # a SQLiteBackend (sqlite:// URL)
        ids = list(task_ids)

        def query(conn: sqlite3.Connection) -> Dict[str, bytes]:
            found: Dict[str, bytes] = {}
            now = time.time()
            for chunk in chunks(ids):
                found.update(conn.execute(
                    f"SELECT task_id, data FROM {table} WHERE task_id IN ({placeholders(len(chunk))}) "
                    "AND final = 1 AND expires_at > ?", (*chunk, now)))
            return found
        found: Dict[str, bytes] = backend._run(query)     # type: ignore[attr-defined]  # off the hub when patched
        return found
