"""The shared broker and result backend suites and the chord counting tests,
run on a private Redis Cluster (the fixtures of tests/clusters/conftest.py
replace the integration ones)."""
import pytest

from tests.integration.test_backend_suite import *  # noqa: F401,F403
from tests.integration.test_broker_suite import *  # noqa: F401,F403
from tests.integration.test_chord_counting import *  # noqa: F401,F403

pytestmark = pytest.mark.cluster
