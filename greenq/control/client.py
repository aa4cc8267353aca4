"""The sender's side: broadcast a command and gather the replies until a
timeout (or until every named destination answered); read the event stream.

    from greenq.control.client import Control
    replies = Control(app).call("ping", timeout=1.0)   # [{"worker": ..., "ok": "pong"}, ...]
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence

from .base import Document, make_transport

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ


class Control:
    def __init__(self, app: "GreenQ") -> None:
        self.app = app
        self.transport = make_transport(app.config.broker_url, app.config, None)

    def call(self, command: str, args: Optional[Dict[str, Any]] = None,
             destination: Optional[Sequence[str]] = None, timeout: float = 1.0) -> List[Document]:
        """Replies to ``command`` from the workers that answered within ``timeout`` seconds."""
        cmd_id = uuid.uuid4().hex
        cmd = {"id": cmd_id, "command": command, "args": args or {},
               "destination": list(destination) if destination else None,
               "reply_to": uuid.uuid4().hex, "sent": time.time()}
        reply_to = self.transport.broadcast(cmd)
        deadline = time.monotonic() + timeout
        replies: Dict[str, Document] = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for reply in self.transport.replies(reply_to, left):
                if reply.get("id") == cmd_id and isinstance(reply.get("worker"), str):
                    replies[reply["worker"]] = reply
            if destination and set(destination) <= set(replies):
                break
        return sorted(replies.values(), key=lambda r: r["worker"])

    def send(self, command: str, args: Optional[Dict[str, Any]] = None,
             destination: Optional[Sequence[str]] = None) -> None:
        """Broadcast ``command`` and wait for no reply (a ``revoke``)."""
        self.transport.broadcast({"id": uuid.uuid4().hex, "command": command, "args": args or {},
                                  "destination": list(destination) if destination else None,
                                  "reply_to": None, "sent": time.time()})

    def events(self, history: int = 0, poll: float = 1.0) -> Iterator[List[Document]]:
        """Batches of events as they arrive (an empty list every ``poll`` seconds of silence)."""
        self.transport.subscribe(history)
        while True:
            yield self.transport.events(poll)

    def close(self) -> None:
        self.transport.close()

