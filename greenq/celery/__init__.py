"""Celery interoperability (CONTRACT section 12, docs/celery.md): Celery's
message protocol 2, decoded and encoded apart from any transport
(``greenq.celery.protocol``).  Each transport's Celery-format consumer lives in
its own home (greenq/transports/redis/celery_broker.py)."""
