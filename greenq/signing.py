"""HMAC-SHA256 authentication of everything that can make code run.

``[greenq] signing_key`` may list several keys, comma-separated: the first
signs, any of them verifies, so keys rotate without downtime (docs/protocol.md
gives the steps).  Task messages carry their tag in the envelope's ``sig``
field (greenq/message.py); stored records (results, group and chord records,
scheduler records) and control commands are wrapped whole::

    s1:<64 hex digits of HMAC-SHA256(key, domain + "\\0" + payload)>:<payload>

``domain`` names what the payload is (``result``, ``control``, ``schedule``...)
so a record signed for one use is refused in another: a signed control reply
pasted over a result, say.  Without a key, ``wrap`` returns the payload as it
is and ``unwrap`` accepts it (and strips a tag it cannot check): whoever can
write the broker and the result store is trusted then (docs/reliability.md).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import List, Optional, Union

from .exceptions import MessageError

PREFIX = b"s1:"
_TAG_LEN = 64                      # hex digits of SHA-256
_HEADER_LEN = len(PREFIX) + _TAG_LEN + 1


def parse_keys(value: Optional[str]) -> List[bytes]:
    """The keys of a ``signing_key`` setting: comma-separated, blanks dropped."""
    return [k.strip().encode() for k in (value or "").split(",") if k.strip()]


class Signer:
    """Signs with the first key, verifies with any.  False when no key is set."""

    __slots__ = ("keys", "_macs")

    def __init__(self, signing_key: Union[str, List[bytes], None]) -> None:
        self.keys: List[bytes] = (parse_keys(signing_key) if isinstance(signing_key, str) or signing_key is None
                                  else list(signing_key))
        #: each key's HMAC state with the key already absorbed: a tag copies one
        #: (about 40 % fewer instructions than hashing the key again per record)
        self._macs = {key: hmac.new(key, digestmod=hashlib.sha256) for key in self.keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    # -- tags ------------------------------------------------------------------
    def tag(self, data: bytes, key: Optional[bytes] = None) -> str:
        """The hex HMAC of ``data`` under ``key`` (default: the signing key)."""
        mac = self._macs[key or self.keys[0]].copy()
        mac.update(data)
        return mac.hexdigest()

    def verify(self, data: bytes, tag: object) -> bool:
        """True when ``tag`` is the HMAC of ``data`` under any of the keys."""
        if not isinstance(tag, str) or len(tag) != _TAG_LEN:
            return False
        expected = tag.encode("ascii", "replace")
        return any(hmac.compare_digest(expected, self.tag(data, key).encode()) for key in self.keys)

    # -- wrapped records -----------------------------------------------------------
    def wrap(self, domain: str, payload: bytes) -> bytes:
        """``payload`` with its tag in front (unchanged without a key)."""
        if not self.keys:
            return payload
        return PREFIX + self.tag(domain.encode() + b"\0" + payload).encode() + b":" + payload

    def unwrap(self, domain: str, data: bytes, what: str = "record") -> bytes:
        """The payload of a wrapped record, checked.  With a key, a record
        unsigned or signed with no key we know raises MessageError naming
        ``what``; without one, the tag (if any) is stripped unchecked."""
        data = bytes(data)
        signed = data[:len(PREFIX)] == PREFIX and len(data) >= _HEADER_LEN and data[_HEADER_LEN - 1:_HEADER_LEN] == b":"
        if not self.keys:
            return data[_HEADER_LEN:] if signed else data
        if not signed:
            raise MessageError(f"unsigned {what} refused (signing_key is set)")
        payload = data[_HEADER_LEN:]
        tag = data[len(PREFIX):_HEADER_LEN - 1].decode("ascii", "replace")
        if not self.verify(domain.encode() + b"\0" + payload, tag):
            raise MessageError(f"forged {what}: signature does not match")
        return payload
