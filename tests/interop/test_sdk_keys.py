"""The unmodified SDK against registry keys (issue 12): a key's capability surfaces as the
protocol's codes, and revoking a key ends SDK clients on both gateways, over both transports."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.interop.sdk import run_node
from tests.support import KeyedCluster


@pytest.fixture(scope="module")
def keyed() -> Iterator[KeyedCluster]:
    with KeyedCluster.running() as running:
        yield running


@pytest.mark.parametrize("transport", ["websocket", "long-polling"])
def test_key_capabilities_surface_as_protocol_codes_in_the_sdk(
    keyed: KeyedCluster, transport: str
) -> None:
    key = keyed.create("app1", "--capability", '{"public:*":["subscribe","publish"]}')
    result = run_node(
        "keys.mjs", "capabilities", RT_A=keyed.a.url, RT_KEY=key, RT_TRANSPORT=transport
    )
    assert result["received"] == [{"ok": True}] and result["state"] == "connected"
    assert result["attachDenied"]["code"] == 40302
    assert "40301" in result["historyDenied"]["message"]
    assert "40301" in result["presenceDenied"]["message"]


@pytest.mark.parametrize("transport", ["websocket", "long-polling"])
def test_revoking_a_key_ends_sdk_clients_on_both_gateways(
    keyed: KeyedCluster, transport: str
) -> None:
    key = keyed.create("app1")
    revoke = keyed.keys_command("revoke", key.partition(":")[0])
    result = run_node(
        "keys.mjs",
        "revocation",
        RT_A=keyed.a.url,
        RT_B=keyed.b.url,
        RT_KEY=key,
        RT_TRANSPORT=transport,
        RT_REVOKE_COMMAND=json.dumps(revoke),
        RT_KEYS_SECRET="test-keys-secret",
    )
    for events in result["events"].values():
        reasons = " ".join(reason or "" for _, reason in events)
        assert "40101" in reasons and events[-1][0] == "failed", events
    assert result["elapsedMs"] < 5000 + 2000  # within 5 s of the revoke (plus the CLI's start)
    assert "40101" in result["after"]["message"]
