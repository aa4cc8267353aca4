"""What a transport is: one typed descriptor per technology.

A transport is the package that holds everything greenq does on one
technology (greenq/transports/redis/, amqp/, sqlite/, memory/, or a package of
someone else's).  Its descriptor says which URL schemes it serves, which pip
extra and libraries it needs, its INI section, and where each capability is
implemented.  A capability is a *reference*, ``"package.module:Name"``,
imported on first use only (so ``import greenq`` never imports redis-py or
py-amqp), or a mapping from scheme to reference where schemes differ
(``redis+cluster://``); None where the transport has none: then greenq says
so in a ConfigError, instead of probing with ``getattr``.

Capabilities and what each reference names (called with ``(url, config,
driver)`` unless said):

* ``broker``: a :class:`greenq.brokers.base.Broker`.
* ``results``: a :class:`greenq.backends.base.ResultBackend`, for the result
  backend URL schemes in ``result_schemes`` (``rpc://``) and ``schemes``.
* ``control``: a :class:`greenq.control.base.Transport` (commands, replies,
  events).
* ``leadership``: the periodic scheduler's leadership
  (:class:`greenq.leadership.Leadership`), called with ``(url, config, ttl, driver)``.
* ``coordination``: counted leases, add-once sets and compare-and-set records
  (:class:`greenq.coordination.Coordination`).
* ``queue_listing``: ``f(app) -> (rows, note)`` when the broker cannot list
  every queue itself (RabbitMQ asks its management API).
* ``async_publisher``: a :class:`greenq.aio.base.AsyncPublisher`, called with
  ``(app)``, for broker URLs; without it the asyncio client sends from a
  thread (greenq/aio/threaded.py).
* ``async_results``: a :class:`greenq.aio.base.AsyncResults`, called with
  ``(app)``, for result backend URLs (``result_schemes`` too); without it the
  asyncio client polls from a thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple, Union

from ..setting import Setting

#: ``"package.module:Name"``, or one such reference per URL scheme
Ref = Union[str, Mapping[str, str], None]

CAPABILITIES = ("broker", "results", "control", "leadership", "coordination", "queue_listing",
                "async_publisher", "async_results")
#: the capabilities looked up by result backend URL (``rpc://`` included)
RESULT_CAPABILITIES = ("results", "async_results")


@dataclass(frozen=True)
class Descriptor:
    name: str
    #: the broker URL schemes it serves (lower case, without ``://``)
    schemes: Tuple[str, ...]
    #: ``pip install 'greenq[EXTRA]'`` installs what it needs; None: nothing beyond greenq
    extra: Optional[str] = None
    #: top-level modules of the libraries it needs (warned about when imported before monkey-patching)
    libraries: Tuple[str, ...] = ()
    #: its INI section, and that section's settings
    ini_section: Optional[str] = None
    settings: Mapping[str, Setting] = field(default_factory=dict)
    #: the port a URL without one means, by scheme (the worker's start-up probe); none: no server
    default_ports: Mapping[str, int] = field(default_factory=dict)
    #: URL schemes served only as a result backend (``rpc://``)
    result_schemes: Tuple[str, ...] = ()
    #: the result backend URL when ``result_backend`` is empty: None = the broker URL itself
    derived_results: Optional[str] = None
    #: the broker URL schemes on which it reads and writes Celery's protocol (``celery_queues``)
    celery_schemes: Tuple[str, ...] = ()
    #: a URL's path names a file of this machine (relative: to the working directory), not a server
    file_urls: bool = False
    broker: Ref = None
    results: Ref = None
    control: Ref = None
    leadership: Ref = None
    coordination: Ref = None
    queue_listing: Ref = None
    async_publisher: Ref = None
    async_results: Ref = None

    def ref(self, capability: str, scheme: str) -> Optional[str]:
        """The reference of ``capability`` for URLs of ``scheme``, or None."""
        value: Ref = getattr(self, capability)
        if value is None or isinstance(value, str):
            return value
        return value.get(scheme)
