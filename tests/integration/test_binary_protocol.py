"""The binary protocol with a raw client: codec choice, record framing and coalescing."""

from __future__ import annotations

import uuid

import orjson

from realtime_protocol import binary_codec
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    ConnectedFrame,
    ErrorFrame,
    MessageFrame,
    PingFrame,
    PongFrame,
    PublishFrame,
    SubscribeFrame,
)
from tests.support import APP_KEY, BinaryClient, Cluster, json_client


async def connected_binary(url: str, client_id: str = "bin") -> BinaryClient:
    client = await BinaryClient.connect(url)
    await client.send(AuthFrame(key=APP_KEY, client_id=client_id))
    frame = await client.receive()
    assert isinstance(frame, ConnectedFrame) and frame.client_id == client_id
    return client


async def test_binary_and_json_clients_share_channels(cluster: Cluster) -> None:
    channel = f"mixed:{uuid.uuid4().hex[:8]}"
    binary = await connected_binary(cluster.a.url)
    await binary.send(SubscribeFrame(1, channel))
    assert await binary.receive() == AckFrame(1)
    publisher = await json_client(cluster.b.url, clientId="json-pub")
    ack = await publisher.request(
        "pub", channel=channel, name="n", data={"k": [1, "ü"]}, messageId="x-1"
    )
    assert ack["seq"] == 1
    frame = await binary.receive()
    assert isinstance(frame, MessageFrame)
    assert orjson.loads(frame.message.data or b"") == {"k": [1, "ü"]}
    assert (frame.message.serial, frame.message.client_id) == (1, "json-pub")
    await binary.close()
    await publisher.close()


async def test_several_records_in_one_message_and_coalesced_replies(cluster: Cluster) -> None:
    client = await connected_binary(cluster.a.url)
    await client.send(PingFrame(), PingFrame(), PingFrame())
    message = await client.socket.recv()
    assert isinstance(message, bytes)
    # The three pongs were ready together: they leave as one WebSocket message.
    assert list(binary_codec.iter_records(message)) == [b"\x10"] * 3
    await client.close()


async def test_payload_bytes_are_forwarded_verbatim(cluster: Cluster) -> None:
    channel = f"verbatim:{uuid.uuid4().hex[:8]}"
    client = await connected_binary(cluster.a.url)
    await client.send(SubscribeFrame(1, channel))
    assert await client.receive() == AckFrame(1)
    data = b'{ "spaced" : 1.50, "z":[ true ] }'
    await client.send(PublishFrame(2, channel, "n", data, "enc/x", "v-1"))
    frames = [await client.receive(), await client.receive()]
    message = next(f for f in frames if isinstance(f, MessageFrame))
    assert message.message.data == data and message.message.encoding == "enc/x"
    assert AckFrame(2, 1) in frames
    await client.close()


async def test_bad_records_get_err_and_connection_stays(cluster: Cluster) -> None:
    client = await connected_binary(cluster.a.url)
    await client.socket.send(binary_codec.frame_record(b"\x63\x01"))
    error = await client.receive()
    assert isinstance(error, ErrorFrame) and error.code == 40001 and "opcode" in error.message
    bad_json = binary_codec.encode_client_frame(PublishFrame(5, "c", "n", b"{x", "", "id"))
    await client.socket.send(binary_codec.frame_record(bad_json))
    error = await client.receive()
    assert isinstance(error, ErrorFrame) and error.id == 5 and "JSON" in error.message
    await client.socket.send(b"\x05\x01")  # length prefix longer than the message
    error = await client.receive()
    assert isinstance(error, ErrorFrame) and error.code == 40001
    await client.socket.send("text on a binary connection")
    error = await client.receive()
    assert isinstance(error, ErrorFrame) and "binary" in error.message
    await client.send(PingFrame())
    assert await client.receive() == PongFrame()
    await client.close()


async def test_binary_first_frame_must_be_auth(cluster: Cluster) -> None:
    client = await BinaryClient.connect(cluster.a.url)
    await client.send(PingFrame())
    error = await client.receive()
    assert isinstance(error, ErrorFrame) and error.code == 40001 and error.id == 0
    await client.socket.wait_closed()
