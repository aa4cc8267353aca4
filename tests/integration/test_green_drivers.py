"""The embedded brokers and backends under gevent and eventlet.

Each run is a subprocess patched for the driver before anything else is
imported (this pytest process must stay unpatched): green_roundtrip.py checks
the hub-facing behaviour, then the whole broker and backend suites run for
memory and sqlite with ``GREENQ_TEST_DRIVER`` handing the driver to every
instance.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "integration")
DRIVERS = ["gevent", "eventlet"]

PATCHED_PYTEST = """
import sys
if sys.argv[1] == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def _run(args, driver, timeout):
    # HYPOTHESIS_NO_PLUGINS: hypothesis's plugins pull in trio (a selenium
    # dependency), whose socket module does not import once eventlet patched
    env = dict(os.environ, GREENQ_TEST_DRIVER=driver, PYTHONPATH=ROOT, HYPOTHESIS_NO_PLUGINS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.parametrize("driver", DRIVERS)
def test_embedded_roundtrip_patched(driver, tmp_path):
    pytest.importorskip(driver)
    assert "OK" in _run([os.path.join(HERE, "green_roundtrip.py"), driver, str(tmp_path)], driver, 120)


@pytest.mark.parametrize("driver", DRIVERS)
def test_shared_suites_patched(driver):
    pytest.importorskip(driver)
    _run(["-c", PATCHED_PYTEST, driver, "-q", "-x", "-p", "no:cacheprovider",
          os.path.join(HERE, "test_broker_suite.py"), os.path.join(HERE, "test_backend_suite.py"),
          os.path.join(HERE, "test_chord_counting.py"), os.path.join(HERE, "test_leadership.py"),
          "-k", "memory or sqlite"], driver, 300)


@pytest.mark.parametrize("driver", DRIVERS)
def test_coordination_suite_patched(driver):
    """The coordination suite on every transport (Redis and RabbitMQ too:
    their clients are the ones a patched worker uses), patched."""
    pytest.importorskip(driver)
    _run(["-c", PATCHED_PYTEST, driver, "-q", "-x", "-p", "no:cacheprovider",
          os.path.join(HERE, "test_coordination_suite.py")], driver, 300)
