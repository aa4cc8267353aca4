"""The AMQP wire format (``amqp_wire``) and the reader of ``amqp_adapter``,
with no server: what greenq packs is byte for byte what py-amqp's own frame
writer packs, and what py-amqp's writer packs parses back into the same
deliveries however the bytes are split into reads and whatever other frames
(heartbeats, other channels, other methods) come between."""
import random
import socket

import pytest

amqp = pytest.importorskip("amqp")

from amqp import spec  # noqa: E402
from amqp.exceptions import UnexpectedFrame  # noqa: E402
from amqp.method_framing import frame_writer  # noqa: E402
from amqp.serialization import decode_properties_basic, dumps  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from greenq.transports.amqp import adapter as amqp_adapter  # noqa: E402
from greenq.transports.amqp.wire import (NOT_MINE, DeliveryReader, FrameParser, ack_frame,  # noqa: E402
                                      content_frames, encode_properties, method_frame, readable_header,
                                      reject_frame, task_properties)
from greenq.exceptions import ConfigError  # noqa: E402

HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class _Sink:
    """What py-amqp's ``frame_writer`` needs of a connection and its transport."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.written = []
        self.write = lambda data: self.written.append(bytes(data))


def py_amqp_writes(frame_max: int, channel: int, method: tuple, args: bytes, msg=None) -> bytes:
    """The bytes py-amqp writes for one method (with content when ``msg``)."""
    sink = _Sink(frame_max)
    frame_writer(sink, sink)(1, channel, method, args, msg)
    return b"".join(sink.written)


def py_amqp_frames(frame_max: int, channel: int, method: tuple, args: bytes, msg=None) -> list:
    """The same, as whole frames."""
    parser = FrameParser(py_amqp_writes(frame_max, channel, method, args, msg))
    return list(iter(parser.next_frame, None))


def deliver(channel: int, consumer_tag: str, tag: int, body: bytes, frame_max: int = 4096,
            redelivered: bool = False, **props) -> list:
    """The frames of a ``basic.deliver``, written by py-amqp."""
    args = dumps("sLbss", (consumer_tag, tag, redelivered, "", "q"))
    return py_amqp_frames(frame_max, channel, spec.Basic.Deliver, args, amqp.Message(body, **props))


# -- packing ----------------------------------------------------------------------

PROPERTIES = [
    {"message_id": "abc", "delivery_mode": 2},
    {"message_id": "abc\u00e9", "delivery_mode": 2, "priority": 9,
     "application_headers": {"greenq-eta": 1.5, "greenq-deliveries": 3, "x": "y"}},
    {"correlation_id": "t1", "delivery_mode": 1, "type": "final"},
    {},
    {"content_type": "application/json", "content_encoding": "utf-8", "reply_to": "r", "expiration": "100",
     "timestamp": 12345, "user_id": "guest", "app_id": "a", "cluster_id": "c", "message_id": "m"},
]


@pytest.mark.parametrize("props", PROPERTIES)
def test_properties_are_packed_as_py_amqp_packs_them(props):
    assert encode_properties(props) == amqp.Message(b"", **props)._serialize_properties()


@pytest.mark.parametrize("priority", [0, 1, 9, 255])
def test_task_properties_are_the_general_encoding(priority):
    props = {"message_id": "m-\u00e9", "delivery_mode": 2, **({"priority": priority} if priority else {})}
    assert task_properties("m-\u00e9", priority) == encode_properties(props)


@pytest.mark.parametrize("frame_max", [4096, 131072])
@pytest.mark.parametrize("size", ["empty", "one", "fits", "one over", "two frames", "many"])
@pytest.mark.parametrize("mandatory", [True, False])
def test_a_publish_is_the_frames_py_amqp_writes(frame_max, size, mandatory):
    chunk = frame_max - 8
    body = bytes(range(256)) * 1200
    body = body[:{"empty": 0, "one": 1, "fits": chunk - 200, "one over": chunk + 1,
                  "two frames": 2 * chunk, "many": len(body)}[size]]
    props = {"message_id": "m", "delivery_mode": 2, "application_headers": {"k": 1}}
    ours = b"".join([method_frame(7, "ex", "key", mandatory)]
                    + content_frames(7, frame_max, body, encode_properties(props)))
    args = dumps("Bssbb", (0, "ex", "key", mandatory, False))
    assert ours == py_amqp_writes(frame_max, 7, spec.Basic.Publish, args, amqp.Message(body, **props))


@pytest.mark.parametrize("tag", [1, 2 ** 40 + 3])
@pytest.mark.parametrize("flag", [True, False])
def test_acks_and_rejects_are_the_frames_py_amqp_writes(tag, flag):
    args = dumps("Lb", (tag, flag))
    assert ack_frame(3, tag, flag) == py_amqp_writes(4096, 3, spec.Basic.Ack, args)
    assert reject_frame(3, tag, flag) == py_amqp_writes(4096, 3, spec.Basic.Reject, args)


def test_a_header_py_amqp_cannot_read_is_rewritten_so_that_it_can():
    good = py_amqp_frames(4096, 1, spec.Basic.Deliver, dumps("sLbss", ("c", 1, False, "", "q")),
                          amqp.Message(b"x", message_id="ok"))[1][2]
    assert readable_header(good) is good
    bad = good[:12] + b"\x00\x80\x02\xff\xfe"   # message_id of two bytes that are not UTF-8
    with pytest.raises(UnicodeDecodeError):
        decode_properties_basic(bad, 12)
    props, _ = decode_properties_basic(readable_header(bad), 12)
    assert props["message_id"] == "\\xff\\xfe"
    assert "not UTF-8" in props["application_headers"]["greenq-bad-properties"]


# -- parsing ----------------------------------------------------------------------

def Content(consumer, delivery_tag, redelivered, properties, problems, body) -> tuple:
    """A delivery as ``read_all`` returns it."""
    return consumer, delivery_tag, redelivered, properties, problems, body


def read_all(data: bytes, reader: DeliveryReader, reads=None):
    """Feed ``data`` in the pieces ``reads`` (sizes; one piece when None) and
    return (deliveries as ``Content`` tuples, frames passed on)."""
    parser, got, passed = FrameParser(), [], []
    pieces = [data] if reads is None else []
    if reads is not None:
        at = 0
        for size in reads:
            pieces.append(data[at:at + size])
            at += size
        pieces.append(data[at:])
    for piece in pieces:
        parser.feed(piece)
        for frame in iter(parser.next_frame, None):
            result = reader.frame(frame)
            if result is NOT_MINE:
                passed.append(frame)
            elif result is not None:
                got.append(Content(result.consumer, result.delivery_tag, result.redelivered,
                                   result.properties, result.problems, result.body))
    assert reader.partial is None and not parser.has_frame()
    return got, passed


def raw(frames) -> bytes:
    return b"".join(bytes([t]) + c.to_bytes(2, "big") + len(p).to_bytes(4, "big") + p + b"\xce"
                    for t, c, p in frames)


def test_bodies_split_across_frames_are_joined_at_every_frame_max_boundary():
    chunk = 4096 - 8
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 1, 5 * chunk + 17]
    frames, want = [], []
    for tag, size in enumerate(sizes, 1):
        body = bytes((tag + i) % 256 for i in range(size))
        msg_frames = deliver(1, "greenq-1", tag, body, priority=tag % 3, message_id=f"m{tag}")
        assert len(msg_frames) == 2 + -(-size // chunk)   # method, header, the body's frames
        frames += msg_frames
        want.append(Content("q1", tag, False, {"priority": tag % 3, "message_id": f"m{tag}"}, [], body))
    got, passed = read_all(raw(frames), DeliveryReader(1, {"greenq-1": "q1"}))
    assert got == want and passed == []


def test_heartbeats_other_channels_and_other_methods_pass_through_mid_delivery():
    ours = deliver(1, "greenq-1", 5, b"a" * 10000, redelivered=True)          # method, header, 3 bodies
    other_channel = deliver(2, "greenq-1", 9, b"b" * 5000)                  # same tag, other channel
    unknown = deliver(1, "someone-else", 6, b"c")                           # not one of our consumers
    cancel_ok = (1, 1, (60).to_bytes(2, "big") + (31).to_bytes(2, "big") + b"\x08greenq-1")
    heartbeat = (8, 0, b"")
    stream = [heartbeat, ours[0], other_channel[0], ours[1], heartbeat, other_channel[1], ours[2],
              other_channel[2], ours[3], heartbeat, other_channel[3], ours[4], cancel_ok] + unknown
    reader = DeliveryReader(1, {"greenq-1": "q1"})
    got, passed = read_all(raw(stream), reader)
    assert got == [Content("q1", 5, True, {}, [], b"a" * 10000)]
    assert passed == [f for f in stream if f not in ours]
    assert FrameParser(HEARTBEAT).next_frame() == heartbeat


def test_a_consumer_added_later_is_read_and_malformed_properties_are_reported_not_raised():
    consumers = {}
    reader = DeliveryReader(1, consumers)
    frames = deliver(1, "greenq-2", 1, b"x", message_id="ok")
    assert read_all(raw(frames), reader)[0] == []   # not ours yet: py-amqp's
    consumers["greenq-2"] = "q2"
    header = frames[1][2][:12] + b"\x00\x80\x02\xff\xfe"
    got, _ = read_all(raw([frames[0], (2, 1, header), frames[2]]), reader)
    [(_, _, _, properties, problems, body)] = got
    assert body == b"x" and properties == {"message_id": "\\xff\\xfe"}
    assert "not UTF-8" in problems[0]


def test_a_malformed_frame_stream_raises_unexpected_frame():
    reader = DeliveryReader(1, {"greenq-1": "q1"})
    frames = deliver(1, "greenq-1", 1, b"xy")
    reader.frame(frames[0])
    with pytest.raises(UnexpectedFrame, match="frame type 1 inside a delivery"):
        reader.frame(frames[0])
    parser = FrameParser(raw([frames[2]])[:-1] + b"\x00")
    with pytest.raises(UnexpectedFrame, match="frame-end 0x00"):
        parser.next_frame()


def _stream(seed: int):
    """A stream of deliveries on channels 1 and 2 with heartbeats between
    frames, and the deliveries of channel 1 in it."""
    rnd = random.Random(seed)
    per_channel = {1: [], 2: []}
    want = []
    for tag in range(1, 7):
        for channel in (1, 2):
            body = rnd.randbytes(rnd.choice([0, 1, 100, 4088, 4089, 9000]))
            per_channel[channel].append(deliver(channel, "greenq-1", tag, body, message_id=f"{channel}-{tag}"))
            if channel == 1:
                want.append(Content("q1", tag, False, {"message_id": f"1-{tag}"}, [], body))
    queues = {c: [f for d in ds for f in d] for c, ds in per_channel.items()}
    frames = []
    while queues[1] or queues[2]:
        channel = rnd.choice([c for c in queues if queues[c]])
        frames.append(queues[channel].pop(0))
        if rnd.random() < 0.2:
            frames.append((8, 0, b""))
    return raw(frames), want


STREAM, WANT = _stream(7)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9000), max_size=40))
def test_any_split_into_reads_parses_to_the_same_deliveries(reads):
    got, passed = read_all(STREAM, DeliveryReader(1, {"greenq-1": "q1"}), reads)
    assert got == WANT
    assert all(channel != 1 for _, channel, _ in passed)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=20000), frame_max=st.integers(min_value=4096, max_value=20000),
       message_id=st.text(max_size=60), priority=st.integers(min_value=0, max_value=255))
def test_what_greenq_packs_parses_back(body, frame_max, message_id, priority):
    args = dumps("sLbss", ("greenq-1", 42, False, "", "q"))
    head = b"\x01\x00\x01" + (4 + len(args)).to_bytes(4, "big") + bytes([0, 60, 0, 60]) + args + b"\xce"
    data = head + b"".join(content_frames(1, frame_max, body, task_properties(message_id, priority)))
    [(_, tag, _, properties, _, got)], _ = read_all(data, DeliveryReader(1, {"greenq-1": "q"}))
    props = {"delivery_mode": 2, "message_id": message_id, **({"priority": priority} if priority else {})}
    assert (got, tag, properties) == (body, 42, props)


# -- the adapter's reader and version check ---------------------------------------

class _Transport:
    def __init__(self, sock, leftover: bytes) -> None:
        self.sock, self._read_buffer, self.connected = sock, leftover, True


def test_socket_frames_read_many_frames_per_recv_and_take_py_amqps_buffer():
    ours, theirs = socket.socketpair()
    try:
        data = raw(deliver(1, "greenq-1", 1, b"z" * 9000)) + HEARTBEAT
        transport = _Transport(ours, data[:5])   # what py-amqp had read already
        frames = amqp_adapter.SocketFrames(transport)
        theirs.sendall(data[5:])
        ours.settimeout(1.0)
        got = [frames.read_frame() for _ in range(6)]
        assert got[-1] == (8, 0, b"") and raw(got) == data
        ours.settimeout(0.05)
        with pytest.raises(socket.timeout):
            frames.read_frame()
        theirs.close()
        with pytest.raises(OSError, match="closed"):
            frames.read_frame()
        assert transport.connected is False
    finally:
        ours.close()


@pytest.mark.parametrize("version,ok", [("5.1.1", True), ("5.4.2", True), ("5.4.10", True),
                                        ("5.1.0", False), ("5.5.0", False), ("6.0.0", False)])
def test_only_the_tested_py_amqp_releases_are_accepted(version, ok):
    if ok:
        amqp_adapter.check_version(version)
    else:
        with pytest.raises(ConfigError, match=r"py-amqp >=5\.1\.1,<5\.5 .*not " + version.replace(".", r"\.")):
            amqp_adapter.check_version(version)


def test_the_installed_py_amqp_is_supported_and_setup_cfg_says_the_same():
    amqp_adapter.check_version(amqp.__version__)
    import os
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "setup.cfg")) as f:
        text = f.read()
    assert text.count(amqp_adapter.REQUIREMENT) == 3 and "amqp>=5.1\n" not in text


def test_an_unsupported_py_amqp_is_refused_when_an_amqp_url_is_used():
    import subprocess
    import sys
    code = ("import amqp; amqp.__version__ = '5.5.0'\n"
            "from greenq import transports\n"
            "transports.load('amqp://localhost/', 'broker', 'broker')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "ConfigError: greenq's RabbitMQ support works with py-amqp >=5.1.1,<5.5" in done.stderr
    assert "not 5.5.0: pip install 'amqp>=5.1.1,<5.5'" in done.stderr
