"""The Redis Lua scripts as read from greenq/transports/redis/scripts/*.lua:
the text sent to Redis (and so each script's EVALSHA name) is what it was when
the scripts were Python strings, and each .lua file opens with its header."""
from __future__ import annotations

import hashlib

from greenq.transports.redis import lua

#: SHA1 of each script as sent to Redis, from when the scripts were strings in lua.py
#: (a change here means the code of a script changed: update the figure on purpose)
SHA1 = {
    "DECLARE": "64906c147ed9c4422696aac805178e1a32fc8751",
    "PUBLISH": "58be072da0df43eea9c4392c80e712a4ef10884a",
    "FETCH": "5d369c7f98fddd09b6376a422176dc9feed1ab12",
    "RECLAIM": "905f463bc0daa02771c5fd2e925a7584d3eb0884",
    "TRANSFER": "88b3d24fee4d7ad3cb8c4a3e811ede492128a196",
    "ACK": "cf343cc3440611b437775711780c3d7a3ffe737b",
    "DEAD_LETTER": "19f8903d2b7c81c4a24b2582d7caf69e13180306",
    "DLQ_REQUEUE": "48d2664b9930bbba1f9236915b37348ad2fe8df9",
    "DLQ_PREVIEW": "5c89fb6ab09deebc6f1b588e5d3d3f9d360abdd0",
    "STATS": "3459d1c3ef2dfd8377e393707e062b4bc3f1b45e",   # + due delayed as ready, the oldest ready age
    "PURGE": "193f0dabcebb3b8c5c1d77e8ca4122df7b6a90f9",
    "DLQ_BACK": "a83d102d48e089372a121377cfd4aa4d644e9c43",
    #: added with the chord's one-round-trip completion (results.py chord_members_done)
    "CHORD_DONE": "acaff5e4ea51b90789dbef17b62f51185009fd34",
}


def test_scripts_sent_to_redis_are_unchanged_byte_for_byte() -> None:
    got = {name: hashlib.sha1(getattr(lua, name).encode()).hexdigest() for name in SHA1}
    assert got == SHA1


def test_headers_are_not_sent_and_shared_pieces_come_first() -> None:
    assert "--" not in lua.ACK.split("\n")[1]            # the header of owned.lua is dropped
    assert lua.FETCH.startswith("\nlocal function claimed_fields(")
    assert lua.FETCH.count("local function split(") == 1
    assert lua.ACK.startswith("\nlocal function owned(")
    assert lua.load("owned", "ack") == lua.ACK


def test_every_lua_file_has_a_header_and_every_script_has_its_files() -> None:
    names = sorted(p.name[:-4] for p in lua.SCRIPTS.iterdir() if p.name.endswith(".lua"))
    for name in names:
        assert (lua.SCRIPTS / f"{name}.lua").read_text(encoding="utf-8").startswith("-- "), name
        assert lua.source(name) and not lua.source(name).startswith("--"), name
    used = {"claimed", "owned", *(name.lower() for name in SHA1)}
    assert used <= set(names)          # other modules may add scripts of their own
