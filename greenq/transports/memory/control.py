"""The control plane of ``memory://``: an in-process bus per URL, for users'
unit tests (a worker and ``greenq.control.client`` in one process)."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Dict, List

from ...events import decode_batch
from ...control.base import Document, Transport

EVENTS_KEPT = 10000


class _Bus:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: List[str] = []                       # bodies
        self.replies: Dict[str, List[str]] = defaultdict(list)
        self.events: List[Document] = []


_BUSES: Dict[Any, _Bus] = defaultdict(_Bus)     # (url, key_prefix) -> its bus


class MemoryTransport(Transport):
    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.bus = _BUSES[(url, config.key_prefix)]
        self._command = len(self.bus.commands)
        self._event = len(self.bus.events)

    def _wait(self, ready: Any, take: Any, timeout: float) -> List[Any]:
        deadline = time.monotonic() + timeout
        bus = self.bus
        while True:
            with bus.lock:
                if ready():
                    return take()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            # sleep in small steps through the driver: a green hub must keep running
            step = min(left, 0.02)
            self.driver.sleep(step) if self.driver is not None else time.sleep(step)

    def listen(self, name: str) -> None:
        self._command = len(self.bus.commands)

    def receive(self, timeout: float) -> List[Any]:
        def take() -> List[str]:
            found, self._command = self.bus.commands[self._command:], len(self.bus.commands)
            return found
        return self._wait(lambda: len(self.bus.commands) > self._command, take, timeout)

    def where(self) -> str:
        return self.url

    def reply(self, reply_to: str, body: str) -> None:
        self.bus.replies[reply_to].append(body)

    def send_events(self, body: str) -> None:
        self.bus.events.extend(decode_batch(body))
        if len(self.bus.events) > 2 * EVENTS_KEPT:
            del self.bus.events[:EVENTS_KEPT]
            self._event = max(0, self._event - EVENTS_KEPT)

    def broadcast(self, body: str) -> None:
        self.bus.commands.append(body)

    def replies(self, reply_to: str, timeout: float) -> List[Any]:
        def take() -> List[str]:
            return self.bus.replies.pop(reply_to, [])
        return self._wait(lambda: bool(self.bus.replies.get(reply_to)), take, timeout)

    def subscribe(self, history: int = 0) -> None:
        self._event = max(0, len(self.bus.events) - history)

    def events(self, timeout: float) -> List[Document]:
        def take() -> List[Document]:
            found, self._event = self.bus.events[self._event:], len(self.bus.events)
            return found
        return self._wait(lambda: len(self.bus.events) > self._event, take, timeout)
