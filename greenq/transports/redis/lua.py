"""The Lua scripts of the Redis broker (see the key layout in ``broker.py``).

The scripts live in ``scripts/<name>.lua`` beside this module, each opening
with a ``--`` header that says its KEYS, ARGV and reply; they are read once,
when this module is imported, under the names the broker uses (``FETCH``,
``ACK``, ...).  Two pieces are shared: ``claimed.lua`` (before FETCH and
RECLAIM) and ``owned.lua`` (before TRANSFER, ACK and DEAD_LETTER); Lua has no
``require`` inside Redis, so :func:`load` concatenates them.  The header is
not sent: what Redis receives is the code alone, each piece after a newline,
so a script's SHA1 (its EVALSHA name) changes only when its code does.

Each script runs atomically on the server: a message moved from the delayed
set to its stream, claimed, parked or dead-lettered by one script is never seen
half-moved by another consumer.  Scripts return flat arrays (fixed strides) to
keep the Python side's parsing cheap.  Keys are passed in KEYS, except where
a script computes them (dead letters going back to their queue's stream).

Sizes: the reading scripts get the longest entry a worker reads whole (the
sum of its field values' lengths, ``limit``) and the length of a preview.  An
entry over the limit is never returned whole: its body field (or first value)
is cut to the preview and its size is returned beside it, so a 30 MiB entry
costs the worker a few KB (the worker dead-letters it with the preview).
FETCH also gets a byte budget: it stops once the bodies it returns would pass
it (always returning at least one), and parks what it read past that on the
parking consumer with its delivery count unchanged, so those come next in order.

Stream entries have the fields ``b`` (body) and ``m`` (message id); an entry
made from a malformed delayed member has ``b`` (the whole member) and ``e``
(the reason) instead.  The reading scripts never judge an entry: they return
its body and message id, or its whole field list when its shape is not the
usual one, and ``entry_delivery`` in ``broker.py`` checks them (so a bad entry
becomes a dead letter rather than an error after the batch was leased).  A
delayed member that does not parse is not an error either.  A delayed member is
``<8 random chars><priority digit><len(id)>:<id><body>``.
"""
from __future__ import annotations

from importlib.resources import files

#: where the ``.lua`` files are (a folder of this package, shipped as package data)
SCRIPTS = files(__name__.rpartition(".")[0]) / "scripts"


def source(name: str) -> str:
    """The code of ``scripts/<name>.lua`` without its header (the leading
    ``--`` comment lines and the blank lines after them)."""
    lines = (SCRIPTS / f"{name}.lua").read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and (lines[start].startswith("--") or not lines[start].strip()):
        start += 1
    return "".join(lines[start:])


def load(*names: str) -> str:
    """The script made of these files, in order, each after a newline."""
    return "".join("\n" + source(name) for name in names)


DECLARE = load("declare")
PUBLISH = load("publish")
FETCH = load("claimed", "fetch")
RECLAIM = load("claimed", "reclaim")
TRANSFER = load("owned", "transfer")
ACK = load("owned", "ack")
DEAD_LETTER = load("owned", "dead_letter")
DLQ_REQUEUE = load("dlq_requeue")
DLQ_PREVIEW = load("dlq_preview")
STATS = load("stats")
PURGE = load("purge")
#: Redis Cluster only (broker_cluster.py): dead letters back to their queue's streams
DLQ_BACK = load("dlq_back")
#: the result backend's (results.py): store chord members' results, count them, decide the completer
CHORD_DONE = load("chord_done")
#: Celery chords on Redis (celery_results.py): count members as Celery's backend does, release the claim
CELERY_CHORD_PART, CELERY_CHORD_DONE = load("celery_chord_part"), load("celery_chord_done")
