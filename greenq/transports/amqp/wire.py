"""The AMQP 0-9-1 wire format greenq writes and reads itself, with no I/O.

py-amqp packs and parses one frame at a time through generic machinery;
greenq's hot paths (a ``delay()``, a batch of acks, a consumer reading
thousands of deliveries) do it here instead, in plain functions on bytes:

* packing: the frames of a ``basic.publish`` (method, content header, body
  frames cut at ``frame_max``), ``basic.ack`` and ``basic.reject``, and the
  basic properties of a content header;
* parsing: ``FrameParser`` turns bytes, however they were split into reads,
  into frames; ``DeliveryReader`` turns the frames of one channel into whole
  deliveries for the consumer tags it is given, leaving every other frame
  (heartbeats, other channels, other methods) to the caller.

Nothing here opens, reads or writes a socket, and nothing touches a py-amqp
object: ``amqp_adapter`` feeds these with what it reads and writes what they
pack.  py-amqp's public serialization (``amqp.serialization``) packs the
rarer field types (tables, timestamps) so that both write the same bytes;
tests/unit/test_amqp_wire.py compares the two byte for byte.
"""
from __future__ import annotations

from struct import Struct, pack
from typing import Any, Callable, Dict, List, Optional, Tuple

import amqp
from amqp import spec
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import decode_properties_basic, dumps

from .meta import H_BAD_PROPERTIES, fit_short_string, read_properties

#: frame types (AMQP 0-9-1 section 4.2.3) and the octet that ends every frame
METHOD, HEADER, BODY = 1, 2, 3
FRAME_END = 0xCE

#: a frame as py-amqp's frame handlers take it: (type, channel, payload)
Frame = Tuple[int, int, bytes]

_FRAME = Struct(">BHI")
_CONTENT_HEADER = Struct(">HHQ")
_SIZE_OF_HEADER = Struct(">HxxQ")          # class id, (weight), body size
_SETTLE = Struct(">BHIHHQB")               # a whole ack/reject frame but its end octet
_TAG_BITS = Struct(">QB")                  # basic.deliver: delivery tag, redelivered bit
_PUBLISH_SIG = pack(">HH", *spec.Basic.Publish)
_DELIVER_SIG = pack(">HH", *spec.Basic.Deliver)
_BASIC = spec.Basic.Publish[0]

#: the basic class's properties in the order of the content header: name -> (flag bit, type)
_PROPERTY_BITS = {name: (15 - i, kind) for i, (name, kind) in enumerate(amqp.Message.PROPERTIES)}
_PROPERTY_ORDER = [name for name, _ in amqp.Message.PROPERTIES]


# -- packing --------------------------------------------------------------------

def encode_properties(props: Dict[str, Any]) -> bytes:
    """The property flags and list of a content header, as py-amqp's
    ``GenericContent._serialize_properties`` writes them, without its generic
    machinery for the short strings and octets greenq sends."""
    flags = 0
    fmt = ""
    values = []
    simple = True
    for name in _PROPERTY_ORDER:
        value = props.get(name)
        if value is not None:
            bit, kind = _PROPERTY_BITS[name]
            flags |= 1 << bit
            fmt += kind
            values.append(value)
            if kind != "s" and kind != "o":
                simple = False
    if not simple:
        return pack(">H", flags) + dumps(fmt, values)
    out = [pack(">H", flags)]
    for kind, value in zip(fmt, values):
        if kind == "s":
            if isinstance(value, str):
                value = value.encode("utf-8", "surrogatepass")
            out.append(pack("B", len(value)))
            out.append(value)
        else:
            out.append(pack("B", value))
    return b"".join(out)


def task_properties(message_id: str, priority: int = 0) -> bytes:
    """``encode_properties({"message_id": ..., "delivery_mode": 2, "priority": ...})``,
    the properties of every task message without headers."""
    mid = message_id.encode("utf-8", "surrogatepass")
    if priority:
        return pack(">HBBB", 0x1880, 2, priority, len(mid)) + mid
    return pack(">HBB", 0x1080, 2, len(mid)) + mid


def method_frame(channel_id: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The whole method frame of a ``basic.publish``."""
    method = _PUBLISH_SIG + dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
    return _FRAME.pack(METHOD, channel_id, len(method)) + method + b"\xce"


def content_frames(channel_id: int, frame_max: int, body: bytes, properties: bytes) -> List[bytes]:
    """The header and body frames of a message whose encoded properties are
    ``properties``, bodies cut so that no frame is longer than ``frame_max``."""
    header = _CONTENT_HEADER.pack(_BASIC, 0, len(body)) + properties
    frames = [_FRAME.pack(HEADER, channel_id, len(header)), header, b"\xce"]
    chunk = frame_max - 8
    if 0 < len(body) <= chunk:
        frames += [_FRAME.pack(BODY, channel_id, len(body)), body, b"\xce"]
    elif body:
        for start in range(0, len(body), chunk):
            piece = body[start:start + chunk]
            frames += [_FRAME.pack(BODY, channel_id, len(piece)), piece, b"\xce"]
    return frames


def ack_frame(channel_id: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """The frame of a ``basic.ack``."""
    return _SETTLE.pack(METHOD, channel_id, 13, *spec.Basic.Ack, delivery_tag, multiple) + b"\xce"


def reject_frame(channel_id: int, delivery_tag: int, requeue: bool) -> bytes:
    """The frame of a ``basic.reject``."""
    return _SETTLE.pack(METHOD, channel_id, 13, *spec.Basic.Reject, delivery_tag, requeue) + b"\xce"


def readable_header(payload: bytes) -> bytes:
    """A content header frame's payload that py-amqp can decode: itself when
    py-amqp can already, else the same header with the properties as
    ``amqp_meta.read_properties`` reads them (bad bytes escaped, an unparsable
    header table dropped) and the problems in a ``greenq-bad-properties``
    header.  Without this, one such message in ``greenq.dlq`` would make py-amqp
    raise inside every ``basic_get`` that reaches it (``greenq dlq list``)."""
    try:
        decode_properties_basic(payload, 12)
        return payload
    except Exception:
        pass
    props, problems = read_properties(payload, 12)
    headers = props.get("application_headers")
    headers = dict(headers) if isinstance(headers, dict) else {}
    headers[H_BAD_PROPERTIES] = "; ".join(problems)[:1000]
    props["application_headers"] = headers
    for name, value in props.items():
        if isinstance(value, str):
            props[name] = fit_short_string(value)   # escaping may have made it longer than 255 bytes
    try:
        return payload[:12] + encode_properties(props)
    except Exception:
        return payload[:12] + encode_properties({"application_headers": {
            H_BAD_PROPERTIES: headers[H_BAD_PROPERTIES]}})


# -- parsing ----------------------------------------------------------------------

class FrameParser:
    """Bytes in, frames out: ``feed`` what was read, then take frames with
    ``next_frame`` until it returns None.  A frame is returned only once all
    of it is buffered, so a read may end anywhere.  Raises UnexpectedFrame on
    a frame whose end octet is wrong (the stream cannot be trusted after it)."""

    __slots__ = ("buf", "pos")

    def __init__(self, data: bytes = b"") -> None:
        self.buf = bytearray(data)
        self.pos = 0

    def feed(self, data: bytes) -> None:
        """Append ``data`` (dropping the frames already taken first)."""
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def next_frame(self) -> Optional[Frame]:
        """The next whole frame, or None until more bytes are fed."""
        buf, pos = self.buf, self.pos
        avail = len(buf) - pos
        if avail < 7:
            return None
        frame_type, channel, size = _FRAME.unpack_from(buf, pos)
        if avail < size + 8:
            return None
        end = pos + 7 + size
        if buf[end] != FRAME_END:
            raise UnexpectedFrame(f"received frame-end {buf[end]:#04x}, expected 0xce")
        self.pos = end + 1
        return frame_type, channel, bytes(buf[pos + 7:end])

    def has_frame(self) -> bool:
        """A whole frame is buffered."""
        avail = len(self.buf) - self.pos
        return avail >= 7 and avail >= _FRAME.unpack_from(self.buf, self.pos)[2] + 8


class Content:
    """A delivery read by ``DeliveryReader``: its content frames are still
    to come until ``DeliveryReader.frame`` returns it whole.  A body over the
    reader's limit is not kept: only its first ``keep`` bytes (``truncated``)."""
    __slots__ = ("consumer", "delivery_tag", "redelivered", "properties", "problems", "size", "chunks",
                 "got", "body", "keep")

    def __init__(self, consumer: Any, delivery_tag: int, redelivered: bool) -> None:
        self.consumer = consumer          # what the reader's ``consumers`` maps the consumer tag to
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.properties: Optional[Dict[str, Any]] = None   # as ``amqp_meta.read_properties`` reads them
        self.problems: List[str] = []     # ... and what it found wrong with them
        self.size = 0                     # of the body, from the content header
        self.chunks: List[bytes] = []     # the body frames' payloads so far
        self.got = 0
        self.body = b""                   # once whole (or its first ``keep`` bytes)
        self.keep = 0                     # bytes of the body kept

    @property
    def truncated(self) -> bool:
        """The body was over the reader's limit: ``body`` is only its start."""
        return self.keep < self.size


#: ``DeliveryReader.frame``'s answer for a frame that is not part of one of its deliveries
NOT_MINE = object()


class DeliveryReader:
    """Frames in, deliveries out, for the consumers of one channel.

    ``consumers`` maps a consumer tag to anything (the consumer loop: the
    queue); it is read when a ``basic.deliver`` arrives, so consumers added
    later are seen.  Deliveries for other tags, frames of other channels,
    heartbeats and every other method are ``NOT_MINE``: the caller passes
    them on (to py-amqp).  Properties are read by ``amqp_meta.read_properties``,
    which never raises, so a message with bad metadata is still a delivery.

    ``limit`` (0: none): the content header says how long the body is before
    any body frame arrives; of a body longer than ``limit`` only the first
    ``preview`` bytes are kept, the rest of its frames are read and dropped
    (the server sends them all the same), so memory stays at one frame.
    """

    __slots__ = ("channel_id", "consumers", "partial", "limit", "preview")

    def __init__(self, channel_id: int, consumers: Dict[str, Any], limit: int = 0,
                 preview: int = 4096) -> None:
        self.channel_id = channel_id
        self.consumers = consumers
        self.partial: Optional[Content] = None   # a delivery being read
        self.limit = limit
        self.preview = preview

    def frame(self, frame: Frame) -> Any:
        """Take ``frame``: ``NOT_MINE``, None (taken; the delivery goes on) or
        the completed ``Content``.  Raises UnexpectedFrame when a frame of the
        channel other than a content frame arrives inside a delivery."""
        frame_type, channel, payload = frame
        if channel != self.channel_id:
            return NOT_MINE
        partial = self.partial
        if partial is None:
            if frame_type == METHOD and payload[:4] == _DELIVER_SIG:
                end = 5 + payload[4]
                consumer = self.consumers.get(payload[5:end].decode("utf-8", "surrogatepass"))
                if consumer is not None:
                    tag, bits = _TAG_BITS.unpack_from(payload, end)
                    self.partial = Content(consumer, tag, bool(bits & 1))
                    return None
            return NOT_MINE
        if frame_type == HEADER and partial.properties is None:
            partial.size = size = _SIZE_OF_HEADER.unpack_from(payload, 0)[1]
            partial.keep = min(size, self.preview) if self.limit and size > self.limit else size
            partial.properties, partial.problems = read_properties(payload, 12)
        elif frame_type == BODY and partial.properties is not None:
            if partial.got < partial.keep:
                partial.chunks.append(payload if partial.keep == partial.size else
                                      payload[:partial.keep - partial.got])
            partial.got += len(payload)
        else:
            raise UnexpectedFrame(f"received frame type {frame_type} inside a delivery")
        if partial.got < partial.size:
            return None
        self.partial = None
        chunks = partial.chunks
        partial.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return partial


def rewrite_headers(handler: Callable[[Frame], Any]) -> Callable[[Frame], Any]:
    """``handler`` with every content header passed through ``readable_header`` first."""
    def on_frame(frame: Frame) -> Any:
        if frame[0] == HEADER:
            frame = (HEADER, frame[1], readable_header(frame[2]))
        return handler(frame)
    return on_frame
