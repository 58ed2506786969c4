"""Atheris (libFuzzer) harness over the two client-frame decoders of ``realtime_protocol``.

The property: any bytes a client can send either decode into a frame or raise the codecs'
one typed error, ``FrameDecodeError`` (40001). Anything else (an ``IndexError``, a
``UnicodeDecodeError``, a ``RecursionError``...) would escape the session's error handling
and take the connection down with a traceback instead of an ``err`` frame. On top of that, a
binary record that decodes must survive a re-encode unchanged (the gateway, tools and tests
all rely on ``encode_client_frame`` being the decoder's inverse), and a JSON frame's payload
must be JSON again (it is stored and spliced into other clients' frames without re-parsing).

Hypothesis already throws random bytes at both decoders (tests/unit/test_*_codec.py); this
adds coverage feedback, which finds the inputs that pass the first checks and reach deep
branches (batch members, presence actions, varint edges).

Run from the repository root (``tests`` must be importable)::

    python -m tests.fuzz.fuzz_codecs -runs=100000 [-max_total_time=60] [CORPUS_DIR ...]
    python -m tests.fuzz.fuzz_codecs --write-seeds CORPUS_DIR   # valid frames to start from

Every other argument goes to libFuzzer. A failing input is written to ``crash-<sha1>`` in
the current directory (``-artifact_prefix=DIR/`` moves it) and the exit code is non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

# No stubs ship with atheris (pyproject's mypy overrides could list it instead).
import atheris

# Instrumented imports: libFuzzer's coverage feedback comes from these modules' bytecode.
with atheris.instrument_imports(include=["realtime_protocol"]):
    import orjson

    from realtime_protocol import binary_codec, json_codec
    from realtime_protocol.binary_codec import FrameDecodeError
    from realtime_protocol.frames import (
        AuthFrame,
        BatchMember,
        ClientFrame,
        FetchFrame,
        HistoryFrame,
        PingFrame,
        PresenceAction,
        PresenceFrame,
        PublishFrame,
        SubscribeFrame,
        UnsubscribeFrame,
    )

__all__ = ["SEED_FRAMES", "check_binary", "check_json", "main", "test_one_input"]

SEED_FRAMES: tuple[ClientFrame, ...] = (
    AuthFrame(key="app1.main:secret-one", client_id="alice", resume_connection_id="c1"),
    AuthFrame(token="eyJhbGciOiJIUzI1NiJ9.e30.sig"),
    SubscribeFrame(1, "chat:1", 42),
    UnsubscribeFrame(2, "chat:1"),
    PublishFrame(3, "chat:1", "n", b'{"a":[1,2.5,"x"]}', "", "m1"),
    PublishFrame(
        4,
        "chat:1",
        "",
        None,
        "",
        "m2",
        True,
        (BatchMember("a", b"1", ""), BatchMember("b", b'"two"', "enc")),
    ),
    PresenceFrame(5, "chat:1", PresenceAction.ENTER, b'{"n":"A"}', ""),
    HistoryFrame(6, "chat:1", 100, 7),
    FetchFrame(7, "chat:1", 3),
    PingFrame(),
)
"""Valid frames whose encodings start a corpus (``--write-seeds``)."""

_JSON_SEEDS = (
    b'{"t":"auth","key":"app1.main:secret-one","clientId":"alice"}',
    b'{"t":"sub","id":1,"channel":"chat:1","lastSerial":3,"lastMessageId":"x"}',
    b'{"t":"pub","id":2,"channel":"c","name":"n","data":{"a":[1]},"messageId":"m",'
    b'"messages":[{"name":"a","data":1}]}',
    b'{"t":"pres","id":3,"channel":"c","action":"update","data":null}',
    b'{"t":"hist","id":4,"channel":"c","limit":10,"before":5,"start":"m"}',
    b'{"t":"fetch","id":5,"channel":"c","fromSerial":1}',
    b'{"t":"ping"}',
)


def check_binary(data: bytes) -> None:
    """``data`` as one WebSocket message of length-prefixed binary records: each record
    decodes (and survives a re-encode) or ``FrameDecodeError`` stops the message."""
    try:
        for record in binary_codec.iter_records(data):
            frame = binary_codec.decode_client_record(record)
            again = binary_codec.decode_client_record(binary_codec.encode_client_frame(frame))
            if again != frame:
                raise AssertionError(f"re-encode changed {frame!r} into {again!r}")
    except FrameDecodeError as error:
        if int(error.code) != 40001:
            raise AssertionError(f"decode error with code {error.code}") from error


def check_json(data: bytes) -> None:
    """``data`` as one JSON text message: a frame, or ``FrameDecodeError``."""
    try:
        frame = json_codec.decode_client_text(data)
    except FrameDecodeError as error:
        if int(error.code) != 40001:
            raise AssertionError(f"decode error with code {error.code}") from error
        return
    payloads = [getattr(frame, "data", None)]
    payloads += [member.data for member in getattr(frame, "members", ())]
    for payload in payloads:
        if payload is not None:
            orjson.loads(payload)  # raises (and so fails the run) if not JSON


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point: every input goes through both decoders."""
    check_binary(data)
    check_json(data)


def write_seeds(directory: Path) -> int:
    """Write the seed frames (binary records and JSON texts) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = [binary_codec.frame_record(binary_codec.encode_client_frame(f)) for f in SEED_FRAMES]
    seeds.append(b"".join(seeds))  # one message of several records, as the SDK may batch
    seeds += _JSON_SEEDS
    for index, seed in enumerate(seeds):
        (directory / f"seed-{index:02d}").write_bytes(seed)
    return len(seeds)


def main(argv: list[str]) -> None:
    """Fuzz with libFuzzer's command line ``argv``, or write seeds (``--write-seeds DIR``)."""
    if len(argv) == 3 and argv[1] == "--write-seeds":
        count = write_seeds(Path(argv[2]))
        print(f"wrote {count} seeds to {argv[2]}")
        return
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
