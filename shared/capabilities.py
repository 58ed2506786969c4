"""Capabilities (PROTOCOL.md 4.3): which operations a credential may do on which channels."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from realtime_protocol.errors import ErrorCode, ProtocolError

__all__ = ["Capability", "Operation"]


class Operation(enum.StrEnum):
    """Operation names as written in capability documents."""

    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"
    PRESENCE = "presence"
    HISTORY = "history"


_ALL = "*"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # '*' stands for any run of characters (colons included), anchored at both ends.
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


@dataclass(frozen=True, slots=True)
class _Grant:
    pattern: str
    regex: re.Pattern[str]
    operations: frozenset[str]


class Capability:
    """A parsed capability document, e.g. ``{"chat:*": ["subscribe", "publish"]}``."""

    __slots__ = ("_grants", "document")

    def __init__(self, document: Mapping[str, list[str]]) -> None:
        self.document = dict(document)
        self._grants = tuple(
            _Grant(pattern, _pattern_regex(pattern), frozenset(operations))
            for pattern, operations in document.items()
        )

    @classmethod
    def allow_all(cls) -> Capability:
        """The capability of a key with no restriction: every operation on every channel."""
        return cls({_ALL: [_ALL]})

    @classmethod
    def parse(cls, value: Any) -> Capability:
        """Parse a capability given as a JSON string or an object; raise ``ValueError``."""
        if isinstance(value, str | bytes):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as error:
                raise ValueError(f"capability is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise ValueError("capability must be a JSON object")
        for pattern, operations in value.items():
            if not isinstance(operations, list) or not all(
                isinstance(operation, str) for operation in operations
            ):
                raise ValueError(f"capability for {pattern!r} must be a list of operation names")
        return cls(value)

    def check(self, operation: Operation, channel: str, request_id: int = 0) -> None:
        """Raise ``ProtocolError`` 40302 (no pattern matches) or 40301 (operation missing)."""
        matched = False
        for grant in self._grants:
            if grant.regex.fullmatch(channel):
                if _ALL in grant.operations or operation in grant.operations:
                    return
                matched = True
        if matched:
            raise ProtocolError(
                ErrorCode.CAPABILITY,
                f"capability does not allow {operation} on {channel!r}",
                request_id,
            )
        raise ProtocolError(
            ErrorCode.CHANNEL_DENIED, f"capability does not cover channel {channel!r}", request_id
        )

    def allows_any(self, operations: tuple[Operation, ...], channel: str, request_id: int) -> None:
        """Pass when any one of ``operations`` is allowed; else raise the first denial."""
        first_error: ProtocolError | None = None
        for operation in operations:
            try:
                self.check(operation, channel, request_id)
                return
            except ProtocolError as error:
                first_error = first_error or error
        assert first_error is not None
        raise first_error

    def is_subset_of(self, other: Capability) -> bool:
        """True when every grant here is covered by a grant of ``other`` with the same ops.

        A pattern is covered when the other pattern matches it read as a literal name, which
        is exact for literal patterns and for the usual ``prefix:*`` forms.
        """
        for grant in self._grants:
            for operation in grant.operations:
                if not any(
                    other_grant.regex.fullmatch(grant.pattern)
                    and (_ALL in other_grant.operations or operation in other_grant.operations)
                    for other_grant in other._grants
                ):
                    return False
        return True
