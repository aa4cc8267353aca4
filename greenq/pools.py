"""The concurrency pools greenq knows, in one place.  No imports: the worker's
launcher reads this before the process is patched."""

#: gevent is the default; eventlet is legacy but fully supported
POOLS = ("gevent", "eventlet", "threads", "solo")
