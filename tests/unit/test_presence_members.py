"""The member set that turns KV changes into presence events."""

from __future__ import annotations

from realtime_protocol.frames import PresenceAction
from shared.presence import (
    ChannelMembers,
    MemberRecord,
    channel_pattern,
    member_key,
    parse_member_key,
)


def record(
    connection: str, data: bytes | None = b"1", encoding: str = "", at: int = 5
) -> MemberRecord:
    return MemberRecord("client", connection, data, encoding, at)


def test_keys_round_trip_channel_colons() -> None:
    key = member_key("app", "chat:room:1", "conn-1")
    assert key == "app.chat=room=1.conn-1"
    assert parse_member_key(key) == ("app", "chat:room:1", "conn-1")
    assert channel_pattern("app", "chat:room:1") == "app.chat=room=1.*"


def test_record_round_trip() -> None:
    for value in (record("c", b'{"a":[1]}', "cipher+aes-256-gcm/base64"), record("c", None)):
        assert MemberRecord.decode(value.encode()) == value


def test_transitions() -> None:
    members = ChannelMembers("chat")
    enter = members.put(record("c1"))
    assert enter is not None and enter.action is PresenceAction.ENTER
    assert members.put(record("c1", at=9)) is None  # same data: a refresh, no event
    update = members.put(record("c1", b"2", at=10))
    assert update is not None and update.action is PresenceAction.UPDATE and update.timestamp == 10
    leave = members.remove("c1", 20)
    assert leave is not None and leave.action is PresenceAction.LEAVE
    assert (leave.data, leave.timestamp) == (b"2", 20)  # the last data, at leave time
    assert members.remove("c1", 21) is None
    members.put(record("c2", None))
    members.put(record("c3", b"3", "enc"))
    snapshot = members.snapshot()
    assert [(e.action, e.connection_id, e.data) for e in snapshot] == [
        (PresenceAction.ENTER, "c2", None),
        (PresenceAction.ENTER, "c3", b"3"),
    ]
