"""The benchmark's own marker; see docs/performance.md."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bench: runs bin/greenq-bench at smoke-test sizes (seconds; no timing assertions)")
