"""greenq/httpserve.py and the dashboard's pure helpers: request parsing, the
connection ceiling, strict JSON, Host lists, the envelope read from a preview."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from greenq import httpserve
from greenq.dashboard.server import allowed_hosts, envelope_head, finite
from greenq.drivers.threads import ThreadsDriver
from greenq.httpserve import BadRequest, Server, parse, routes_app


def test_parse_waits_for_a_whole_request():
    assert parse(b"GET /healthz HT") is None
    assert parse(b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nab") is None
    req = parse(b"POST /x?a=1 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 4\r\n\r\nabcdEXTRA")
    assert (req.method, req.target, req.headers["host"], req.body) == ("POST", "/x?a=1", "h:1", b"abcd")


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", "400"),
    (b"GET x HTTP/1.1\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", "413"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "411"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (httpserve.MAX_HEAD + 1), "431"),
])
def test_parse_refuses_bad_requests(data, status):
    with pytest.raises(BadRequest) as caught:
        parse(data)
    assert caught.value.status.startswith(status)


def _get(port: int, path: str = "/healthz") -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return resp.status


def test_past_the_ceiling_the_oldest_idle_connection_makes_room():
    server = Server("127.0.0.1:0", routes_app({"/healthz": lambda: (200, "ok", "text/plain")}),
                    ThreadsDriver(), max_connections=5).start()
    port = server.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        assert _get(port) == 200
        held[0].settimeout(2)
        assert held[0].recv(10) == b""            # the oldest was closed to serve the newcomer
    finally:
        for sock in held:
            sock.close()
        server.server_close()


def test_a_failing_route_is_a_500_and_the_server_goes_on():
    def broken():
        raise RuntimeError("boom")
    server = Server("127.0.0.1:0", routes_app({"/broken": broken, "/healthz": lambda: (200, "ok", "text/plain")}),
                    ThreadsDriver()).start()
    port = server.server_address[1]
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            _get(port, "/broken")
        assert caught.value.code == 500
        assert _get(port) == 200
    finally:
        server.server_close()


def test_finite_makes_strict_json():
    value = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": ("x", 2)}
    assert json.dumps(finite(value), allow_nan=False) == '{"a": null, "b": [null, null, 1.5], "c": ["x", 2]}'


def test_allowed_hosts():
    hosts = allowed_hosts("0.0.0.0", 5555, ["dash.example", "other.example:8080"])
    assert {"127.0.0.1:5555", "localhost:5555", "[::1]:5555", "0.0.0.0:5555", "dash.example:5555",
            "dash.example", "other.example:8080"} <= hosts
    assert "localhost" not in hosts and "evil.example:5555" not in hosts
    assert "localhost" in allowed_hosts("127.0.0.1", 80)
    assert "[::1]:5555" in allowed_hosts("::1", 5555)


def test_envelope_head_reads_what_is_whole_in_a_preview():
    body = b'{"v":1,"ct":"json","id":"abc","task":"t.add","args":["' + b"x" * 100
    assert envelope_head(body) == {"v": 1, "ct": "json", "id": "abc", "task": "t.add"}
    assert envelope_head(b'{"v":1,"ta') == {"v": 1}
    assert envelope_head(b"\x80\x81 not json") == {}
    assert envelope_head(b"[1,2]") == {}


def test_an_application_that_raises_is_a_500():
    def app(environ, start):
        raise RuntimeError("boom")
    server = Server("127.0.0.1:0", app, ThreadsDriver()).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            _get(server.server_address[1], "/")
        assert caught.value.code == 500
    finally:
        server.server_close()
