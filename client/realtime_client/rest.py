"""The REST client (``rest.ts``): publish, history, presence, time and token requests over
HTTP, for backends that do not hold a connection (PROTOCOL.md section 6)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode

import httpx

from realtime_client.auth import Capability, split_api_key
from realtime_client.crypto import Cipher, CipherError, is_cipher_encoding
from realtime_client.errors import RestError
from realtime_client.messages import PresenceMessage

__all__ = [
    "PaginatedResult",
    "PublishResult",
    "Rest",
    "RestChannel",
    "RestMessage",
    "RestPresence",
    "TokenDetails",
    "endpoint_to_http_url",
]

ItemT = TypeVar("ItemT")


def endpoint_to_http_url(endpoint: str) -> str:
    """The REST base URL for ``endpoint``: ``http(s)://`` verbatim (one trailing ``/``
    dropped), ``ws(s)://`` mapped to ``http(s)://``, a bare host to ``https://``."""
    if endpoint.startswith(("http://", "https://")):
        return endpoint.removesuffix("/")
    if endpoint.startswith("ws://"):
        return "http://" + endpoint.removeprefix("ws://").removesuffix("/")
    if endpoint.startswith("wss://"):
        return "https://" + endpoint.removeprefix("wss://").removesuffix("/")
    return f"https://{endpoint}"


@dataclass(frozen=True, slots=True)
class TokenDetails:
    """A token minted by ``Rest.auth.request_token`` (``expires``/``issued`` in ms)."""

    token: str
    key_name: str
    issued: int
    expires: int
    client_id: str
    capability: str


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The stored message's id and serial (``None`` for ephemeral publishes)."""

    channel: str
    message_id: str
    serial: int | None


@dataclass(frozen=True, slots=True)
class RestMessage:
    """A message from REST history (batch members share their batch's id and serial)."""

    id: str
    name: str
    data: Any
    timestamp: int
    client_id: str = ""
    encoding: str = ""
    serial: int = 0


class PaginatedResult(Generic[ItemT]):
    """One page of items; ``has_next()`` and ``await next()`` follow the ``Link`` header."""

    def __init__(
        self,
        items: list[ItemT],
        next_path: str | None,
        load: Callable[[str], Awaitable[PaginatedResult[ItemT]]],
    ) -> None:
        self.items = items
        self._next_path = next_path
        self._load = load

    def has_next(self) -> bool:
        """True when another page exists."""
        return self._next_path is not None

    def is_last(self) -> bool:
        """True on the last page."""
        return self._next_path is None

    async def next(self) -> PaginatedResult[ItemT] | None:
        """The next page, or ``None`` after the last."""
        if self._next_path is None:
            return None
        return await self._load(self._next_path)


class _Auth:
    """``Rest.auth``: token requests."""

    def __init__(self, rest: Rest) -> None:
        self._rest = rest

    async def request_token(
        self,
        client_id: str,
        ttl: float | None = None,
        capability: Capability | str | None = None,
    ) -> TokenDetails:
        """Mint a token for ``client_id`` with this client's key (``ttl`` in seconds,
        default 1 h; ``capability`` within the key's, default the key's)."""
        if not self._rest.key:
            raise ValueError("request_token needs a Rest client made with an API key")
        key_name, _ = split_api_key(self._rest.key)
        body: dict[str, Any] = {"clientId": client_id}
        if ttl is not None:
            body["ttl"] = int(ttl * 1000)
        if capability is not None:
            body["capability"] = capability
        value, _ = await self._rest._request(
            "POST", f"/keys/{quote(key_name, safe='')}/requestToken", body
        )
        return TokenDetails(
            value["token"],
            value["keyName"],
            value["issued"],
            value["expires"],
            value["clientId"],
            value["capability"],
        )


class Rest:
    """REST client. Exactly one of ``key`` (Basic auth), ``token`` (Bearer) or
    ``auth_callback`` (returns a token or ``TokenDetails``; cached, and renewed once when an
    answer is 401). ``client_id`` is stamped on messages published with a key.

    ``async with Rest(key=..., endpoint=...) as rest`` closes its HTTP client at the end.
    """

    def __init__(
        self,
        *,
        key: str | None = None,
        token: str | None = None,
        auth_callback: Callable[[], Any] | None = None,
        client_id: str | None = None,
        endpoint: str = "realtime.foony.io",
        timeout: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if sum(1 for method in (key, token, auth_callback) if method) != 1:
            raise ValueError("pass exactly one of key, token or auth_callback")
        self.key = key
        self.client_id = client_id
        self.base_url = endpoint_to_http_url(endpoint)
        self._token = token
        self._auth_callback = auth_callback
        self._cached_token: str | None = None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._own_http = http_client is None
        self._channels: dict[str, RestChannel] = {}
        self.auth = _Auth(self)

    async def close(self) -> None:
        """Close the HTTP client (when this object made it)."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> Rest:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def channel(self, name: str, cipher: Cipher | bytes | str | None = None) -> RestChannel:
        """The REST channel ``name`` (``cipher`` as for ``Realtime.channels.get``)."""
        channel = self._channels.get(name)
        if channel is None:
            if cipher is not None and not isinstance(cipher, Cipher):
                cipher = Cipher(cipher)
            channel = RestChannel(self, name, cipher)
            self._channels[name] = channel
        return channel

    async def time(self) -> int:
        """The server's clock, ms since the epoch."""
        value, _ = await self._request("GET", "/time", authenticate=False)
        if not isinstance(value, list) or not value or not isinstance(value[0], int):
            raise RestError("malformed /time response", 50000, 500)
        return value[0]

    async def batch_publish(
        self, messages: Mapping[str, Sequence[Mapping[str, Any]]]
    ) -> dict[str, PublishResult | RestError]:
        """Publish to several channels concurrently: per channel one atomic batch (an array
        body). Returns per channel its result or the ``RestError`` that refused it."""

        async def one(name: str, batch: Sequence[Mapping[str, Any]]) -> PublishResult | RestError:
            try:
                return await self.channel(name).publish(list(batch))
            except RestError as error:
                return error

        names = list(messages)
        outcomes = await asyncio.gather(*(one(name, messages[name]) for name in names))
        return dict(zip(names, outcomes, strict=True))

    async def _authorization(self) -> str:
        if self.key:
            return "Basic " + base64.b64encode(self.key.encode()).decode("ascii")
        if self._token:
            return "Bearer " + self._token
        if self._cached_token is None:
            assert self._auth_callback is not None
            result = self._auth_callback()
            if inspect.isawaitable(result):
                result = await result
            token = result if isinstance(result, str) else getattr(result, "token", None)
            if not isinstance(token, str) or not token:
                raise RestError("auth_callback returned no token", 40101, 401)
            self._cached_token = token
        return "Bearer " + self._cached_token

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        authenticate: bool = True,
        retried: bool = False,
    ) -> tuple[Any, str | None]:
        headers: dict[str, str] = {}
        if authenticate:
            headers["Authorization"] = await self._authorization()
        response = await self._http.request(
            method,
            self.base_url + path,
            headers=headers,
            json=body if body is not None else None,
        )
        if response.is_error:
            error = _error_from(response)
            if error.status_code == 401 and self._auth_callback is not None and not retried:
                # Expired or revoked token: renew once (PROTOCOL.md 4.5).
                self._cached_token = None
                return await self._request(method, path, body, authenticate, retried=True)
            raise error
        value = response.json() if response.content else None
        return value, _link_next(response.headers.get("link"))


class RestChannel:
    """A channel over REST: ``publish``, ``history`` and ``presence.get``."""

    def __init__(self, rest: Rest, name: str, cipher: Cipher | None) -> None:
        self.name = name
        self.cipher = cipher
        self._rest = rest
        self._path = f"/channels/{quote(name, safe='')}"
        self.presence = RestPresence(self)

    def _body(self, message: Mapping[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"name": message.get("name", ""), "data": message.get("data")}
        client_id = message.get("client_id", message.get("clientId", self._rest.client_id))
        if client_id is not None:
            body["clientId"] = client_id
        if message.get("id") is not None:
            body["id"] = message["id"]
        if message.get("ephemeral") is not None:
            body["ephemeral"] = message["ephemeral"]
        if self.cipher is not None:
            body["encoding"], body["data"] = self.cipher.encrypt(body["data"])
        return body

    async def publish(
        self,
        name_or_messages: str | Mapping[str, Any] | Sequence[Mapping[str, Any]],
        data: Any = None,
    ) -> PublishResult:
        """Publish ``publish(name, data)``, one message dict (``name``, ``data``, optional
        ``id`` for exactly-once, ``client_id``, ``ephemeral``), or a list of them as one
        atomic batch (one id, one serial)."""
        body: Any
        if isinstance(name_or_messages, str):
            body = self._body({"name": name_or_messages, "data": data})
        elif isinstance(name_or_messages, Mapping):
            body = self._body(name_or_messages)
        else:
            body = [self._body(message) for message in name_or_messages]
        value, _ = await self._rest._request("POST", f"{self._path}/messages", body)
        return PublishResult(value["channel"], value["messageId"], value.get("serial"))

    async def history(
        self,
        limit: int | None = None,
        before: int | None = None,
        direction: str | None = None,
    ) -> PaginatedResult[RestMessage]:
        """A page of stored messages, newest first (``direction="forwards"``: oldest
        first); follow ``next()`` for more."""
        query = {
            name: str(value)
            for name, value in (("limit", limit), ("before", before), ("direction", direction))
            if value is not None
        }
        suffix = f"?{urlencode(query)}" if query else ""
        return await self._history_page(f"{self._path}/messages{suffix}")

    async def _history_page(self, path: str) -> PaginatedResult[RestMessage]:
        value, next_path = await self._rest._request("GET", path)
        items = [self._message(item) for item in value or []]
        return PaginatedResult(items, next_path, self._history_page)

    def _message(self, item: Mapping[str, Any]) -> RestMessage:
        data = item.get("data")
        encoding = item.get("encoding", "")
        if self.cipher is not None and is_cipher_encoding(encoding):
            # As the SDK: what does not decrypt is returned still encrypted.
            with contextlib.suppress(CipherError):
                data, encoding = self.cipher.decrypt(encoding, data), ""
        return RestMessage(
            item["id"],
            item.get("name", ""),
            data,
            item["timestamp"],
            item.get("clientId", ""),
            encoding,
            item.get("serial", 0),
        )


class RestPresence:
    """``RestChannel.presence``: the channel's current members."""

    def __init__(self, channel: RestChannel) -> None:
        self._channel = channel

    async def get(
        self,
        limit: int | None = None,
        client_id: str | None = None,
        connection_id: str | None = None,
    ) -> list[PresenceMessage]:
        """Current members (action ``present``), ordered by client id then connection id,
        filtered exactly by ``client_id`` / ``connection_id``, at most ``limit``."""
        query = {
            name: str(value)
            for name, value in (
                ("limit", limit),
                ("clientId", client_id),
                ("connectionId", connection_id),
            )
            if value is not None
        }
        suffix = f"?{urlencode(query)}" if query else ""
        channel = self._channel
        value, _ = await channel._rest._request("GET", f"{channel._path}/presence{suffix}")
        members = []
        for item in value or []:
            data = item.get("data")
            encoding = item.get("encoding", "")
            if channel.cipher is not None and is_cipher_encoding(encoding):
                with contextlib.suppress(CipherError):
                    data, encoding = channel.cipher.decrypt(encoding, data), ""
            members.append(
                PresenceMessage(
                    item.get("action", "present"),
                    channel.name,
                    item["clientId"],
                    item["connectionId"],
                    data,
                    item["timestamp"],
                    encoding,
                )
            )
        return members


def _link_next(header: str | None) -> str | None:
    if not header:
        return None
    for part in header.split(","):
        target, _, parameters = part.partition(";")
        if 'rel="next"' in parameters.replace(" ", ""):
            return target.strip().removeprefix("<").removesuffix(">")
    return None


def _error_from(response: httpx.Response) -> RestError:
    fallback = RestError(
        f"request failed with status {response.status_code}", 50000, response.status_code
    )
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return fallback
    if not isinstance(error, dict) or "message" not in error or not error.get("code"):
        return fallback
    return RestError(
        str(error["message"]),
        int(error["code"]),
        int(error.get("statusCode") or response.status_code),
    )
