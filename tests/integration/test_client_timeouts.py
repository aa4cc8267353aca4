"""A client's delay() against a broker that is down fails fast, naming the
address (issue 8, item 5): a web request must not hang for 10 s.  "Down" is
a refused port, or a port whose SYNs go unanswered (a listener whose accept
queue is full drops them: what a firewalled or dead host looks like)."""
from __future__ import annotations

import socket
import time

import pytest

from greenq import GreenQ
from greenq.exceptions import GreenQError

pytest.importorskip("redis")
pytest.importorskip("amqp")


@pytest.fixture
def refused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unanswered_port():
    """A port whose SYNs are dropped: a listener with a full accept queue."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):                     # fill the queue (never accepted)
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel answers SYNs beyond the accept queue")
    except OSError:
        pass
    finally:
        probe.close()
    yield port
    for c in fillers:
        c.close()
    listener.close()


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
@pytest.mark.parametrize("kind", ["refused", "unanswered"])
def test_delay_fails_within_the_connect_timeout(scheme, kind, request):
    port = request.getfixturevalue(f"{kind}_port")
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://guest:guest@127.0.0.1:{port}//"
    app = GreenQ("client", broker=url)

    @app.task(name="t.add")
    def add(x, y):
        return x + y
    start = time.monotonic()
    with pytest.raises(GreenQError) as info:
        add.delay(1, 2)
    took = time.monotonic() - start
    assert took < 3.5, f"{scheme} {kind}: delay() took {took:.1f} s"
    assert f"127.0.0.1:{port}" in str(info.value)
    app.close()
