"""The fault suite's history checker (testing/history_checker.py): a clean history passes,
and each check fails on a hand-made history that breaks exactly its promise."""

from __future__ import annotations

from testing.history_checker import (
    Delivery,
    DeliverySource,
    History,
    Subscription,
    check,
    longest_ack_gap,
)

CHANNEL = "storm:1"


def good_history() -> History:
    """Two publishers, one resend after an error, a subscriber that resumed once, a
    presence watcher that reconnected: every promise kept."""
    history = History()
    history.subscribed("s1", CHANNEL, 0, None, 0.5)
    # p1 sends a1, a2; p2 sends b1, whose first attempt fails and is resent.
    history.attempt("p1", CHANNEL, "a1", 1.0)
    history.attempt("p2", CHANNEL, "b1", 1.1)
    history.attempt("p1", CHANNEL, "a2", 1.2)
    history.ack(CHANNEL, "a1", 1, 1.3)
    history.error(CHANNEL, "b1", 50000, 1.4)
    history.ack(CHANNEL, "a2", 2, 1.5)
    history.attempt("p2", CHANNEL, "b1", 1.6)
    history.ack(CHANNEL, "b1", 3, 1.7)
    # A resend of an already stored message is acked with the same serial.
    history.attempt("p1", CHANNEL, "a2", 1.8)
    history.ack(CHANNEL, "a2", 2, 1.9)
    history.delivered("s1", CHANNEL, 1, "a1", 1.31)
    history.delivered("s1", CHANNEL, 2, "a2", 1.51)
    # s1 drops and resumes after serial 2 on the other gateway: the replay brings 3.
    history.subscribed("s1", CHANNEL, 2, True, 1.75)
    history.delivered("s1", CHANNEL, 3, "b1", 1.74)
    history.stored(CHANNEL, [(1, "a1"), (2, "a2"), (3, "b1")])
    history.presence_event("w1", "room", "enter", "m1", "c1", 1.0)
    history.presence_event("w1", "room", "enter", "m2", "c2", 1.1)
    history.presence_event("w1", "room", "reset", "", "", 1.2)
    history.presence_event("w1", "room", "enter", "m1", "c1", 1.3)
    history.presence_truth("room", {("m1", "c1")})
    return history


def checks_failed(history: History) -> set[str]:
    return {violation.check for violation in check(history).violations}


def test_a_clean_history_passes_with_its_counts() -> None:
    report = check(good_history())
    assert report.ok, report.summary()
    assert (report.acked, report.lost, report.duplicated, report.reordered) == (3, 0, 0, 0)


def test_an_acked_publish_missing_from_history_is_lost() -> None:
    history = good_history()
    history.stored(CHANNEL, [(1, "a1"), (2, "a2")])
    report = check(history)
    assert "lost" in checks_failed(history)
    assert report.lost >= 1


def test_an_ack_naming_another_serial_than_stored_fails() -> None:
    history = good_history()
    history.publishes[(CHANNEL, "b1")].acks[0] = (4, 1.7)
    assert checks_failed(history) == {"ack"}


def test_a_message_id_stored_under_two_serials_is_a_duplicate() -> None:
    history = good_history()
    history.stored(CHANNEL, [(1, "a1"), (2, "a2"), (3, "b1"), (4, "a2")])
    report = check(history)
    assert "duplicate" in checks_failed(history)
    assert report.duplicated == 1


def test_a_serial_delivered_twice_to_one_subscriber_is_a_duplicate() -> None:
    history = good_history()
    history.delivered("s1", CHANNEL, 3, "b1", 1.8)
    assert checks_failed(history) == {"duplicate"}
    assert check(history).duplicated == 1


def test_a_gap_in_serials_fails_contiguity() -> None:
    history = good_history()
    history.stored(CHANNEL, [(1, "a1"), (2, "a2"), (4, "b1")])
    history.publishes[(CHANNEL, "b1")].acks = [(4, 1.7)]
    history.deliveries[("s1", CHANNEL)][-1] = Delivery(4, "b1", 1.74)
    assert checks_failed(history) == {"contiguous"}


def test_serials_must_start_at_one() -> None:
    history = History()
    history.stored(CHANNEL, [(2, "x"), (3, "y")])
    assert checks_failed(history) == {"contiguous"}


def test_a_connection_s_publishes_stored_out_of_send_order_fail() -> None:
    # The known hole of issue 14: a1's store fails, a2 (sent later) is stored first, and
    # a1's resend lands after it.
    history = History()
    history.attempt("p1", CHANNEL, "a1", 1.0)
    history.attempt("p1", CHANNEL, "a2", 1.1)
    history.error(CHANNEL, "a1", 50000, 1.2)
    history.ack(CHANNEL, "a2", 1, 1.3)
    history.attempt("p1", CHANNEL, "a1", 1.4)
    history.ack(CHANNEL, "a1", 2, 1.5)
    history.stored(CHANNEL, [(1, "a2"), (2, "a1")])
    report = check(history)
    assert {v.check for v in report.violations} == {"publish-order"}
    assert report.reordered == 1


def test_order_is_per_publisher_and_channel() -> None:
    # Two publishers interleaving, and one publisher on two channels, are not reorders.
    history = History()
    history.attempt("p1", CHANNEL, "a1", 1.0)
    history.attempt("p2", CHANNEL, "b1", 1.1)
    history.attempt("p1", "other", "c1", 1.2)
    history.ack(CHANNEL, "b1", 1, 1.3)
    history.ack(CHANNEL, "a1", 2, 1.4)
    history.ack("other", "c1", 1, 1.5)
    history.stored(CHANNEL, [(1, "b1"), (2, "a1")])
    history.stored("other", [(1, "c1")])
    assert check(history).ok


def test_deliveries_out_of_serial_order_fail() -> None:
    history = good_history()
    deliveries = history.deliveries[("s1", CHANNEL)]
    deliveries[0], deliveries[1] = deliveries[1], deliveries[0]
    report = check(history)
    assert checks_failed(history) == {"delivery-order"}
    assert report.reordered == 1


def test_a_gap_filled_by_fetch_is_not_a_reorder() -> None:
    history = good_history()
    deliveries = history.deliveries[("s1", CHANNEL)]
    first = deliveries.pop(0)
    history.delivered("s1", CHANNEL, first.serial, first.message_id, 1.9, DeliverySource.FETCH)
    assert check(history).ok


def test_a_subscriber_that_missed_a_message_fails() -> None:
    history = good_history()
    del history.deliveries[("s1", CHANNEL)][1]  # serial 2 never arrived
    report = check(history)
    assert checks_failed(history) == {"lost"}
    assert report.lost == 1


def test_a_subscriber_that_missed_the_first_message_after_subscribing_fails() -> None:
    history = good_history()
    del history.deliveries[("s1", CHANNEL)][0]  # serial 1, sent after the sub was acked
    assert checks_failed(history) == {"lost"}


def test_a_subscriber_that_stopped_short_of_the_newest_serial_fails() -> None:
    history = good_history()
    history.deliveries[("s1", CHANNEL)].pop()
    assert checks_failed(history) == {"lost"}


def test_a_refused_resume_is_reported() -> None:
    history = good_history()
    history.subscriptions[("s1", CHANNEL)][1] = Subscription(2, False, 1.75)
    assert checks_failed(history) == {"resume"}


def test_a_delivery_with_another_message_than_stored_fails() -> None:
    history = good_history()
    history.deliveries[("s1", CHANNEL)][0] = Delivery(1, "not-a1", 1.31)
    assert checks_failed(history) == {"delivery"}


def test_presence_that_did_not_converge_fails() -> None:
    missing = good_history()
    missing.presence_truth("room", {("m1", "c1"), ("m3", "c3")})
    assert checks_failed(missing) == {"presence"}
    stale = good_history()
    stale.presence_event("w1", "room", "enter", "m2", "c2", 1.4)  # a member that is gone
    assert checks_failed(stale) == {"presence"}
    left = good_history()
    left.presence_event("w1", "room", "leave", "m1", "c1", 1.4)  # a leave that was wrong
    assert checks_failed(left) == {"presence"}


def test_disruption_is_the_longest_stretch_without_an_ack() -> None:
    assert longest_ack_gap([1.0, 2.0, 6.5, 7.0], 0.5, 8.0) == 4.5
    assert longest_ack_gap([], 0.0, 3.0) == 3.0
    # Acks outside the window do not count, the window's edges do.
    assert longest_ack_gap([0.1, 5.0], 1.0, 6.0) == 4.0
    report = check(good_history(), storm_start=1.0, storm_end=2.0)
    assert abs(report.disruption_s - 0.3) < 1e-9  # from the window's start to the first ack


def test_a_fresh_sub_after_a_reconnect_is_fine_only_when_nothing_had_arrived() -> None:
    history = History()
    history.subscribed("s1", CHANNEL, 0, None, 0.5)
    # Dropped before any message: the new sub has no cursor to resume from, and misses none.
    history.subscribed("s1", CHANNEL, 0, None, 0.9, sent_at=0.8)
    history.attempt("p1", CHANNEL, "a1", 1.0)
    history.ack(CHANNEL, "a1", 1, 1.1)
    history.delivered("s1", CHANNEL, 1, "a1", 1.05)
    history.stored(CHANNEL, [(1, "a1")])
    assert check(history).ok
    # The same fresh sub after a message had arrived throws the cursor away: reported.
    history.subscribed("s1", CHANNEL, 0, None, 1.3, sent_at=1.2)
    assert checks_failed(history) == {"resume"}
