"""A Redis command as the bytes redis-py's packer writes for it, made in one
pass: what the broker's publish sends straight to a pooled connection
(``RedisBroker._send_packed``).

Only bytes, str (UTF-8, as the pool's encoder: the broker checks it), int and
float arguments are packed here (str as UTF-8, numbers as their ``repr``,
exactly redis-py's ``Encoder``); for anything else :func:`pack` returns None
and the caller sends the command through redis-py, which packs it or raises
its own DataError.  tests/unit/test_client_path.py compares the two packers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

#: the head of an XADD of a ready message to one stream, by stream (a queue has ten)
_XADD_HEADS: Dict[str, bytes] = {}
_XADD_HEADS_MAX = 4096   # streams remembered (a client sending to ever new queues stays bounded)


def pack(args: Sequence[Any]) -> Optional[bytes]:
    """The RESP array of ``args`` (the command name first, one word), or None."""
    out = [b"*%d\r\n" % len(args)]
    add = out.append
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode()
        elif kind is int or kind is float:
            data = repr(arg).encode()
        else:
            return None
        add(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def xadd(stream: str, body: bytes, message_id: str) -> Optional[bytes]:
    """``pack(("XADD", stream, "*", "b", body, "m", message_id))`` for less."""
    head = _XADD_HEADS.get(stream)
    if head is None:
        key = stream.encode()
        head = b"*7\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$1\r\nb\r\n" % (len(key), key)
        if len(_XADD_HEADS) >= _XADD_HEADS_MAX:
            _XADD_HEADS.clear()
        _XADD_HEADS[stream] = head
    if type(body) is not bytes or type(message_id) is not str:
        return None
    mid = message_id.encode()
    return b"%s$%d\r\n%s\r\n$1\r\nm\r\n$%d\r\n%s\r\n" % (head, len(body), body, len(mid), mid)
