"""The REST API (PROTOCOL.md section 6) without I/O: request schemas, validation, the
publish, history, presence and token rules, response encoding and the OpenAPI document.

Every request and response body is a ``msgspec`` struct: one definition validates bodies
and query strings (``msgspec.convert``), encodes responses, and generates the JSON Schemas of
the OpenAPI document, so the document cannot drift from what the server does. Bodies are
parsed by ``orjson`` first, exactly as a JSON WebSocket frame is, so a payload is stored the
same way whichever path published it. ``gateway.rest`` is the aiohttp adapter around this.

Every failure is a ``ProtocolError`` whose code gives the HTTP status
(``realtime_protocol.errors.http_status_for``).
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import msgspec
import orjson
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import BatchMember, Message, PublishFrame
from shared.auth import Identity, Keyring, mint_token
from shared.capabilities import Capability
from shared.channels import MAX_CHANNEL_LENGTH
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.limits import KeyedBuckets, Limit
from shared.presence import MemberRecord
from shared.session import (
    DEFAULT_HISTORY_LIMIT,
    MAX_HISTORY_LIMIT,
    Limits,
    build_message,
)

__all__ = [
    "CHANNEL_PATTERN",
    "DEFAULT_TOKEN_TTL_MS",
    "MAX_TOKEN_TTL_MS",
    "Caller",
    "ErrorBody",
    "ErrorDetail",
    "HistoryItem",
    "HistoryParams",
    "PresenceItem",
    "PresenceParams",
    "PublishMessage",
    "PublishResult",
    "TokenDetails",
    "TokenRequest",
    "authenticate",
    "decode_history_params",
    "decode_presence_params",
    "decode_publish",
    "decode_token_request",
    "encode_publish_result",
    "encode_time",
    "grant_token",
    "history_page",
    "history_query",
    "openapi_document",
    "presence_page",
    "publish_refusal",
]

_INT64_MAX = 2**63 - 1
DEFAULT_TOKEN_TTL_MS = 3_600_000
MAX_TOKEN_TTL_MS = 24 * 3_600_000
# The same rule as shared.channels, written for JSON Schema (an anchored ECMA regex).
CHANNEL_PATTERN = f"^[A-Za-z0-9_-][A-Za-z0-9:_-]{{0,{MAX_CHANNEL_LENGTH - 1}}}$"
_MESSAGE_ID_MAX = Limits().max_message_id_length

# ---- schemas: requests ----


class PublishMessage(Struct, forbid_unknown_fields=True):
    """One message of a publish body (PROTOCOL.md 6.2). ``null`` counts as absent for the
    optional fields; unknown fields are refused, so a misspelt ``clientID`` is an error
    rather than a message silently published without attribution."""

    name: str = ""
    data: Any = UNSET
    encoding: str | None = None
    clientId: str | None = None
    id: Annotated[str, Meta(max_length=_MESSAGE_ID_MAX)] | None = None
    ephemeral: bool | None = None


PublishBody = PublishMessage | list[PublishMessage]


class HistoryParams(Struct):
    """Query of ``GET /channels/{channel}/messages``. Serials strictly between ``after``
    and ``before`` (0 = unbounded); ``backwards`` takes the page from the newest end,
    ``forwards`` from the oldest. ``limit`` counts stored records (a batch is one) and is
    capped at 1,000."""

    limit: Annotated[int, Meta(ge=1, le=_INT64_MAX)] = DEFAULT_HISTORY_LIMIT
    before: Annotated[int, Meta(ge=1, le=_INT64_MAX)] | None = None
    after: Annotated[int, Meta(ge=0, le=_INT64_MAX)] = 0
    direction: Literal["backwards", "forwards"] = "backwards"


class PresenceParams(Struct):
    """Query of ``GET /channels/{channel}/presence``: exact-match filters, then ``limit``."""

    limit: Annotated[int, Meta(ge=1, le=_INT64_MAX)] | None = None
    clientId: str | None = None
    connectionId: str | None = None


class TokenRequest(Struct, forbid_unknown_fields=True):
    """Body of ``POST /keys/{keyName}/requestToken`` (PROTOCOL.md 6.5): ``ttl`` in ms,
    ``capability`` an object or that object as a JSON string."""

    clientId: Annotated[str, Meta(min_length=1)]
    ttl: Annotated[int, Meta(ge=1, le=_INT64_MAX)] | None = None
    capability: dict[str, list[str]] | str | None = None


# ---- schemas: responses ----


class PublishResult(Struct, omit_defaults=True):
    """A stored (or, without ``serial``, ephemeral) publish."""

    channel: str
    messageId: str
    serial: int | UnsetType = UNSET


class HistoryItem(Struct, omit_defaults=True, kw_only=True):
    """One history item (PROTOCOL.md 6.3); a batch's members share its id and serial."""

    id: str
    name: str
    data: Raw
    timestamp: int
    clientId: str = ""
    encoding: str = ""
    serial: int


class PresenceItem(Struct, omit_defaults=True, kw_only=True):
    """One current member (PROTOCOL.md 6.4); ``timestamp`` is its last enter or update."""

    clientId: str
    connectionId: str
    action: Literal["present"]
    data: Raw | UnsetType = UNSET
    encoding: str = ""
    timestamp: int


class TokenDetails(Struct):
    """A minted token (PROTOCOL.md 6.5): times in ms, the capability as a JSON string."""

    token: str
    keyName: str
    issued: int
    expires: int
    clientId: str
    capability: str


class ErrorDetail(Struct):
    """What failed: the protocol code and the HTTP status that carries it."""

    message: str
    code: int
    statusCode: int


class ErrorBody(Struct):
    """Every non-2xx response (PROTOCOL.md 6.6)."""

    error: ErrorDetail


# ---- decoding ----

_T = TypeVar("_T")


def _bad(what: str, error: Exception) -> ProtocolError:
    # Validation messages quote what was sent (an unknown field's name): keep them short.
    return ProtocolError(ErrorCode.BAD_FRAME, f"invalid {what}: {str(error)[:200]}")


def _decode_body(body: bytes, kind: Any) -> Any:
    try:
        return msgspec.convert(orjson.loads(body), kind)
    except orjson.JSONDecodeError as error:
        raise _bad("JSON body", error) from None
    except (msgspec.ValidationError, RecursionError) as error:
        raise _bad("body", error) from None


def _decode_query(query: Mapping[str, str], kind: type[_T]) -> _T:
    try:
        # Lax mode: query values are strings, "10" is the integer 10.
        return msgspec.convert(dict(query), kind, strict=False)
    except msgspec.ValidationError as error:
        raise _bad("query", error) from None


def decode_history_params(query: Mapping[str, str]) -> HistoryParams:
    """Validate a history query string (first value of each parameter); unknown
    parameters are ignored, as is usual for query strings."""
    return _decode_query(query, HistoryParams)


def decode_presence_params(query: Mapping[str, str]) -> PresenceParams:
    """Validate a presence query string."""
    return _decode_query(query, PresenceParams)


def decode_token_request(body: bytes) -> TokenRequest:
    """Validate a token request body. An integral ``ttl`` written as a float (``60000.0``)
    is an integer in JSON Schema's sense, so it is taken as one."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise _bad("JSON body", error) from None
    if isinstance(value, dict):
        ttl = value.get("ttl")
        if isinstance(ttl, float) and ttl.is_integer():
            value["ttl"] = int(ttl)
    try:
        return msgspec.convert(value, TokenRequest)
    except msgspec.ValidationError as error:
        raise _bad("body", error) from None


# ---- auth ----


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a REST request. ``identity.client_id`` is the token's ``sub`` for token
    callers (empty when the token has none) and empty for key callers, who name the
    clientId per message."""

    identity: Identity
    by_token: bool


def authenticate(keyring: Keyring, authorization: str | None) -> Caller:
    """Check an ``Authorization`` header: ``Basic base64(key)`` or ``Bearer <jwt>``.
    Raises ``ProtocolError`` 40101 (40102 for an expired token): both are HTTP 401, which is
    what makes the SDK fetch a fresh token and retry (PROTOCOL.md 4.5)."""
    if not authorization:
        raise ProtocolError(ErrorCode.BAD_AUTH, "missing Authorization header (Basic or Bearer)")
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "basic":
        try:
            text = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ProtocolError(ErrorCode.BAD_AUTH, "malformed Basic credentials") from None
        key = keyring.authenticate_key(text)
        return Caller(Identity(key.app, "", key.name, key.capability), by_token=False)
    if scheme.lower() == "bearer" and credentials:
        # No clientId of our own to check it against, and none assigned: a token without
        # sub publishes without attribution.
        return Caller(keyring.identify(credentials, "", "", ""), by_token=True)
    raise ProtocolError(ErrorCode.BAD_AUTH, "unsupported Authorization scheme")


# ---- publish ----


def _data(value: Any) -> bytes | None:
    if value is UNSET:
        return None
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as error:
        # The JSON WebSocket path refuses the same payloads (orjson nests 254 levels deep).
        raise _bad("data", error) from None


def _publisher(caller: Caller, given: str | None) -> str:
    """The clientId a publish is stored with (PROTOCOL.md 3.11): a key caller's choice;
    a token's ``sub``, which a body clientId may repeat but not change (403/40300, as the
    SDK documents: "a differing value is rejected"). A token without ``sub`` cannot choose
    one either, as on the WebSocket path."""
    if not caller.by_token:
        return given or ""
    own = caller.identity.client_id
    if given and given != own:
        raise ProtocolError(
            ErrorCode.FORBIDDEN,
            f"clientId {given[:64]!r} differs from the token's"
            if own
            else "a token without a clientId cannot publish as one",
        )
    return own


def decode_publish(
    body: bytes, channel: str, caller: Caller, limits: Limits, now_ms: int | None = None
) -> Message:
    """The message a publish body stores: an object is one message, an array one atomic
    batch (one id, one serial; PROTOCOL.md 6.2). In an array the first element's ``id`` is
    the batch's, and elements that disagree on ``clientId`` or ``ephemeral`` are refused
    (section 9, item 16), since a batch has one of each. Raises ``ProtocolError``."""
    parsed: PublishMessage | list[PublishMessage] = _decode_body(body, PublishBody)
    elements = parsed if isinstance(parsed, list) else [parsed]
    if not elements:
        raise ProtocolError(ErrorCode.BAD_FRAME, "an array publish needs at least one message")
    first = elements[0]
    if len({element.clientId or None for element in elements}) > 1:
        raise ProtocolError(ErrorCode.BAD_FRAME, "messages of one batch must share a clientId")
    if len({bool(element.ephemeral) for element in elements}) > 1:
        raise ProtocolError(ErrorCode.BAD_FRAME, "messages of one batch are all ephemeral or none")
    if isinstance(parsed, list):
        members = tuple(
            BatchMember(element.name, _data(element.data), element.encoding or "")
            for element in elements
        )
        frame = PublishFrame(
            0, channel, message_id=first.id or "", ephemeral=bool(first.ephemeral), members=members
        )
    else:
        frame = PublishFrame(
            0,
            channel,
            first.name,
            _data(first.data),
            first.encoding or "",
            first.id or "",
            bool(first.ephemeral),
        )
    timestamp = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return build_message(frame, _publisher(caller, first.clientId), timestamp, limits)


def publish_refusal(
    buckets: KeyedBuckets, caller: Caller, message: Message
) -> tuple[ProtocolError, int] | None:
    """Spend the caller's key's publish tokens for ``message`` (one per message: a batch
    costs one per member, as on a WebSocket), or return the refusal (42900, HTTP 429) and
    the seconds to wait (``Retry-After``). Every token and REST caller of one key shares
    its bucket; nothing is stored for a refused publish."""
    identity = caller.identity
    bucket = buckets.bucket(f"{identity.app}/{identity.key_name}")
    cost = len(message.members) or 1
    if bucket.take(cost):
        return None
    wait = bucket.retry_after(cost)
    error = ProtocolError(
        ErrorCode.RATE_LIMITED,
        f"REST publish rate limit of this key: {buckets.rate:g} messages/s, burst "
        f"{buckets.burst:g}; retry in {wait:.2f} s",
        limit=Limit.REST_PUBLISH_RATE,
    )
    return error, max(1, math.ceil(wait))


def encode_publish_result(message: Message, serial: int) -> bytes:
    """The 201 body: the message id and, unless ephemeral, its serial (the original one for
    a duplicate ``id``)."""
    result = PublishResult(message.channel, message.message_id)
    if not message.ephemeral:
        result.serial = serial
    return msgspec.json.encode(result)


# ---- history ----


def history_query(app: str, channel: str, params: HistoryParams) -> HistoryQuery:
    """The worker query of a REST history page. Backwards is a ``hist`` (the newest
    ``limit`` below ``before``; ``after`` is applied to the answer), forwards the oldest
    ``limit`` records above ``after`` and below ``before``."""
    limit = min(params.limit, MAX_HISTORY_LIMIT)
    before = params.before or 0
    if params.direction == "forwards":
        return HistoryQuery(HistoryOp.FORWARDS, app, channel, limit, before, params.after)
    return HistoryQuery(HistoryOp.HISTORY, app, channel, limit, before)


def _items(message: Message) -> list[HistoryItem]:
    """A stored record as REST items, in publish order: one per batch member."""
    parts = message.members or (BatchMember(message.name, message.data, message.encoding),)
    return [
        HistoryItem(
            id=message.message_id,
            name=part.name,
            data=Raw(part.data if part.data is not None else b"null"),
            timestamp=message.timestamp,
            clientId=message.client_id,
            encoding=part.encoding,
            serial=message.serial,
        )
        for part in parts
    ]


def _link(channel: str, params: list[tuple[str, int | str]]) -> str:
    # A path relative to the service base: the SDK appends it to its base URL verbatim. The
    # channel is escaped as the TS SDK escapes it (encodeURIComponent: ':' -> %3A).
    return f'</channels/{quote(channel, safe="")}/messages?{urlencode(params)}>; rel="next"'


def history_page(
    channel: str, params: HistoryParams, result: HistoryResult
) -> tuple[bytes, str | None]:
    """The 200 body and the ``Link`` header (None on the last page) of a history page.

    Backwards lists newest first and is the exact reverse of forwards, batch members
    included, so reversing a backwards page gives publish order. The next page's cursor is
    ``before=<oldest serial>`` backwards, ``after=<newest serial>`` forwards; the other
    bound and the limit are carried along.
    """
    messages = list(result.messages)
    limit = min(params.limit, MAX_HISTORY_LIMIT)
    link: str | None = None
    if params.direction == "forwards":
        if result.flag and messages:
            cursor: list[tuple[str, int | str]] = [
                ("direction", "forwards"),
                ("after", messages[-1].serial),
                ("limit", limit),
            ]
            if params.before:
                cursor.append(("before", params.before))
            link = _link(channel, cursor)
    else:
        # A hist page is a contiguous run of serials ending below ``before``: the lower
        # bound removes a prefix of it, and nothing older than ``after`` is a next page.
        messages = [message for message in messages if message.serial > params.after]
        if result.flag and messages and messages[0].serial - 1 > params.after:
            cursor = [("before", messages[0].serial), ("limit", limit)]
            if params.after:
                cursor.append(("after", params.after))
            link = _link(channel, cursor)
    items = [item for message in messages for item in _items(message)]
    if params.direction != "forwards":
        items.reverse()
    return msgspec.json.encode(items), link


# ---- presence ----


def presence_page(records: Sequence[MemberRecord], params: PresenceParams) -> bytes:
    """The 200 body of a presence read: exact-match filters, ordered by clientId then
    connectionId (so ``limit`` truncates the same way every time), then ``limit``."""
    chosen = sorted(
        (
            record
            for record in records
            if (params.clientId is None or record.client_id == params.clientId)
            and (params.connectionId is None or record.connection_id == params.connectionId)
        ),
        key=lambda record: (record.client_id, record.connection_id),
    )
    if params.limit is not None:
        chosen = chosen[: params.limit]
    items = [
        PresenceItem(
            clientId=record.client_id,
            connectionId=record.connection_id,
            action="present",
            data=UNSET if record.data is None else Raw(record.data),
            encoding=record.encoding,
            timestamp=record.timestamp,
        )
        for record in chosen
    ]
    return msgspec.json.encode(items)


# ---- tokens ----


def grant_token(
    keyring: Keyring, caller: Caller, key_name: str, request: TokenRequest, now: float
) -> bytes:
    """Mint a token for ``request`` (PROTOCOL.md 6.5) and return the TokenDetails body.

    Only the key itself may ask (Basic auth with ``key_name``, else 403/40300); the
    capability defaults to the key's and must be within it (403/40301); ``ttl`` defaults to
    an hour and is clamped to 24 h and to the gateway's own token lifetime cap, so that
    every token minted here is one the gateways accept.
    """
    if caller.by_token:
        raise ProtocolError(ErrorCode.FORBIDDEN, "token requests need Basic auth with the key")
    if caller.identity.key_name != key_name:
        raise ProtocolError(ErrorCode.FORBIDDEN, "a key may only request tokens for itself")
    key = keyring.get(key_name)
    assert key is not None  # the caller authenticated with it
    capability = key.capability
    if request.capability is not None:
        try:
            capability = Capability.parse(request.capability)
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"invalid capability: {error}") from None
        if not capability.is_subset_of(key.capability):
            raise ProtocolError(ErrorCode.CAPABILITY, "capability exceeds the key's capability")
    ttl_ms = min(
        request.ttl or DEFAULT_TOKEN_TTL_MS,
        MAX_TOKEN_TTL_MS,
        int(keyring.token_max_ttl_s * 1000),
    )
    minted = mint_token(key, request.clientId, capability, ttl_ms, now)
    details = TokenDetails(
        minted.token,
        key.name,
        minted.issued_at * 1000,
        minted.expires_at * 1000,
        request.clientId,
        minted.capability,
    )
    return msgspec.json.encode(details)


# ---- small bodies ----


def encode_time(now_ms: int) -> bytes:
    """The ``/time`` body: an array whose first element is the server time in ms."""
    return orjson.dumps([now_ms])


# ---- OpenAPI ----

_REF = "#/components/schemas/{name}"
_ERROR_STATUSES = {
    "400": "bad request (40001): malformed JSON, wrong types, unknown fields, bad channel",
    "401": "missing or invalid credentials (40101), expired token (40102)",
    "403": "not permitted (40300), operation not granted (40301), channel not covered (40302)",
    "429": "the key's REST publish rate limit (42900); see Retry-After",
    "500": "server error (50000)",
    "503": "backend not ready (50001), retry later",
}


def _errors(*statuses: str) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}}
    return {
        status: {"description": _ERROR_STATUSES[status], "content": content} for status in statuses
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _parameters(component: dict[str, Any]) -> list[dict[str, Any]]:
    """Query parameters from the JSON Schema of a params struct."""
    required = set(component.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": schema}
        for name, schema in component["properties"].items()
    ]


def openapi_document(limits: Limits) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the REST routes, its schemas generated from the structs
    above (batch size from ``limits``, as the gateway enforces it)."""
    # Structs named below by $ref are in ``components`` once generated; the first three
    # are inline schemas.
    schemas, components = msgspec.json.schema_components(
        [
            PublishBody,
            list[HistoryItem],
            list[PresenceItem],
            PublishResult,
            TokenRequest,
            TokenDetails,
            ErrorBody,
            HistoryParams,
            PresenceParams,
        ],
        ref_template=_REF,
    )
    publish, history, presence = schemas[:3]
    token_request = {"$ref": _REF.format(name="TokenRequest")}
    history_parameters = _parameters(components.pop("HistoryParams"))
    presence_parameters = _parameters(components.pop("PresenceParams"))
    for variant in publish["anyOf"]:
        if variant.get("type") == "array":
            variant.update(minItems=1, maxItems=limits.max_batch_members)
    channel = {
        "name": "channel",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": CHANNEL_PATTERN},
        "description": "channel name, percent-encoded (the TS SDK escapes ':' as %3A)",
    }
    errors = ("400", "401", "403", "500", "503")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Realtime REST API",
            "version": "0.16.0",
            "description": "REST routes of the gateway, wire-compatible with @foony/realtime "
            "0.16.0 (PROTOCOL.md section 6).",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic"},
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "paths": {
            "/time": {
                "get": {
                    "operationId": "time",
                    "summary": "Server time in ms (no auth)",
                    "security": [],
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                            "the server time in ms, first element",
                        )
                    },
                }
            },
            "/channels/{channel}/messages": {
                "parameters": [channel],
                "post": {
                    "operationId": "publish",
                    "summary": "Publish one message (object) or one atomic batch (array)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": publish}},
                    },
                    "responses": {
                        "201": _json(
                            {"$ref": _REF.format(name="PublishResult")},
                            "stored (or, without serial, ephemeral); a duplicate id "
                            "answers the original serial",
                        ),
                        **_errors(*errors, "429"),
                    },
                },
                "get": {
                    "operationId": "history",
                    "summary": "A page of stored messages",
                    "parameters": history_parameters,
                    "responses": {
                        "200": {
                            **_json(history, "newest first, or oldest first with forwards"),
                            "headers": {
                                "Link": {
                                    "description": 'the next page: </channels/...>; rel="next"',
                                    "schema": {"type": "string"},
                                }
                            },
                        },
                        **_errors(*errors),
                    },
                },
            },
            "/channels/{channel}/presence": {
                "parameters": [channel],
                "get": {
                    "operationId": "presence",
                    "summary": "The channel's current members (one page)",
                    "parameters": presence_parameters,
                    "responses": {"200": _json(presence, "current members"), **_errors(*errors)},
                },
            },
            "/keys/{keyName}/requestToken": {
                "parameters": [
                    {
                        "name": "keyName",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                        "description": "appSlug.keyId of the key in the Basic credentials",
                    }
                ],
                "post": {
                    "operationId": "requestToken",
                    "summary": "Mint a client token from the key",
                    "security": [{"basicAuth": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": token_request}},
                    },
                    "responses": {
                        "200": _json({"$ref": _REF.format(name="TokenDetails")}, "the token"),
                        **_errors("400", "401", "403", "500"),
                    },
                },
            },
        },
    }
