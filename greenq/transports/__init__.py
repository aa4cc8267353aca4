"""The transport registry: URL scheme -> :class:`Descriptor`.

greenq's own transports (sqlite, memory, redis, amqp) are registered when
this package is imported; their descriptors import nothing heavy.  Another
package's transport plugs in without editing greenq, by the reference of its
descriptor (``"package.module:NAME"``), in any of three ways:

* ``greenq.transports.register("package.module:NAME")`` (or the descriptor);
* ``[greenq] transports = package.module:NAME, ...`` in the INI file (or
  ``GREENQ_TRANSPORTS``), read by every client and worker of the app;
* an entry point in the ``greenq.transports`` group of its distribution,
  looked up when a URL's scheme is not known otherwise.

A scheme registered twice is an error unless it is the same descriptor.
docs/transports.md tells how to write one.
"""
from __future__ import annotations

import importlib
import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Union
from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .descriptor import CAPABILITIES, RESULT_CAPABILITIES, Descriptor, Ref

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config

BUILTIN = ("greenq.transports.sqlite:TRANSPORT", "greenq.transports.memory:TRANSPORT",
           "greenq.transports.redis:TRANSPORT", "greenq.transports.amqp:TRANSPORT")
ENTRY_POINT_GROUP = "greenq.transports"

_lock = threading.Lock()
_by_scheme: Dict[str, Descriptor] = {}
_result_schemes: Dict[str, Descriptor] = {}
_loaded: Dict[str, Descriptor] = {}          # reference -> descriptor
_entry_points_read = [False]


def scheme_of(url: str) -> str:
    """The URL's scheme in lower case; of a ``;``-separated node list, the first node's."""
    return urlsplit(url.split(";", 1)[0].strip()).scheme.lower()


def resolve(reference: str) -> Any:
    """The object a ``"package.module:Name"`` reference names."""
    module, sep, name = reference.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{reference!r} is not a reference of the form package.module:NAME")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module} (from {reference!r}): {exc}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module} has no {name} (from {reference!r})") from None
    return obj


def register(transport: Union[str, Descriptor]) -> Descriptor:
    """Register a descriptor (or the reference of one) for its schemes."""
    reference = transport if isinstance(transport, str) else None
    if reference is not None and reference in _loaded:
        return _loaded[reference]
    desc = resolve(reference) if reference is not None else transport
    if not isinstance(desc, Descriptor):
        raise ConfigError(f"{reference or transport!r} is not a greenq.transports.Descriptor")
    if not desc.schemes and not desc.result_schemes:
        raise ConfigError(f"transport {desc.name!r} declares no URL scheme")
    with _lock:
        for table, schemes in ((_by_scheme, desc.schemes), (_result_schemes, desc.result_schemes)):
            for scheme in schemes:
                other = table.get(scheme)
                if other is not None and other is not desc:
                    raise ConfigError(f"transport {desc.name!r} claims {scheme}://, which transport "
                                      f"{other.name!r} serves already")
        for scheme in desc.schemes:
            _by_scheme[scheme] = desc
        for scheme in desc.result_schemes:
            _result_schemes[scheme] = desc
        if reference is not None:
            _loaded[reference] = desc
    config = sys.modules.get("greenq.config")     # (it adds every registered section once loaded)
    if desc.settings and desc.ini_section and hasattr(config, "add_section"):
        config.add_section(desc.ini_section, desc.settings)   # type: ignore[union-attr]
    return desc


def registered() -> List[Descriptor]:
    """Every registered transport, once each, in registration order."""
    seen: Dict[int, Descriptor] = {}
    for desc in list(_by_scheme.values()) + list(_result_schemes.values()):
        seen.setdefault(id(desc), desc)
    return list(seen.values())


def _load_entry_points() -> None:
    if _entry_points_read[0]:
        return
    _entry_points_read[0] = True
    from importlib.metadata import entry_points
    for point in entry_points(group=ENTRY_POINT_GROUP):
        register(point.value)


def _use_config(config: Optional["Config"]) -> None:
    for reference in (config.transports if config is not None else ()) or ():
        register(reference)


def lookup(url: str, config: Optional["Config"] = None, *, results: bool = False) -> Optional[Descriptor]:
    """The transport serving ``url`` (as a result backend URL with ``results``), or None."""
    _use_config(config)
    scheme = scheme_of(url)
    tables = (_result_schemes, _by_scheme) if results else (_by_scheme,)
    for attempt in (0, 1):
        for table in tables:
            if scheme in table:
                return table[scheme]
        if attempt == 0:
            _load_entry_points()
    return None


def _known(results: bool) -> Iterable[str]:
    if results:
        return [s for d in registered() for s in d.result_schemes + d.schemes if d.ref("results", s)]
    return [s for d in registered() for s in d.schemes]


def load(url: str, capability: str, what: str, config: Optional["Config"] = None) -> Any:
    """The class (or function) implementing ``capability`` for ``url``;
    ConfigError naming what is supported, or the pip extra that is missing."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown transport capability {capability!r}")
    results = capability in RESULT_CAPABILITIES
    scheme = scheme_of(url)
    desc = lookup(url, config, results=results)
    reference = desc.ref(capability, scheme) if desc is not None else None
    if reference is None or desc is None:
        shown = scheme + "://" if scheme else repr(url)
        if desc is None or capability in ("broker", "results"):
            raise ConfigError(f"{what} URL scheme {shown} is not supported; "
                              f"use one of: {', '.join(s + '://' for s in _known(results))}")
        raise ConfigError(f"{what}: the {desc.name} transport has none for {shown} URLs")
    module = reference.partition(":")[0]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        if desc.extra:
            raise ConfigError(f"{what} {scheme}:// needs the {desc.extra} package: "
                              f"pip install 'greenq[{desc.extra}]' ({exc})") from None
        raise
    return resolve(reference)


def capability_of(url: str, capability: str, config: Optional["Config"] = None) -> Ref:
    """The reference of ``capability`` for ``url``, or None (nothing imported)."""
    desc = lookup(url, config, results=capability in RESULT_CAPABILITIES)
    return desc.ref(capability, scheme_of(url)) if desc is not None else None


def default_port(url_scheme: str) -> Optional[int]:
    desc = _by_scheme.get(url_scheme.lower())
    return desc.default_ports.get(url_scheme.lower()) if desc is not None else None


def libraries() -> List[str]:
    """Top-level modules of every registered transport's libraries."""
    return sorted({lib for d in registered() for lib in d.libraries})


for _reference in BUILTIN:
    register(_reference)

__all__ = ["Descriptor", "register", "registered", "lookup", "load", "resolve", "scheme_of",
           "capability_of", "default_port", "libraries"]
