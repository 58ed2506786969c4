"""Long-polling where the SDK needs it: behind a proxy that refuses WebSocket upgrades, and in a
real browser on another origin (CORS). Every other SDK scenario already runs over long-polling
in test_sdk_interop.py."""

from __future__ import annotations

from tests.interop.sdk import run_node
from tests.support import APP_KEY, Cluster


def test_auto_transport_falls_back_to_long_polling_behind_a_proxy_without_upgrades(
    cluster: Cluster,
) -> None:
    result = run_node(
        "interop.mjs", "auto-fallback", RT_A=cluster.a.url, RT_B=cluster.b.url, RT_KEY=APP_KEY
    )
    assert result["state"] == "connected"
    # The SDK did try the WebSocket first, and everything after went over plain HTTP.
    assert result["counts"]["upgrades"] >= 1 and result["counts"]["requests"] >= 3
    received = sorted(
        (message["clientId"], message["data"]["from"]) for message in result["received"]
    )
    assert received == [("behind-proxy", "behind-proxy"), ("outside", "outside")]


def test_a_browser_on_another_origin_uses_long_polling_and_rest_through_cors(
    cluster: Cluster,
) -> None:
    """Headless Chromium, a page on http://localhost:<port> and the gateway on 127.0.0.1:
    every long-poll request is cross-origin and preflighted."""
    result = run_node("browser.mjs", RT_A=cluster.a.url, RT_KEY=APP_KEY, timeout=90)
    assert result["state"] == "connected", result
    assert result["received"] == [{"name": "greeting", "data": {"hello": "browser"}}], result
    assert result["seenFromBrowser"] == [{"from": "browser"}], result
    # REST from the page too: a publish, then history one message per page via Link.
    assert result["restPages"] == [["rest"], ["reply"], ["greeting"]], result
    assert result["failures"] == [], result
