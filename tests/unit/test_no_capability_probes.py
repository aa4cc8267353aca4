"""No ``getattr``/``hasattr`` probes for optional capabilities on brokers
and result backends (issue 19): a capability is declared, as a flag with a
"not supported" method on the base class (``Broker.prefetch_window``,
``ResultBackend.celery_records``, ``ResultBackend.celery_groups``) or a
reference on the transport's descriptor (greenq/transports/descriptor.py).

The walk looks at every ``getattr(X, ...)`` and ``hasattr(X, ...)`` in
greenq/ whose object ``X`` is spelled like a broker or result backend
(``broker``, ``backend``, ``self._backend()``, ``app.broker``...)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Tuple

import greenq

ROOT = Path(greenq.__file__).parent
NAMES = ("broker", "backend")

#: (file, the object's source, attribute) -> why it is not a capability probe; none today
ALLOWED: Dict[Tuple[str, str, str], str] = {}


def _probes_in(source: str, file: str) -> List[Tuple[str, str, str, int]]:
    found = []
    for node in ast.walk(ast.parse(source, file)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
            continue
        target = ast.unparse(node.args[0])
        attr = node.args[1]
        name = attr.value if isinstance(attr, ast.Constant) and isinstance(attr.value, str) \
            else ast.unparse(attr)
        if any(word in target.lower() for word in NAMES):
            found.append((file, target, name, node.lineno))
    return found


def _probes() -> List[Tuple[str, str, str, int]]:
    return [probe for path in sorted(ROOT.rglob("*.py"))
            for probe in _probes_in(path.read_text(), str(path.relative_to(ROOT)))]


def test_no_getattr_probes_on_brokers_and_backends() -> None:
    unexplained = [f"greenq/{file}:{line}: {target}.{attr}"
                   for file, target, attr, line in _probes() if (file, target, attr) not in ALLOWED]
    assert unexplained == [], ("declare the capability on the base class or the descriptor "
                               "(docs/transports.md) instead of probing: " + ", ".join(unexplained))


def test_the_walk_finds_probes() -> None:
    # the probes this test replaced, so the walk itself is not blind
    source = ("store = getattr(self._backend(), 'store_celery', None)\n"
              "ok = hasattr(app.backend, 'wait_either')\n"
              "f = getattr(self.broker, 'set_prefetch', None)\n"
              "n = getattr(config, 'celery_queues', None)\n")
    assert [(t, a) for _, t, a, _ in _probes_in(source, "x.py")] == [
        ("self._backend()", "store_celery"), ("app.backend", "wait_either"), ("self.broker", "set_prefetch")]
    assert all(key in {(f, t, a) for f, t, a, _ in _probes()} for key in ALLOWED)


def test_the_declared_defaults() -> None:
    from greenq.backends.base import ResultBackend
    from greenq.brokers.base import Broker
    assert Broker.prefetch_window is False
    assert ResultBackend.celery_records is False and ResultBackend.celery_groups is False
