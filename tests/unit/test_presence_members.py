"""The member set that turns KV changes into presence events."""

from __future__ import annotations

from realtime_protocol.frames import PresenceAction
from shared.presence import (
    HEARTBEAT_PATTERN,
    ChannelMembers,
    GatewayLiveness,
    MemberRecord,
    channel_pattern,
    heartbeat_gateway,
    heartbeat_key,
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


def on(gateway: str, connection: str, data: bytes | None = b"1", at: int = 5) -> MemberRecord:
    return MemberRecord("client", connection, data, "", at, gateway)


def test_records_name_their_gateway_and_older_records_none() -> None:
    named = on("g1", "c")
    assert MemberRecord.decode(named.encode()) == named
    # The earlier layout: no gateway field (its key has a TTL instead).
    legacy = b'{"clientId":"x","connectionId":"c","data":null,"encoding":"","timestamp":1}'
    assert MemberRecord.decode(legacy).gateway == ""
    assert b"gateway" not in record("c").encode()


def test_heartbeat_keys_never_collide_with_member_keys() -> None:
    assert heartbeat_gateway(heartbeat_key("abc123")) == "abc123"
    assert heartbeat_gateway(member_key("app", "chat", "conn")) is None
    # No app slug contains '=', so a member key never starts with the heartbeat token.
    assert heartbeat_gateway(member_key("gateway", "x", "y")) is None
    assert heartbeat_gateway("=gateway.") is None
    assert HEARTBEAT_PATTERN == "=gateway.*"


def test_liveness_applies_changes_in_sequence_order_only() -> None:
    liveness = GatewayLiveness()
    assert liveness.is_alive("")  # an earlier-layout record: its own key expires
    assert not liveness.is_alive("g1")
    assert liveness.apply("g1", 5, removed=False) is True
    assert liveness.apply("g1", 8, removed=False) is None  # a heartbeat rewrite: no news
    assert liveness.apply("g1", 7, removed=True) is None  # older than what we know
    assert liveness.is_alive("g1")
    assert liveness.apply("g1", 9, removed=True) is False
    assert liveness.apply("g1", 6, removed=False) is None  # a late old write cannot revive it
    assert not liveness.is_alive("g1")
    assert liveness.apply("g1", 12, removed=False) is True  # a partition healed
    assert liveness.alive == frozenset({"g1"})


def test_liveness_reconcile_with_a_read_of_every_heartbeat() -> None:
    liveness = GatewayLiveness()
    liveness.apply("gone", 3, removed=False)
    liveness.apply("late", 50, removed=False)  # written after the read below covered
    transitions = liveness.reconcile({"new": 20, "mine": 30})
    assert sorted(transitions) == [("gone", False), ("mine", True), ("new", True)]
    assert liveness.alive == frozenset({"new", "mine", "late"})
    assert liveness.reconcile({"new": 20, "mine": 30, "late": 50}) == []


def test_a_gateway_going_parks_its_members_and_its_return_restores_them() -> None:
    members = ChannelMembers("chat")
    members.put(on("g1", "a", b"A"))
    members.put(on("g1", "b", b"B"))
    members.put(on("g2", "c", b"C"))
    leaves = members.gateway_down("g1", 99)
    assert sorted((e.action, e.connection_id, e.data, e.timestamp) for e in leaves) == [
        (PresenceAction.LEAVE, "a", b"A", 99),
        (PresenceAction.LEAVE, "b", b"B", 99),
    ]
    assert list(members.members) == ["c"] and len(members) == 1
    assert members.gateway_down("g1", 100) == []  # no double leave
    # A parked record deleted (a sweep) never comes back; the others do, with their data.
    assert members.remove("b", 101) is None
    enters = members.gateway_up("g1")
    assert [(e.action, e.connection_id, e.data) for e in enters] == [
        (PresenceAction.ENTER, "a", b"A")
    ]
    assert members.gateway_up("g1") == []
    assert sorted(members.members) == ["a", "c"]


def test_records_of_dead_gateways_are_parked_and_moves_are_silent() -> None:
    members = ChannelMembers("chat")
    assert members.put(on("dead", "a"), alive=False) is None  # never visible, no event
    assert len(members) == 0 and list(members.parked) == ["a"]
    # The client re-enters through a live gateway: one enter.
    enter = members.put(on("g2", "a"))
    assert enter is not None and enter.action is PresenceAction.ENTER and not members.parked
    # It moves to another gateway with the same data (a resume elsewhere): no event.
    assert members.put(on("g3", "a", at=9)) is None
    assert members.members["a"].gateway == "g3"
    # A rewrite naming a gateway that is not alive hides it: a leave, with the last data.
    leave = members.put(on("g4", "a", b"2"), alive=False, timestamp=11)
    assert leave is not None and leave.action is PresenceAction.LEAVE
    assert (leave.data, leave.timestamp) == (b"1", 11)
    assert members.snapshot() == []
