"""Glue for web frameworks (docs/frameworks.md): ``greenq.contrib.django``
and ``greenq.contrib.flask``.  Neither is imported by greenq itself; each
needs its framework installed (the ``django`` and ``flask`` extras)."""
