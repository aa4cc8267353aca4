"""A real RabbitMQ restart, on a private node this test starts and stops itself
(its own name, ports and data directory), never the shared server.

Skipped where ``rabbitmq-server`` is not installed locally (it is a server
binary, not a service this suite requires).  About 15 s.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from greenq.brokers import Outgoing, make_broker
from tests.conftest import RUN_ID, make_config

pytestmark = pytest.mark.amqp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self) -> None:
        self.name = f"gqtest-{RUN_ID}-{uuid.uuid4().hex[:4]}@localhost"
        self.port = free_port()
        # not under pytest's tmp_path (mode 700): the server may run as the rabbitmq user
        self.base = base = Path(tempfile.mkdtemp(prefix="greenq-rabbit-"))
        os.chmod(base, 0o777)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (base / "enabled_plugins").write_text("[].\n")
        self.env = dict(os.environ, RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_DIST_PORT=str(free_port()), RABBITMQ_CONFIG_FILE=str(base / "rabbitmq"),
                        RABBITMQ_MNESIA_BASE=str(base / "mnesia"), RABBITMQ_LOG_BASE=str(base / "log"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"))
        self.proc = subprocess.Popen(["rabbitmq-server"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while self.ctl("await_startup", "-t", "5").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.skip("a private RabbitMQ node did not start here")
            time.sleep(0.5)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["rabbitmqctl", "-q", "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        self.ctl("stop")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def node():
    if not (shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl")):
        pytest.skip("rabbitmq-server is not installed here")
    n = Node()
    yield n
    n.stop()


def test_restart_reconnects_and_loses_nothing(node):
    config = make_config(broker_url=node.url)
    client, consumer = make_broker(node.url, config), make_broker(node.url, config)
    try:
        sent = [f"m{i}" for i in range(30)]
        client.publish_many([Outgoing("restart", b"x", m, eta=None) for m in sent])
        client.publish(Outgoing("restart", b"x", "delayed", eta=time.time() + 4))
        held = []
        while len(held) < 5:
            held += consumer.fetch(["restart"], 5, 1.0)
        assert node.ctl("stop_app").returncode == 0
        assert consumer.fetch(["restart"], 10, 0.5) == [] and not consumer.healthy
        assert node.ctl("start_app").returncode == 0
        consumer.ack(held)   # acks of the dead connection: dropped
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 31 and time.monotonic() < deadline:
            batch = consumer.fetch(["restart"], 100, 0.5)
            consumer.ack(batch)
            got += batch
        assert sorted(d.message_id for d in got) == sorted(sent + ["delayed"])
        assert consumer.healthy
        client.publish(Outgoing("restart", b"x", "after"))   # the client's pool reconnects too
        assert [d.message_id for d in consumer.fetch(["restart"], 10, 5.0)] == ["after"]
    finally:
        consumer.close()
        client.close()
