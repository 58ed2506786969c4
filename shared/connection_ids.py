"""Connection ids: unguessable, and bound to the app they were issued in.

A connection id is ``<random>.<tag>`` minus the dot, i.e. 16 characters of randomness (96
bits, URL-safe base64) followed by an 8-character tag derived from the app and the random
part. A ``resumeConnectionId`` is honoured only when its tag matches the resuming client's
app (and, further on, its clientId), so an id can never move to another app, even one an
attacker learnt. Ids are also valid KV key and NATS subject tokens (presence keys use them).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

__all__ = ["belongs_to_app", "new_connection_id"]

_RANDOM_BYTES = 12  # 16 base64 characters
_TAG_CHARACTERS = 8
_SHAPE = re.compile(r"[A-Za-z0-9_\-]{24}")


def _tag(app: str, random_part: str) -> str:
    digest = hashlib.blake2b(
        f"{app}\0{random_part}".encode(), digest_size=6, person=b"rt-connid"
    ).digest()
    return base64.urlsafe_b64encode(digest).decode()[:_TAG_CHARACTERS]


def new_connection_id(app: str) -> str:
    """A fresh connection id for a connection of ``app``."""
    random_part = secrets.token_urlsafe(_RANDOM_BYTES)
    return random_part + _tag(app, random_part)


def belongs_to_app(connection_id: str, app: str) -> bool:
    """True when ``connection_id`` is well formed and was issued in ``app``."""
    if not _SHAPE.fullmatch(connection_id):
        return False
    random_part, tag = connection_id[:-_TAG_CHARACTERS], connection_id[-_TAG_CHARACTERS:]
    return secrets.compare_digest(tag, _tag(app, random_part))
