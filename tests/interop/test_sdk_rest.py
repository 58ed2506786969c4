"""The unmodified @foony/realtime 0.16.0 ``Rest`` client against a real two-gateway cluster
(issue 11): publish seen live, history paging through ``PaginatedResult.next()``, presence
reads, token requests, and protocol error codes surfacing in ``RestError``."""

from __future__ import annotations

from typing import Any

import orjson

from tests.interop.sdk import run_node
from tests.support import APP_KEY, Cluster


def scenario(cluster: Cluster, name: str) -> Any:
    return run_node("rest.mjs", name, RT_A=cluster.a.url, RT_B=cluster.b.url, RT_KEY=APP_KEY)


def test_rest_publish_is_seen_live_by_a_websocket_subscriber(cluster: Cluster) -> None:
    result = scenario(cluster, "publish-live")
    single, batch = result["single"], result["batch"]
    assert single["serial"] == 1 and batch["serial"] == 2
    assert result["withId"] == result["again"]  # a resent id: the original serial, not stored
    assert result["withId"]["serial"] == 3
    assert "serial" not in result["ephemeral"]
    received = result["received"]
    assert [(m["name"], m["data"]) for m in received] == [
        ("single", {"n": 1}),
        ("b1", 1),
        ("b2", "two"),
        ("once", 3),
        ("eph", 4),
    ]
    assert all(m["clientId"] == "rest-pub" for m in received)
    assert received[0]["messageId"] == single["messageId"]
    # The SDK expands a batch into <batchId>:<index>.
    assert [m["messageId"] for m in received[1:3]] == [
        f"{batch['messageId']}:0",
        f"{batch['messageId']}:1",
    ]
    # Expanded batch members carry no seq of their own (PROTOCOL.md 3.8).
    assert [m["seq"] for m in received[:4]] == [1, None, None, 3]
    assert abs(result["time"] - result["now"]) < 5_000


def test_history_pages_through_paginated_result(cluster: Cluster) -> None:
    result = scenario(cluster, "history-paging")
    backwards = result["backwards"]
    # limit counts records: the batch (8, 9) is one record of the first page.
    assert [page["data"] for page in backwards] == [[9, 8, 7, 6], [5, 4, 3], [2, 1]]
    assert [page["hasNext"] for page in backwards] == [True, True, False]
    assert backwards[-1]["isLast"]
    forwards = result["forwards"]
    assert [page["data"] for page in forwards] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [page["hasNext"] for page in forwards] == [True, True, False]
    assert [page["data"] for page in result["bounded"]] == [[3, 2], [1]]
    item = result["item"]
    assert item["name"] == "b" and item["data"] == 9 and item["serial"] == 8
    assert isinstance(item["timestamp"], int) and item["id"]


def test_presence_get_with_filters(cluster: Cluster) -> None:
    result = scenario(cluster, "presence-get")
    ann, bob_a, bob_b = result["connectionIds"]
    everyone = result["all"]
    assert sorted(everyone) == sorted(
        [
            ["ann", ann, "present", {"index": 0}],
            ["bob", bob_a, "present", {"index": 1}],
            ["bob", bob_b, "present", {"index": 2}],
        ]
    )
    assert result["allIsLast"] is True
    assert all(isinstance(t, int) for t in result["timestamps"])
    assert sorted(m[1] for m in result["bobs"]) == sorted([bob_a, bob_b])
    assert result["byConnection"] == [["bob", bob_b, "present", {"index": 2}]]
    assert len(result["limited"]) == 1 and result["limited"][0][0] == "bob"
    assert result["nobody"] == []


def test_request_token_then_connect_with_it(cluster: Cluster) -> None:
    result = scenario(cluster, "request-token")
    details = result["details"]
    assert details["keyName"] == APP_KEY.split(":")[0]
    assert details["clientId"] == "token-user"
    assert details["expires"] - details["issued"] == 120_000
    assert orjson.loads(details["capability"]) == {"chat:*": ["subscribe", "publish", "presence"]}
    assert result["state"] == "connected" and result["clientId"] == "token-user"
    assert [(m["name"], m["clientId"]) for m in result["received"]] == [
        ("over-ws", "token-user"),
        ("over-rest", "token-user"),
        ("via-callback", "callback-user"),
    ]
    assert result["published"]["serial"] == 2
    assert result["callbacks"] == 1 and result["callbackPublish"]["serial"] == 3


def test_errors_surface_protocol_codes(cluster: Cluster) -> None:
    result = scenario(cluster, "errors")

    def code(name: str) -> tuple[str, int, int]:
        error = result[name]
        return error["name"], error["code"], error["statusCode"]

    assert code("publishDenied") == ("RestError", 40301, 403)
    assert code("channelDenied") == ("RestError", 40302, 403)
    assert code("historyDenied") == ("RestError", 40301, 403)
    assert code("clientIdMismatch") == ("RestError", 40300, 403)
    assert code("badKey") == ("RestError", 40101, 401)
    assert code("badChannel") == ("RestError", 40001, 400)
    assert "channel" in result["badChannel"]["message"]
    assert result["presenceAllowed"] == []  # subscribe is enough to read presence
