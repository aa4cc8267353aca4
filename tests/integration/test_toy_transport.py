"""A transport from outside greenq plugs in without editing greenq.

The toy transport (tests/fixtures/toy.py, ``toy://``) is registered by its
reference in each of the three ways docs/transports.md gives: ``register()``,
the ``[greenq] transports`` INI key, and an entry point of an installed
distribution.  The shared broker and result backend suites, and chord
counting, then run on it unchanged: their test functions are imported here,
and this module's ``broker_env`` and ``backend_env`` (which win over
conftest.py's for the tests collected here) hand them a toy namespace, once
per way of registering.

Every test starts from the registry greenq fills by itself (``fresh_registry``):
the toy is unknown until the test registers it, so each way is proved on
its own and nothing leaks into the other test modules.
"""
from __future__ import annotations

import uuid

import pytest

from greenq import GreenQ, transports
from greenq import config as gq_config
from greenq.backends import make_backend
from greenq.brokers import Outgoing, make_broker
from greenq.drivers import get_driver
from greenq.exceptions import ConfigError
from greenq.worker.consumer import Worker
from tests.conftest import make_config
from tests.fixtures import toy
from tests.integration import test_backend_suite, test_broker_suite, test_chord_counting
from tests.integration.conftest import Env
from tests.integration.test_chord_counting import backend  # noqa: F401 (its fixture)

REF = "tests.fixtures.toy:TRANSPORT"

# The shared suites, collected again in this module (with this module's fixtures);
# of chord counting, the tests on backend_env (the property test names its own backends).
globals().update({name: fn for suite in (test_broker_suite, test_backend_suite, test_chord_counting)
                  for name, fn in vars(suite).items() if name.startswith("test_") and callable(fn)
                  and name != "test_any_order_of_reports_has_one_completer"})


@pytest.fixture
def fresh_registry(monkeypatch):
    """The transport registry without the toy (as greenq alone fills it), and
    without its INI section; both restored after the test."""
    for table in ("_by_scheme", "_result_schemes", "_loaded"):
        monkeypatch.setattr(transports, table, {key: desc for key, desc in getattr(transports, table).items()
                                                if desc.name != "toy"})
    monkeypatch.setattr(transports, "_entry_points_read", [False])
    monkeypatch.delitem(gq_config.SETTINGS, "toy", raising=False)
    assert transports.lookup("toy://x") is None
    with pytest.raises(ConfigError, match="toy:// is not supported"):
        make_broker("toy://x", make_config())
    yield
    gq_config.SETTINGS.pop("toy", None)    # added by registering (monkeypatch restores what was before)


def ini_file(tmp_path, broker_url: str):
    path = tmp_path / "greenq.ini"
    path.write_text(f"[greenq]\ntransports = {REF}\nbroker_url = {broker_url}\n\n[toy]\npoll = 0.02\n")
    return path


class IniEnv(Env):
    """A toy Env whose every Config is loaded from a greenq.ini naming the
    toy in ``[greenq] transports`` (settings given to ``config()`` override)."""

    def __init__(self, request, tmp_path) -> None:
        super().__init__("toy", request, tmp_path)
        self.file = ini_file(tmp_path, self.broker_url)

    def config(self, **settings):
        cfg = gq_config.load(str(self.file), env={}, quiet=True,
                             overrides={("greenq", key): value for key, value in settings.items()})
        assert (cfg.broker_url, cfg.section("toy")["poll"]) == (self.broker_url, 0.02)
        return cfg


def toy_env(how: str, request, tmp_path) -> Env:
    if how == "register":
        assert transports.register(REF) is toy.TRANSPORT
        env = Env("toy", request, tmp_path)
    else:
        env = IniEnv(request, tmp_path)
        env.config()          # reading the file registers the toy
    assert transports.lookup(env.broker_url) is toy.TRANSPORT
    return env


@pytest.fixture(params=["register", "ini"])
def broker_env(request, tmp_path, fresh_registry):
    env = toy_env(request.param, request, tmp_path)
    assert isinstance(env.broker(), toy.ToyBroker)
    yield env
    env.teardown()


@pytest.fixture(params=["register", "ini"])
def backend_env(request, tmp_path, fresh_registry):
    env = toy_env(request.param, request, tmp_path)
    assert isinstance(env.backend(), toy.ToyResults)
    yield env
    env.teardown()


# -- the three ways of registering, beyond the suites -------------------------------

def test_an_app_configured_by_file_runs_a_task_on_the_toy(tmp_path, fresh_registry):
    """``GreenQ(config_file=...)`` with ``[greenq] transports`` and a toy://
    broker: add.delay(2, 3) -> a burst worker -> get() == 5, results on the toy."""
    app = GreenQ("toyapp", config_file=str(ini_file(tmp_path, f"toy://app-{uuid.uuid4().hex[:8]}")))

    @app.task(name="toy.add")
    def add(x, y):
        return x + y

    result = add.delay(2, 3)
    assert isinstance(app.broker, toy.ToyBroker) and isinstance(app.backend, toy.ToyResults)
    assert [s.ready for s in app.broker.queue_stats(["default"])] == [1]
    assert Worker(app, get_driver("threads"), queues=["default"], concurrency=2, burst=True,
                  fetch_timeout=0.1).run() == 0
    assert result.get(timeout=5) == 5


def test_entry_point_of_an_installed_distribution(tmp_path, monkeypatch, fresh_registry):
    """A distribution declaring ``toy = tests.fixtures.toy:TRANSPORT`` in the
    ``greenq.transports`` group is found the first time a toy:// URL is met."""
    dist = tmp_path / "greenq_toy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: greenq-toy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{transports.ENTRY_POINT_GROUP}]\ntoy = {REF}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(transports, "_entry_points_read", [False])   # read once a process: as if just started
    url = f"toy://ep-{uuid.uuid4().hex[:8]}"
    broker = make_broker(url, make_config())
    assert isinstance(broker, toy.ToyBroker)
    broker.publish(Outgoing("q", b"via entry point", "m-ep"))
    [d] = broker.fetch(["q"], 1, 1.0)
    assert (d.body, d.message_id) == (b"via entry point", "m-ep")
    assert isinstance(make_backend(url, make_config()), toy.ToyResults)


# -- mistakes: what a user or a transport's author is told ----------------------------

def test_an_unknown_scheme_names_the_supported_ones(fresh_registry):
    transports.register(REF)
    with pytest.raises(ConfigError) as broker_error:
        make_broker("nosuch://x", make_config())
    with pytest.raises(ConfigError) as backend_error:
        make_backend("nosuch://x", make_config())
    for error in (broker_error, backend_error):
        message = str(error.value)
        assert "nosuch:// is not supported" in message
        assert all(f"{s}://" in message for s in ("sqlite", "memory", "redis", "toy")), message
    assert "amqp://" in str(broker_error.value) and "rpc://" in str(backend_error.value)


def test_a_descriptor_claiming_a_builtin_scheme_is_refused(fresh_registry):
    thief = transports.Descriptor(name="thief", schemes=("thief", "redis"), broker="tests.fixtures.toy:ToyBroker")
    with pytest.raises(ConfigError, match=r"'thief' claims redis://, which transport 'redis' serves already"):
        transports.register(thief)
    assert transports.lookup("thief://x") is None            # nothing half-registered
    assert transports.lookup("redis://localhost").name == "redis"
    rpc = transports.Descriptor(name="thief", schemes=("thief",), result_schemes=("rpc",))
    with pytest.raises(ConfigError, match=r"claims rpc://, which transport 'amqp' serves already"):
        transports.register(rpc)
    assert transports.register(REF) is transports.register(toy.TRANSPORT)   # the same one twice: fine


@pytest.mark.parametrize("reference, said", [
    ("tests.fixtures.toy", r"not a reference of the form package\.module:NAME"),
    ("tests.fixtures.no_such_module:TRANSPORT", r"cannot import tests\.fixtures\.no_such_module"),
    ("tests.fixtures.toy:NO_SUCH", r"tests\.fixtures\.toy has no NO_SUCH"),
    ("tests.fixtures.toy:ToyBroker", r"is not a greenq\.transports\.Descriptor"),
])
def test_a_bad_reference_is_a_clear_config_error(reference, said, tmp_path, fresh_registry):
    with pytest.raises(ConfigError, match=said):
        transports.register(reference)
    path = tmp_path / "greenq.ini"
    path.write_text(f"[greenq]\ntransports = {reference}\n")
    with pytest.raises(ConfigError, match=said) as error:
        gq_config.load(str(path), env={}, quiet=True)
    assert str(error.value).startswith(f"{path}: [greenq] transports = {reference!r}: ")
    assert transports.lookup("toy://x") is None


# -- the transport's own INI section, wherever the transports are named ---------------

def test_its_section_may_come_before_greenq_in_the_file(tmp_path, fresh_registry):
    path = tmp_path / "greenq.ini"
    path.write_text(f"[toy]\npoll = 0.25\n\n[greenq]\nbroker_url = toy://a\ntransports = {REF}\n")
    cfg = gq_config.load(str(path), env={}, quiet=True)
    assert (cfg.section("toy")["poll"], cfg.origin("toy", "poll")) == (0.25, str(path))
    assert isinstance(make_broker(cfg.broker_url, cfg), toy.ToyBroker)


def test_transports_named_by_the_environment_declare_the_section_of_the_file(tmp_path, fresh_registry):
    path = tmp_path / "greenq.ini"
    path.write_text("[greenq]\nbroker_url = toy://a\n\n[toy]\npoll = 0.25\n")
    cfg = gq_config.load(str(path), env={"GREENQ_TRANSPORTS": REF}, quiet=True)
    assert cfg.section("toy")["poll"] == 0.25
    assert (cfg.transports, cfg.origin("greenq", "transports")) == ([REF], "environment GREENQ_TRANSPORTS")
    assert isinstance(make_broker(cfg.broker_url, cfg), toy.ToyBroker)
