"""A recorder of everything the fault suite's clients did and saw, and the checks run on it
afterwards (issue 14). Pure: no I/O, no clock; every event carries the time its client saw
it, so a history can be written by hand in a unit test and fed to the same checks.

What is recorded:

- publishes: each attempt (publisher, channel, messageId, time), each ``ack`` (serial), each
  ``err`` (code). A publisher is one logical SDK client: its reconnects and fail-overs to
  another gateway keep its name, and a resend keeps the messageId, as the SDKs do;
- subscriptions: each ``sub`` a subscriber's ack answered (the cursor it sent, ``resumed``),
  and each message it got (serial, messageId, and how: live or replay, or a gap ``fetch``);
- the channel's history as stored, read after the run;
- presence: each watcher's events and resets (a re-``presSub`` after a reconnect rebuilds the
  view from its snapshot), and the membership that is true at the end.

What is checked (``check``): no acked publish missing from history or from a subscriber that
stayed subscribed or resumed; acks agree with history; no duplicate (one messageId under two
serials, one serial delivered twice to a subscriber); serials contiguous from 1; each
publisher's publishes stored in the order first sent, per channel; each subscriber's
deliveries in serial order; every presence watcher's view equal to the true membership.
"""

from __future__ import annotations

import enum
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = [
    "Delivery",
    "DeliverySource",
    "History",
    "PresenceEvent",
    "Publish",
    "Report",
    "Subscription",
    "Violation",
    "check",
    "longest_ack_gap",
]


class DeliverySource(enum.Enum):
    """How a message reached a subscriber."""

    LIVE = "live"  # a live message, or a resume replay (both arrive in serial order)
    FETCH = "fetch"  # a gap fill, which arrives after later serials by design


@dataclass
class Publish:
    """One logical publish: a messageId and every attempt to store it."""

    publisher: str
    channel: str
    message_id: str
    first_sent: float
    attempts: int = 1
    acks: list[tuple[int, float]] = field(default_factory=list)  # (serial, time)
    errors: list[tuple[int, float]] = field(default_factory=list)  # (code, time)

    @property
    def acked(self) -> bool:
        """True when at least one attempt was acknowledged."""
        return bool(self.acks)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message a subscriber received."""

    serial: int
    message_id: str
    at: float
    source: DeliverySource = DeliverySource.LIVE


@dataclass(frozen=True, slots=True)
class Subscription:
    """One acknowledged ``sub``: the cursor sent (0: none), the ack's ``resumed``, when the
    ack came and when the ``sub`` was sent (``at`` when unknown)."""

    after_serial: int
    resumed: bool | None
    at: float
    sent_at: float | None = None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """One ``presEvt`` a watcher got; ``action`` is ``enter``, ``update`` or ``leave``, or
    ``reset`` when the watcher cleared its view to rebuild it from a new snapshot."""

    action: str
    client_id: str
    connection_id: str
    at: float


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken promise: which check, and what exactly."""

    check: str
    detail: str


@dataclass
class Report:
    """The outcome of ``check``: counts for the fault table and every violation."""

    acked: int
    lost: int
    duplicated: int
    reordered: int
    disruption_s: float
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        """True when no promise was broken."""
        return not self.violations

    def summary(self, limit: int = 20) -> str:
        """The counts and the first ``limit`` violations, for an assertion message."""
        lines = [
            f"acked={self.acked} lost={self.lost} duplicated={self.duplicated} "
            f"reordered={self.reordered} disruption={self.disruption_s:.2f}s "
            f"violations={len(self.violations)}"
        ]
        lines += [f"  {v.check}: {v.detail}" for v in self.violations[:limit]]
        return "\n".join(lines)


class History:
    """Everything the clients of one run did and saw. Clients call the ``record`` methods;
    the test calls ``stored`` and ``presence_truth`` at the end, then ``check``."""

    def __init__(self) -> None:
        self.publishes: dict[tuple[str, str], Publish] = {}  # by (channel, messageId)
        self.subscriptions: dict[tuple[str, str], list[Subscription]] = defaultdict(list)
        self.deliveries: dict[tuple[str, str], list[Delivery]] = defaultdict(list)
        self.history: dict[str, list[tuple[int, str]]] = {}  # channel -> (serial, messageId)
        self.presence: dict[tuple[str, str], list[PresenceEvent]] = defaultdict(list)
        self.truth: dict[str, set[tuple[str, str]]] = {}

    # ---- publishes ----

    def attempt(self, publisher: str, channel: str, message_id: str, at: float) -> None:
        """A publish was sent (first time or resend, same messageId)."""
        publish = self.publishes.get((channel, message_id))
        if publish is None:
            self.publishes[(channel, message_id)] = Publish(publisher, channel, message_id, at)
        else:
            publish.attempts += 1

    def ack(self, channel: str, message_id: str, serial: int, at: float) -> None:
        """An attempt was acknowledged with ``serial``."""
        self.publishes[(channel, message_id)].acks.append((serial, at))

    def error(self, channel: str, message_id: str, code: int, at: float) -> None:
        """An attempt was answered with ``err`` ``code``."""
        self.publishes[(channel, message_id)].errors.append((code, at))

    # ---- subscriptions ----

    def subscribed(
        self,
        subscriber: str,
        channel: str,
        after_serial: int,
        resumed: bool | None,
        at: float,
        sent_at: float | None = None,
    ) -> None:
        """A ``sub`` (with cursor ``after_serial``, 0 for none) was acknowledged."""
        self.subscriptions[(subscriber, channel)].append(
            Subscription(after_serial, resumed, at, sent_at)
        )

    def delivered(
        self,
        subscriber: str,
        channel: str,
        serial: int,
        message_id: str,
        at: float,
        source: DeliverySource = DeliverySource.LIVE,
    ) -> None:
        """A message reached a subscriber."""
        self.deliveries[(subscriber, channel)].append(Delivery(serial, message_id, at, source))

    # ---- the end of the run ----

    def stored(self, channel: str, messages: list[tuple[int, str]]) -> None:
        """The channel's whole history, read after the run: (serial, messageId) pairs."""
        self.history[channel] = list(messages)

    def presence_event(
        self,
        watcher: str,
        channel: str,
        action: str,
        client_id: str,
        connection_id: str,
        at: float,
    ) -> None:
        """A presence watcher got an event (or ``reset`` its view before a new snapshot)."""
        self.presence[(watcher, channel)].append(
            PresenceEvent(action, client_id, connection_id, at)
        )

    def presence_truth(self, channel: str, members: set[tuple[str, str]]) -> None:
        """Who is really present on ``channel`` at the end: (clientId, connectionId)."""
        self.truth[channel] = set(members)

    # ---- derived ----

    def acked_publishes(self) -> list[Publish]:
        """Every publish with at least one ack."""
        return [p for p in self.publishes.values() if p.acked]

    def ack_times(self) -> list[float]:
        """The time of every ack, sorted."""
        return sorted(at for p in self.publishes.values() for _, at in p.acks)


def presence_view(events: list[PresenceEvent]) -> set[tuple[str, str]]:
    """The members a watcher believes present after ``events``."""
    view: dict[str, str] = {}
    for event in events:
        if event.action == "reset":
            view.clear()
        elif event.action == "leave":
            view.pop(event.connection_id, None)
        else:
            view[event.connection_id] = event.client_id
    return {(client_id, connection_id) for connection_id, client_id in view.items()}


def longest_ack_gap(ack_times: list[float], start: float, end: float) -> float:
    """The longest stretch of ``[start, end]`` with no ack: the publish disruption."""
    points = [start, *sorted(t for t in ack_times if start <= t <= end), end]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def _check_history(history: History, violations: list[Violation]) -> tuple[int, dict[str, int]]:
    """Serials contiguous from 1, no messageId stored twice. Returns the number of
    duplicates and, per channel, the newest serial."""
    duplicated = 0
    newest: dict[str, int] = {}
    for channel, stored in sorted(history.history.items()):
        serials = [serial for serial, _ in stored]
        newest[channel] = max(serials, default=0)
        if serials != list(range(1, len(serials) + 1)):
            seen = set(serials)
            missing = [s for s in range(1, max(serials, default=0) + 1) if s not in seen]
            repeated = len(serials) - len(seen)
            violations.append(
                Violation(
                    "contiguous",
                    f"{channel}: serials not 1..{len(serials)} (missing {missing[:10]}, "
                    f"repeated {repeated}, out of order "
                    f"{serials != sorted(serials)})",
                )
            )
        by_id: dict[str, list[int]] = defaultdict(list)
        for serial, message_id in stored:
            by_id[message_id].append(serial)
        for message_id, under in sorted(by_id.items()):
            if len(under) > 1:
                duplicated += len(under) - 1
                violations.append(
                    Violation("duplicate", f"{channel}: {message_id} stored as serials {under}")
                )
    return duplicated, newest


def _check_acks(history: History, violations: list[Violation]) -> int:
    """Every acked publish is stored, under the serial its acks named. Returns how many
    acked publishes are missing (lost)."""
    lost = 0
    stored_serials: dict[tuple[str, str], set[int]] = defaultdict(set)
    for channel, stored in history.history.items():
        for serial, message_id in stored:
            stored_serials[(channel, message_id)].add(serial)
    for publish in history.acked_publishes():
        serials = {serial for serial, _ in publish.acks}
        if publish.channel not in history.history:
            violations.append(Violation("lost", f"{publish.channel}: history was never read"))
            lost += 1
            continue
        found = stored_serials.get((publish.channel, publish.message_id), set())
        if not found:
            lost += 1
            violations.append(
                Violation(
                    "lost",
                    f"{publish.channel}: {publish.message_id} acked as {sorted(serials)} "
                    "but not in history",
                )
            )
        elif len(serials) > 1 or serials != found:
            violations.append(
                Violation(
                    "ack",
                    f"{publish.channel}: {publish.message_id} acked as {sorted(serials)}, "
                    f"stored as {sorted(found)}",
                )
            )
    return lost


def _check_publish_order(history: History, violations: list[Violation]) -> int:
    """Per publisher and channel, stored serials follow the order of first sends. Returns
    the number of publishes stored before one sent earlier."""
    serial_of: dict[tuple[str, str], int] = {}
    for channel, stored in history.history.items():
        for serial, message_id in stored:
            serial_of.setdefault((channel, message_id), serial)
    streams: dict[tuple[str, str], list[Publish]] = defaultdict(list)
    for publish in history.publishes.values():
        streams[(publish.publisher, publish.channel)].append(publish)
    reordered = 0
    for (publisher, channel), publishes in sorted(streams.items()):
        publishes.sort(key=lambda p: p.first_sent)
        highest = 0
        highest_id = ""
        for publish in publishes:
            stored_serial = serial_of.get((channel, publish.message_id))
            if stored_serial is None:
                continue  # never stored (and never acked, or _check_acks reports it)
            if stored_serial < highest:
                reordered += 1
                violations.append(
                    Violation(
                        "publish-order",
                        f"{publisher} on {channel}: {publish.message_id} (serial "
                        f"{stored_serial}) sent after {highest_id} (serial {highest})",
                    )
                )
            else:
                highest, highest_id = stored_serial, publish.message_id
    return reordered


def _check_subscribers(
    history: History, newest: dict[str, int], violations: list[Violation]
) -> tuple[int, int, int]:
    """Per subscriber and channel: deliveries in serial order with no serial twice, the
    same messageId as stored, and every serial from its baseline to the channel's newest
    (every acked publish it should have seen) while it stayed subscribed or resumed.
    Returns (lost, duplicated, reordered) deliveries."""
    lost = duplicated = reordered = 0
    stored_id: dict[tuple[str, int], str] = {}
    for channel, stored in history.history.items():
        for serial, message_id in stored:
            stored_id[(channel, serial)] = message_id
    keys = set(history.deliveries) | set(history.subscriptions)
    for subscriber, channel in sorted(keys):
        deliveries = history.deliveries.get((subscriber, channel), [])
        subscriptions = history.subscriptions.get((subscriber, channel), [])
        seen: set[int] = set()
        highest = 0
        for delivery in deliveries:
            expected = stored_id.get((channel, delivery.serial))
            if expected is not None and expected != delivery.message_id:
                violations.append(
                    Violation(
                        "delivery",
                        f"{subscriber} on {channel}: serial {delivery.serial} delivered as "
                        f"{delivery.message_id}, stored as {expected}",
                    )
                )
            if delivery.serial in seen:
                duplicated += 1
                violations.append(
                    Violation(
                        "duplicate",
                        f"{subscriber} on {channel}: serial {delivery.serial} delivered again",
                    )
                )
                continue
            seen.add(delivery.serial)
            if delivery.source is DeliverySource.LIVE:
                if delivery.serial < highest:
                    reordered += 1
                    violations.append(
                        Violation(
                            "delivery-order",
                            f"{subscriber} on {channel}: serial {delivery.serial} after {highest}",
                        )
                    )
                highest = max(highest, delivery.serial)
        lost += _check_complete(history, subscriber, channel, newest, seen, violations)
        for subscription in subscriptions[1:]:
            if subscription.resumed is not True and not _fresh(subscription, deliveries):
                violations.append(
                    Violation(
                        "resume",
                        f"{subscriber} on {channel}: resume after {subscription.after_serial} "
                        f"answered resumed={subscription.resumed}",
                    )
                )
    return lost, duplicated, reordered


def _fresh(subscription: Subscription, deliveries: list[Delivery]) -> bool:
    """A re-``sub`` without a cursor by a subscriber that had received nothing yet: there
    was nothing to resume from, and nothing was missed."""
    sent = subscription.at if subscription.sent_at is None else subscription.sent_at
    return subscription.after_serial == 0 and not any(d.at < sent for d in deliveries)


def _check_complete(
    history: History,
    subscriber: str,
    channel: str,
    newest: dict[str, int],
    seen: set[int],
    violations: list[Violation],
) -> int:
    """A subscriber that stayed subscribed (every re-``sub`` resumed) has every serial from
    its baseline to the channel's newest. Its baseline is the first serial it got, or the
    serial of any publish first sent after its first ``sub`` was acked (the gateway listens
    before it acks, so that publish must reach it), whichever is lower: a subscriber that
    missed the first messages after subscribing is caught too."""
    subscriptions = history.subscriptions.get((subscriber, channel), [])
    if not subscriptions:
        return 0
    deliveries = history.deliveries.get((subscriber, channel), [])
    if any(s.resumed is not True and not _fresh(s, deliveries) for s in subscriptions[1:]):
        return 0  # reported as a resume violation; its continuity is broken
    first = subscriptions[0]
    candidates = [min(seen)] if seen else []
    candidates += [
        serial
        for publish in history.publishes.values()
        if publish.channel == channel
        if publish.first_sent > first.at
        for serial, _ in publish.acks
    ]
    if first.after_serial:
        candidates.append(first.after_serial + 1)
    if not candidates:
        return 0
    baseline = min(candidates)
    stored = sorted(serial for serial, _ in history.history.get(channel, []))
    missing = [s for s in stored if s >= baseline and s not in seen]
    if missing:
        violations.append(
            Violation(
                "lost",
                f"{subscriber} on {channel}: {len(missing)} serials from {baseline} to "
                f"{newest.get(channel, 0)} never delivered, first {missing[:10]}",
            )
        )
    return len(missing)


def _check_presence(history: History, violations: list[Violation]) -> None:
    for (watcher, channel), events in sorted(history.presence.items()):
        truth = history.truth.get(channel)
        if truth is None:
            continue
        view = presence_view(events)
        if view != truth:
            violations.append(
                Violation(
                    "presence",
                    f"{watcher} on {channel}: sees {sorted(view)}, truth {sorted(truth)} "
                    f"(extra {sorted(view - truth)}, missing {sorted(truth - view)})",
                )
            )


def check(history: History, storm_start: float = 0.0, storm_end: float = 0.0) -> Report:
    """Run every check on ``history``. ``storm_start``/``storm_end`` bound the window whose
    longest stretch without an ack is the disruption time (0, 0: from the first to the last
    attempt)."""
    violations: list[Violation] = []
    history_duplicates, newest = _check_history(history, violations)
    lost = _check_acks(history, violations)
    publish_reorders = _check_publish_order(history, violations)
    missed, delivery_duplicates, delivery_reorders = _check_subscribers(history, newest, violations)
    _check_presence(history, violations)
    if not storm_end:
        sent = [p.first_sent for p in history.publishes.values()]
        storm_start, storm_end = (min(sent), max(sent)) if sent else (0.0, 0.0)
    return Report(
        acked=len(history.acked_publishes()),
        lost=lost + missed,
        duplicated=history_duplicates + delivery_duplicates,
        reordered=publish_reorders + delivery_reorders,
        disruption_s=longest_ack_gap(history.ack_times(), storm_start, storm_end),
        violations=violations,
    )
