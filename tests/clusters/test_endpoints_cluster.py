"""The dead-letter preview test (tests/integration/test_endpoints_dlq_preview.py)
on a private Redis Cluster: each queue's dead stream cut by the script in its slot."""
import pytest

from tests.integration.test_endpoints_dlq_preview import *  # noqa: F401,F403

pytestmark = pytest.mark.cluster
