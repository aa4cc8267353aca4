"""The worker's side of the control plane: one more guarded control greenlet.

Its loop waits up to half a second for commands, answers them
(greenq/control/commands.py), sends a heartbeat every ``HEARTBEAT_INTERVAL``
seconds, and publishes the events waiting in the outbox in batches.  It never
takes a task slot, so a full pool still answers; a broker outage makes it
reconnect with a backoff and never stops the worker.

A worker whose last heartbeat is older than ``OFFLINE_AFTER`` (three missed
heartbeats) is offline.
"""
from __future__ import annotations

import logging
import reprlib
import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Optional

from ..backoff import Backoff
from ..events import TaskEvents
from ..exceptions import ConfigError, describe
from ..signing import Signer
from ..worker.state import DEFAULT_NAME, worker_name
from .auth import CommandReader, sign_reply
from .base import Document, Transport, make_transport
from .commands import COMMANDS, ControlledWorker, worker_info

log = logging.getLogger("greenq.control")

HEARTBEAT_INTERVAL = 2.0
OFFLINE_AFTER = 3 * HEARTBEAT_INTERVAL
RECEIVE_WAIT = 0.5             # longest wait for commands: also the events' batching period
OUTBOX_MAX = 100000            # rows kept while the broker is away (the oldest are dropped)


__all__ = ["ControlAgent", "DEFAULT_NAME", "HEARTBEAT_INTERVAL", "OFFLINE_AFTER", "worker_name"]


class ControlAgent:
    """Answers control commands and sends heartbeats and events for one
    worker.  Built by the composition root (greenq/cli/worker.py) and
    attached to the worker as a service; it sees the worker only as a
    ``ControlledWorker`` (greenq/control/commands.py)."""

    def __init__(self, worker: ControlledWorker, name: str, events: bool = False) -> None:
        self.worker = worker
        self.name = name
        self.events_enabled = events
        self.outbox: Deque[Any] = deque(maxlen=OUTBOX_MAX)    # worker events (dicts), task rows (lists)
        self.task_events: Optional[TaskEvents] = None
        if events:
            driver = worker.driver      # threads: the subscribers run beside the control thread
            self.task_events = TaskEvents(None if driver.green else driver.lock())
            self.task_events.subscribe(worker.hooks)
            worker.codec.sent_sink = self.task_events.sent    # the tasks this worker sends: task-sent
        self._closing = False
        self._handle: Any = None
        self._boot = uuid.uuid4().hex[:8]
        self.signer = Signer(worker.config.signing_key)
        self.reader = CommandReader(self.signer)

    # -- lifetime ----------------------------------------------------------------
    def start(self, spawn: Callable[[str, Callable[[], None]], Any]) -> None:
        """``spawn(name, loop)``: the worker's, for a guarded control loop."""
        self._handle = spawn("control plane", self.loop)

    def stop(self) -> None:
        """Send ``worker-offline`` and end the loop (the worker is stopping)."""
        self._closing = True
        if self._handle is not None:
            self._handle.join(RECEIVE_WAIT + 5.0)

    # -- the loop ----------------------------------------------------------------
    def loop(self) -> None:
        transport: Optional[Transport] = None
        retry = Backoff(0.5, 10.0)
        next_beat = 0.0
        while not self._closing:
            try:
                if transport is None:
                    try:
                        transport = make_transport(self.worker.config.broker_url, self.worker.config,
                                                   self.worker.driver)
                    except ConfigError as exc:     # a broker without a control plane: say so once
                        log.warning("control plane off: %s", exc)
                        return
                    transport.listen(self.name)
                    self.worker.revocations.pushed = True    # revokes now arrive here...
                    self.worker.revocations.resync()         # ...and those missed meanwhile are re-read
                    self._event("worker-online")
                    log.info("control plane: listening as %s", self.name)
                now = time.monotonic()
                wait = max(0.0, min(RECEIVE_WAIT, next_beat - now))
                where = transport.where()
                for body in transport.receive(wait):
                    self.handle(transport, body, where)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
                    self._event("worker-heartbeat")
                self._flush(transport)
                retry.reset()
            except Exception as exc:
                pause = retry.next()
                log.warning("control plane: %s; reconnecting in %.1f s", describe(exc), pause)
                self.worker.revocations.pushed = False       # the backend is polled meanwhile
                if transport is not None:
                    transport.reset()
                    transport = None
                self.worker.driver.sleep(pause)
        if transport is not None:
            self._event("worker-offline")
            try:
                self._flush(transport)
            except Exception as exc:
                log.warning("control plane: could not send worker-offline: %s", describe(exc))
            transport.close()

    def _event(self, kind: str) -> None:
        info = worker_info(self)
        info.update(type=kind, timestamp=time.time_ns() // 1000, freq=HEARTBEAT_INTERVAL, boot=self._boot)
        self.outbox.append(info)

    def _flush(self, transport: Transport) -> None:
        """Publish the worker events and the task rows waiting; what a failed
        call did not send stays for the next."""
        rows = list(self.outbox)
        self.outbox.clear()                 # only this greenlet appends to it
        if self.task_events is not None:
            rows.extend(self.task_events.take())
        transport.publish_rows(self.name, rows, self.outbox)

    def handle(self, transport: Transport, body: Any, where: str) -> None:
        """Read one command body (greenq/control/auth.py: its signature, age
        and id when there is a key), run it and reply where it asks.  Never
        raises: an exception out of here would drop the rest of its batch and
        reconnect."""
        cmd = self.reader.read(body, where)
        if cmd is not None:
            self._answer(transport, cmd)

    def _answer(self, transport: Transport, cmd: Document) -> None:
        """Run one command and reply where it asks.  Whatever a malformed
        command holds ends as an ``error`` reply."""
        destination = cmd.get("destination")
        name = cmd.get("command")
        handler = COMMANDS.get(name) if isinstance(name, str) else None
        reply: Document = {"worker": self.name, "id": cmd.get("id")}
        args = cmd.get("args")
        if args is None:                  # no arguments; [] or "" are refused below
            args = {}
        try:
            if destination is not None and not isinstance(destination, list):
                # (a string would match any worker whose name is a substring of it)
                raise ValueError(f"destination must be a list of worker names, got {reprlib.repr(destination)}")
            if destination and self.name not in destination:
                return
            if handler is None:
                raise ValueError(f"unknown command {name!r}")
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
            reply["ok"] = handler(self, **args)
        except Exception as exc:
            reply["error"] = describe(exc)
        log.info("control: %s%s -> %s", _clip(name), f" {_clip(args)}" if args else "",
                 "ok" if "ok" in reply else reply["error"])
        reply_to = cmd.get("reply_to")
        if reply_to is None:
            return
        if transport.owns_reply(reply_to):
            transport.reply(reply_to, sign_reply(self.signer, reply))
        else:       # never write where the app's admin processes do not listen
            log.warning("control: %s: no reply sent, reply_to %s is not one of this app's reply addresses",
                        _clip(name, 100), _clip(ascii(reply_to), 100))


def _clip(value: Any, size: int = 500) -> str:
    """``str(value)`` cut to ``size`` characters, for the log (a garbled command may be huge)."""
    text = str(value)
    return text if len(text) <= size else text[:size] + "..."
