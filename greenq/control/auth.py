"""Authentication of control commands and of their replies.

Without ``[greenq] signing_key`` a command body is the command's JSON, and
whoever can write to the broker is trusted (docs/reliability.md).  With a key,
the sender signs the whole command document (``id``, ``command``, ``args``,
``destination``, ``reply_to``, ``sent``, ``sender``) with
``greenq.signing.Signer.wrap`` in the ``control`` domain, and every worker:

* refuses a body unsigned, or signed with no key it holds;
* refuses a command whose ``sent`` is more than ``MAX_AGE`` seconds away from
  its own clock (in the past or the future), so a signed command captured on
  the wire cannot be replayed later;
* refuses a command whose ``id`` it has already taken within that window (a
  replay inside it).

A refused command is never acted on and never answered; it is logged with
its command name and sender as the body claims them (unverified) and the
transport it came through.  Replies are signed too, in the ``control-reply``
domain, and an admin process with a key drops an unsigned or forged reply
(a forged reply would mislead whoever reads it).
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any, Optional

from ..exceptions import MessageError
from ..signing import Signer
from .base import Document, dumps, loads

log = logging.getLogger("greenq.control")

COMMAND_DOMAIN = "control"
REPLY_DOMAIN = "control-reply"
#: seconds a signed command's ``sent`` may be from the receiver's clock, either way
MAX_AGE = 60.0
#: command ids remembered against replays (one signed command a second for
#: twice the window would still fit; only key holders can send them)
SEEN_MAX = 10000


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    raise MessageError(f"a body of type {type(body).__name__}, not text")


def claimed(body: Any) -> str:
    """``'<command>' from <sender>`` as an unverified body claims them, for a
    log line about a refused command (``?`` where unreadable)."""
    try:
        data = _as_bytes(body)
    except MessageError:
        return "'?' from ?"
    colon = data.find(b":", 3) if data[:3] == b"s1:" else -1
    doc = loads(data[colon + 1:] if colon > 0 else data)
    if not isinstance(doc, dict):
        return "'?' from ?"

    def short(value: Any) -> str:
        text = value if isinstance(value, str) else "?"
        return ascii(text[:100])[1:-1]
    return f"'{short(doc.get('command'))}' from {short(doc.get('sender'))}"


class CommandReader:
    """The worker's reading of command bodies: the signature, the age and the
    replay checks, then JSON.  ``read`` never raises."""

    def __init__(self, signer: Signer, max_age: float = MAX_AGE) -> None:
        self.signer = signer
        self.max_age = max_age
        self._seen: "OrderedDict[str, float]" = OrderedDict()   # command id -> when it may be forgotten

    def read(self, body: Any, where: str, now: Optional[float] = None) -> Optional[Document]:
        """The command of ``body``, or None (logged when refused for its
        signature, its age or as a replay; a body that is no JSON object is
        dropped silently, as before signing)."""
        if not isinstance(body, (bytes, str)):
            return None                 # a stream entry or row of the wrong shape
        try:
            payload = self.signer.unwrap(COMMAND_DOMAIN, _as_bytes(body), "control command")
        except MessageError as exc:
            log.warning("control: refused %s via %s: %s", claimed(body), where, exc)
            return None
        doc = loads(payload)
        if not isinstance(doc, dict):
            return None
        if self.signer:
            problem = self._stale_or_replayed(doc, time.time() if now is None else now)
            if problem:
                log.warning("control: refused %s via %s: %s", claimed(payload), where, problem)
                return None
        return doc

    def _stale_or_replayed(self, doc: Document, now: float) -> Optional[str]:
        sent, cmd_id = doc.get("sent"), doc.get("id")
        if isinstance(sent, bool) or not isinstance(sent, (int, float)) or not math.isfinite(sent):
            return "signed command without a sent time"
        if abs(now - sent) > self.max_age:
            when = f"{now - sent:.0f} s ago" if sent < now else f"{sent - now:.0f} s ahead of this worker's clock"
            return f"stale signed command: sent {when} (at most {self.max_age:.0f} s either way)"
        if not isinstance(cmd_id, str) or not cmd_id:
            return "signed command without an id"
        seen = self._seen
        while seen and (len(seen) >= SEEN_MAX or next(iter(seen.values())) < now):
            seen.popitem(last=False)
        if cmd_id in seen:
            return f"replayed signed command (id {ascii(cmd_id[:64])} already taken)"
        seen[cmd_id] = now + 2 * self.max_age
        return None


def sign_command(signer: Signer, doc: Document) -> str:
    """The body of a command: its JSON, signed when there is a key."""
    return signer.wrap(COMMAND_DOMAIN, dumps(doc).encode()).decode()


def sign_reply(signer: Signer, reply: Document) -> str:
    """The body of a reply: its JSON, signed when there is a key."""
    return signer.wrap(REPLY_DOMAIN, dumps(reply).encode()).decode()


def read_reply(signer: Signer, body: Any, where: str) -> Optional[Document]:
    """The reply of ``body``, or None: not a JSON object, or (with a key)
    unsigned or forged, which is logged."""
    try:
        payload = signer.unwrap(REPLY_DOMAIN, _as_bytes(body), "control reply")
    except MessageError as exc:
        log.warning("control: dropped a reply via %s: %s", where, exc)
        return None
    doc = loads(payload)
    return doc if isinstance(doc, dict) else None
