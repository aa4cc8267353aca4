"""The sender's side: broadcast a command and gather the replies until a
timeout (or until every named destination answered); read the event stream.

    from greenq.control.client import Control
    replies = Control(app).call("ping", timeout=1.0)   # [{"worker": ..., "ok": "pong"}, ...]

With ``[greenq] signing_key`` every command is signed whole and every reply
must be signed (greenq/control/auth.py): an unsigned or forged reply is
dropped and logged.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence

from .. import validation
from ..signing import Signer
from .auth import read_reply, sign_command
from .base import Document, make_transport

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ


class Control:
    def __init__(self, app: "GreenQ") -> None:
        self.app = app
        self.transport = make_transport(app.config.broker_url, app.config, None)
        self.signer = Signer(app.config.signing_key)
        self.sender = f"{socket.gethostname()}.{os.getpid()}"

    def _broadcast(self, command: str, args: Optional[Dict[str, Any]], destination: Optional[Sequence[str]],
                   reply_to: Optional[str]) -> str:
        """Send one command (signed when there is a key); return its id."""
        cmd_id = uuid.uuid4().hex
        doc = {"id": cmd_id, "command": command, "args": args or {},
               "destination": list(destination) if destination else None,
               "reply_to": reply_to, "sent": time.time(), "sender": self.sender}
        self.transport.broadcast(sign_command(self.signer, doc))
        return cmd_id

    def call(self, command: str, args: Optional[Dict[str, Any]] = None,
             destination: Optional[Sequence[str]] = None, timeout: float = 1.0) -> List[Document]:
        """Replies to ``command`` from the workers that answered within ``timeout`` seconds."""
        reply_to = self.transport.reply_address()
        cmd_id = self._broadcast(command, args, destination, reply_to)
        where = f"reply address {reply_to}"
        deadline = time.monotonic() + timeout
        replies: Dict[str, Document] = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for body in self.transport.replies(reply_to, left):
                reply = read_reply(self.signer, body, where)
                if reply and reply.get("id") == cmd_id and isinstance(reply.get("worker"), str):
                    replies[reply["worker"]] = reply
            if destination and set(destination) <= set(replies):
                break
        return sorted(replies.values(), key=lambda r: r["worker"])

    def send(self, command: str, args: Optional[Dict[str, Any]] = None,
             destination: Optional[Sequence[str]] = None) -> None:
        """Broadcast ``command`` and wait for no reply."""
        self._broadcast(command, args, destination, None)

    def revoke(self, ids: Sequence[str], terminate: bool = False, at: Optional[float] = None) -> int:
        """Broadcast a revoke of ``ids``, ``validation.MAX_REVOKE_IDS`` per
        command (a worker refuses a bigger one); return the commands sent."""
        at = time.time() if at is None else at
        step = validation.MAX_REVOKE_IDS
        batches = [list(ids[i:i + step]) for i in range(0, len(ids), step)]
        for batch in batches:
            self.send("revoke", {"ids": batch, "terminate": bool(terminate), "at": at})
        return len(batches)

    def events(self, history: int = 0, poll: float = 1.0) -> Iterator[List[Document]]:
        """Batches of events as they arrive (an empty list every ``poll`` seconds of silence)."""
        self.transport.subscribe(history)
        while True:
            yield self.transport.events(poll)

    def close(self) -> None:
        self.transport.close()
