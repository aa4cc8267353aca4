"""RabbitMQ's queue listing for ``greenq queues``, through its management API.

AMQP cannot list queues, so on RabbitMQ the broker alone knows only the
configured queues and, for ``held``, what this process holds.  When
RabbitMQ's management API answers (``[amqp] management_url``, by default
``http://BROKER_HOST:15672`` with the broker's user, or
``https://BROKER_HOST:15671`` for an ``amqps://`` broker), every queue of the
vhost is listed with the messages every consumer holds; otherwise the broker's
own figures are shown with a note saying so.  Queues are shown by their
logical names: with a ``key_prefix`` P other than ``greenq``, only the
vhost's ``P.<queue>`` queues are this app's (``Settings.logical``).  The broker's user and password
never travel over plain HTTP from a TLS broker's configuration: an
``http://`` management_url with an ``amqps://`` broker is refused.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from ...brokers.base import QueueStats
from ...config import mask_url


def queue_stats(app: Any) -> Tuple[List[QueueStats], Optional[str]]:
    """Every queue's figures, and a note when they are partial."""
    broker = app.broker
    try:
        url = management_url(app.config.broker_url, app.config.section("amqp")["management_url"])
    except ValueError as exc:
        return broker.queue_stats(), f"{exc}: configured queues only; held counts this process only"
    try:
        listed = rabbitmq_queues(app.config.broker_url, url)
    except (OSError, ValueError) as exc:
        return broker.queue_stats(), (f"RabbitMQ's management API at {mask_url(url)} did not answer "
                                      f"({exc}): configured queues only; held counts this process only")
    from .common import Settings   # (only for RabbitMQ: it imports py-amqp)
    names = Settings.from_config(app.config)
    # the vhost's task queues of this app, by logical name (not greenq's plumbing,
    # RabbitMQ's amq.* or, under a key_prefix of its own, another app's queues)
    mine = {logical: counts for logical, counts in
            ((names.logical(name), counts) for name, counts in listed.items()) if logical is not None}
    queues = sorted(mine)
    queues += [q for q in app.config.worker["queues"] if q not in mine]
    rows = broker.queue_stats(queues) if queues else []
    for row in rows:
        row.ready, row.held = mine.get(row.name, (row.ready, row.held))
    return rows, None


#: the management API's default scheme and port, by the broker URL's scheme
MANAGEMENT_DEFAULTS = {"amqps": ("https", 15671), "amqp": ("http", 15672), "pyamqp": ("http", 15672)}


def management_url(broker_url: str, configured: str) -> str:
    """``[amqp] management_url``, else the broker's host with the broker's
    user: ``https://HOST:15671`` for ``amqps://`` (RabbitMQ's TLS management
    port), ``http://HOST:15672`` otherwise.  ValueError when credentials would
    cross plain HTTP although the broker is reached over TLS (an ``http://``
    management_url with an ``amqps://`` broker)."""
    parts = urllib.parse.urlsplit(broker_url.split(";")[0].strip())
    scheme = parts.scheme.lower()
    if configured:
        if scheme == "amqps" and urllib.parse.urlsplit(configured).scheme.lower() != "https":
            raise ValueError(f"[amqp] management_url = {mask_url(configured)} is not https:// while the "
                             f"broker is amqps://: greenq will not send the broker's password over plain "
                             f"HTTP; use an https:// management_url")
        return configured
    web, port = MANAGEMENT_DEFAULTS.get(scheme, ("http", 15672))
    auth = ""
    if parts.username is not None:
        auth = parts.username + (f":{parts.password}" if parts.password is not None else "") + "@"
    host = parts.hostname or "localhost"
    return f"{web}://{auth}{host}:{port}"


def rabbitmq_queues(broker_url: str, api: str, timeout: float = 5.0) -> Dict[str, Tuple[int, int]]:
    """``{queue: (ready, held by consumers)}`` of the broker URL's vhost, from the management API."""
    parts = urllib.parse.urlsplit(broker_url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = urllib.parse.unquote(path) or "/"
    api_parts = urllib.parse.urlsplit(api)
    user = urllib.parse.unquote(api_parts.username or parts.username or "guest")
    password = urllib.parse.unquote(api_parts.password or parts.password or "guest")
    netloc = api_parts.netloc.rpartition("@")[2]
    if (api_parts.scheme or "http").lower() not in ("http", "https"):
        raise ValueError(f"management API {mask_url(api)}: expected an http:// or https:// URL")
    if parts.scheme.lower() == "amqps" and api_parts.scheme.lower() != "https":
        raise ValueError("the broker is amqps:// and the management API is not https://: "
                         "credentials are not sent over plain HTTP")
    endpoint = urllib.parse.urlunsplit((api_parts.scheme or "http", netloc,
                                        api_parts.path.rstrip("/") + "/api/queues/"
                                        + urllib.parse.quote(vhost, safe=""), "", ""))
    request = urllib.request.Request(endpoint, headers={
        "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            rows = json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code}") from None
    return {row["name"]: (int(row.get("messages_ready", 0)), int(row.get("messages_unacknowledged", 0)))
            for row in rows}
